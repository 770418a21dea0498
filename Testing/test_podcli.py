"""`segmentation-machine pod ...` as a user runs it: real processes, real signals, the fake RunPod's v2 API."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

import fake_runpod
from conftest import RUNPOD_KEY
from SegmentationMachineLib.cloud.cloudgpu import SECRET_NAMES

CLI = [sys.executable, "-m", "SegmentationMachineLib.cli", "pod"]


@pytest.fixture
def env(fake, tmp_path):
    fake.boot_s, fake.ports_s, fake.server_s = 1.0, 1.5, 2.0
    return {**os.environ, "HOME": str(tmp_path), "RUNPOD_API_KEY": RUNPOD_KEY, **fake.environment(),
            "SM_RUNPOD_PROXY_URL": fake.proxy_template(), "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


class Runs:
    """Every output of every run, for the leak test at the end."""
    seen = []


def pod(env, *args, timeout=120):
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    Runs.seen += [done.stdout, done.stderr]
    return done


class Background:
    """`pod up` (or another command) running in its own process; lines() is what it printed so far."""

    def __init__(self, env, *args, command="up"):
        self.process = subprocess.Popen([*CLI, command, *args], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        self.output = []
        self.reader = threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text, timeout=60):
        end = time.monotonic() + timeout
        while not any(text in line for line in self.output):
            assert self.process.poll() is None and time.monotonic() < end, "".join(self.output)
            time.sleep(0.1)

    def end(self, signum, timeout=60):
        self.process.send_signal(signum)
        self.process.wait(timeout)
        self.reader.join(10)  # it takes the last lines, up to the end of the output
        Runs.seen.append("".join(self.output))
        return "".join(self.output)


def test_gpus_lists_types_with_enough_memory_cheapest_first(env):
    done = pod(env, "gpus")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    listed = [line.split()[0:3] for line in lines[1:-1]]
    assert [" ".join(words) for words in listed] == ["NVIDIA RTX A5000", "NVIDIA GeForce RTX", "NVIDIA L40S 48"]
    assert "RTX 3070" not in done.stdout  # 8 GB: below nnInteractive's 10 GB
    assert lines[-1].startswith("Spending $0.00/h now; the balance is in the RunPod console")


def price_of(gpu_id, secure, monkeypatch):
    """The fake catalog's secure price of a type, changed for the test."""
    [gpu] = [g for g in fake_runpod.GPU_TYPES if g["id"] == gpu_id]
    monkeypatch.setitem(gpu["price"], "secure", secure)


def test_up_falls_back_on_capacity_records_lists_and_downs(env, fake, tmp_path, monkeypatch):
    price_of("NVIDIA RTX A5000", 0.50, monkeypatch)  # the RTX 4090 ($0.69/h) within 1.5 times that, the L40S not
    done = pod(env, "up", "--detach")  # the cheapest type (A5000) has no capacity in the fake
    assert done.returncode == 0, done.stderr
    [(pod_id, created)] = fake.pods.items()
    assert created["gpu"]["id"] == "NVIDIA GeForce RTX 4090"
    out = done.stdout
    assert ("Starting a server pod on NVIDIA RTX A5000 ($0.50/h); without capacity there, the next types up to "
            "$0.75/h.") in out and "no capacity for NVIDIA RTX A5000" in out
    assert f"Ready: pod {pod_id} on NVIDIA GeForce RTX 4090 at $0.69/h\n" in out  # what it costs while it runs
    assert f"Detached: the pod is terminated once nothing has used it for its idle timeout, at its budget " \
           f"or at its maximum lifetime, or with `segmentation-machine pod down {pod_id}`." in out
    for phase in ("waiting for a GPU", "server ready"):
        assert phase in out
    assert f"nnInteractive server: {fake.url}/proxy/{pod_id}-8000" in out
    env_given = created["env"]
    assert env_given["SM_MODE"] == "server" and env_given["SM_IDLE_TIMEOUT_S"] == "900"
    assert env_given["SM_PRICE_PER_HOUR"] == "0.69"  # the type that had capacity, not the first one tried
    assert created["terminateAfter"]  # the 12 h default lifetime: RunPod ends the pod even if its agent never runs
    assert all(len(env_given[name]) >= 32 for name in ("SM_NNI_API_KEY", "SM_VNC_PASSWORD", "SM_FILES_PASSWORD",
                                                        "SM_HEARTBEAT_TOKEN"))
    assert env_given["SM_NNI_API_KEY"] not in out  # secrets only with --show-secrets
    records = tmp_path / ".segmentation-machine" / "pods.json"
    assert stat.S_IMODE(records.stat().st_mode) == 0o600
    assert json.loads(records.read_text())[pod_id]["secrets"]["SM_NNI_API_KEY"] == env_given["SM_NNI_API_KEY"]

    shown = pod(env, "status", pod_id, "--show-secrets").stdout
    assert f"{pod_id} " in shown and "RUNNING" in shown and f"SM_VNC_PASSWORD={env_given['SM_VNC_PASSWORD']}" in shown
    again = pod(env, "up", "--detach", "--gpu", "NVIDIA L40S", "--mode", "desktop", "--budget", "2.5")
    assert f"Still there from an earlier start: {pod_id} (NVIDIA GeForce RTX 4090, RUNNING, $" in again.stdout
    second = next(p for p in fake.pods if p != pod_id)
    assert fake.pods[second]["env"]["SM_MODE"] == "desktop" and fake.pods[second]["env"]["SM_BUDGET_USD"] == "2.5"
    assert "6080/http" in fake.pods[second]["ports"] and "/vnc.html?autoconnect=1" in again.stdout
    assert (f"or with `segmentation-machine pod down {second}`; with your files on its volume it ends by stopping, and "
            f"then its 50 GB volume costs $10.00/month until `segmentation-machine pod down {second}`, and is kept "
            "while the account has credit") in again.stdout  # a desktop pod's end is a stop: its volume bills on
    assert "password" not in again.stdout.split("Passwords:")[0].lower()

    down = pod(env, "down", "--all")
    assert down.returncode == 0 and fake.pods == {} and down.stdout.count("Terminated pod") == 2
    assert json.loads(records.read_text()) == {}
    assert "0 pod(s)" in pod(env, "list").stdout


def test_a_stopped_pod_is_resumed_and_connected_again(env, fake):
    assert pod(env, "up", "--detach", "--gpu", "NVIDIA L40S").returncode == 0
    [pod_id] = fake.pods
    stopped = pod(env, "stop", pod_id)
    assert stopped.returncode == 0 and fake.pods[pod_id]["status"] == "EXITED"
    assert "its 50 GB volume costs $10.00/month until RunPod terminates the pod at" in stopped.stdout
    status = pod(env, "status", pod_id).stdout
    assert f"{pod_id} " in status and ": EXITED, NVIDIA L40S; stopped" in status  # RunPod: no rate, no uptime
    assert status.splitlines()[0].endswith("; stopped, its 50 GB volume costs $10.00/month until it is terminated, "
                                           "and is kept while the account has credit (at $0 RunPod terminates pods "
                                           "without a network volume)")
    assert re.search(r"^  Billed by RunPod since it was created: \$\d+\.\d\d \(GPU and disk, all its starts\)\.$",
                     status, re.M), status  # what it cost while it ran, though stopped now
    resumed = pod(env, "resume", pod_id, "--detach")
    assert resumed.returncode == 0, resumed.stderr
    assert fake.pods[pod_id]["status"] == "RUNNING" and f"Ready: pod {pod_id}" in resumed.stdout
    unknown = pod(env, "resume", "pod9999x")
    assert unknown.returncode == 2 and "was not started from this computer" in unknown.stderr
    assert pod(env, "stop", pod_id).returncode == 0
    down = pod(env, "down", pod_id)  # RunPod reports a stopped pod with no rate or uptime: no "$0.00" made of that
    assert down.returncode == 0 and down.stdout.strip() == f"Terminated pod {pod_id}."


def test_runpods_own_end_terminates_a_server_pod_and_only_stops_a_desktop_pod(env, fake):
    """The maximum lifetime's backstop, RunPod's end of a pod whose agent never acted: a desktop pod's volume may hold
    the user's files (a terminate deletes it), so RunPod stops that pod instead."""
    for mode in ("server", "desktop"):
        assert pod(env, "up", "--detach", "--gpu", "NVIDIA L40S", "--mode", mode).returncode == 0
    server, desktop = sorted(fake.pods, key=lambda p: fake.pods[p]["env"]["SM_MODE"] == "desktop")
    assert fake.pods[server]["terminateAfter"] and fake.pods[server]["stopAfter"] is None
    assert fake.pods[desktop]["stopAfter"] and fake.pods[desktop]["terminateAfter"] is None
    fake.wall = lambda: time.time() + 13 * 3600  # past the 12 h default lifetime
    pod(env, "list")
    assert server not in fake.pods and fake.pods[desktop]["status"] == "EXITED"  # stopped: its volume kept


def creates(fake) -> list:
    """The bodies of every create, through v2 or GraphQL, with the env as {name: value}."""
    found = []
    for method, path, body in fake.requests:
        if path == "/graphql":
            found.append({e["key"]: e["value"] for e in body["variables"]["input"].get("env", [])})
        elif (method, path) == ("POST", "/v2/pods"):
            found.append(body["env"])
    return found


def test_up_after_graphqls_retirement_creates_through_v2_from_a_template_on_a_network_volume(env, fake):
    fake.graphql_retired = 410  # 2027: /graphql answers 410, and v2's schema decides what a create may say
    fake.templates["tpl9x4m"] = {"image": "example/sm-template:1", "env": {"FROM_TEMPLATE": "1"}, "serverless": False}
    done = pod(env, "up", "--detach", "--gpu", "NVIDIA L40S", "--template", "tpl9x4m", "--network-volume", "vol_abc")
    assert done.returncode == 0, done.stderr
    [(pod_id, created)] = fake.pods.items()
    [body] = [body for method, path, body in fake.requests if (method, path) == ("POST", "/v2/pods")]
    assert body["templateId"] == "tpl9x4m" and "image" not in body and body["cloud"] == "SECURE"
    assert body["mounts"] == {"network": [{"volumeId": "vol_abc", "path": "/workspace"}]}
    assert created["image"] == "example/sm-template:1" and created["env"]["FROM_TEMPLATE"] == "1"
    assert created["terminateAfter"] is None and f"Ready: pod {pod_id}" in done.stdout
    missing = pod(env, "up", "--detach", "--gpu", "NVIDIA L40S", "--template", "nosuch")
    assert missing.returncode == 2 and "RunPod has no template nosuch that this API key can use" in missing.stderr
    assert "Traceback" not in missing.stderr and list(fake.pods) == [pod_id]


def test_no_orphan_when_create_answers_500_after_creating(env, fake):
    fake.create_fault = (500, "Internal Server Error")
    done = pod(env, "up", "--detach", "--gpu", "NVIDIA GeForce RTX 4090")
    assert done.returncode == 0, done.stderr
    assert len(fake.pods) == 1 and len(creates(fake)) == 1  # found in the lagging list, not created again


def test_the_default_gpu_falls_back_only_to_types_within_half_again_its_rate(env, fake):
    fake.no_capacity = {"NVIDIA RTX A5000", "NVIDIA GeForce RTX 4090"}  # only the L40S, at 3 times the A5000's rate
    done = pod(env, "up", "--detach", "--budget", "2")
    assert done.returncode == 2 and "No capacity right now for NVIDIA RTX A5000:" in done.stderr
    assert fake.pods == {} and len(creates(fake)) == 1 and "Traceback" not in done.stderr  # the dearer ones untried
    assert "Starting a server pod on NVIDIA RTX A5000 ($0.27/h)." in done.stdout


def test_max_price_leaves_out_dearer_types(env, fake):
    cheap = pod(env, "up", "--detach", "--max-price", "0.27")  # at most: the RTX A5000's price, and it has no capacity
    assert cheap.returncode == 2 and "No capacity right now for NVIDIA RTX A5000:" in cheap.stderr
    assert fake.pods == {} and "Traceback" not in cheap.stderr
    none = pod(env, "up", "--max-price", "0.1")
    assert none.returncode == 2 and "No GPU type costs at most $0.1/h on the secure cloud" in none.stderr
    assert "(the cheapest: $0.27/h): raise --max-price." in none.stderr


def test_max_price_is_the_fallbacks_limit_instead_of_half_again_the_first_rate(env, fake):
    fake.no_capacity = {"NVIDIA RTX A5000", "NVIDIA GeForce RTX 4090"}  # the L40S: above 1.5 x $0.27/h, below $1/h
    done = pod(env, "up", "--detach", "--max-price", "1")
    assert done.returncode == 0, done.stderr
    assert ("Starting a server pod on NVIDIA RTX A5000 ($0.27/h); without capacity there, the next types up to "
            "$1.00/h.") in done.stdout
    assert [p["gpu"]["id"] for p in fake.pods.values()] == ["NVIDIA L40S"]


def test_a_start_not_ready_in_time_is_terminated(env, fake):
    fake.server_s = 3600
    done = pod(env, "up", "--timeout", "3", "--gpu", "NVIDIA GeForce RTX 4090", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not ready after" in done.stderr and "it was terminated" in done.stderr and fake.pods == {}
    assert "its container log is in" in done.stderr
    end = time.monotonic() + 10
    while fake.log_streams:  # the never-ending log stream was closed, not left open
        assert time.monotonic() < end
        time.sleep(0.1)


def test_a_pod_in_error_ends_up_at_once_with_one_sentence(env, fake):
    fake.fails_as = "ERROR"  # the container keeps failing: waiting the 10 min of --timeout would only bill
    started = time.monotonic()
    done = pod(env, "up", "--gpu", "NVIDIA GeForce RTX 4090", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and time.monotonic() - started < 30
    assert "RunPod reports the pod as ERROR while pulling the image: it was terminated (cost $0.00); its container " \
           "log is in" in done.stderr and fake.pods == {}


def test_a_pod_terminated_elsewhere_is_not_shown_as_still_there(env, fake, tmp_path):
    from SegmentationMachineLib.cloud.pods import RunPodRest

    assert pod(env, "up", "--detach", "--gpu", "NVIDIA L40S").returncode == 0
    [pod_id] = fake.pods
    time.sleep(fake.list_lag_s)  # listed by now
    RunPodRest(RUNPOD_KEY).terminate(pod_id)  # e.g. in RunPod's console: the record here stays
    assert [p["status"] for p in fake.ended.values()] == ["TERMINATED"]  # and RunPod still lists it, for a while
    assert "0 pod(s). Spending $0.00/h" in pod(env, "list").stdout
    assert pod(env, "status").stdout == f"{pod_id}: terminated.\n"
    records = tmp_path / ".segmentation-machine" / "pods.json"
    assert json.loads(records.read_text()) == {}  # forgotten: the next `pod up` does not offer it


def test_ctrl_c_while_starting_terminates_the_pod(env, fake):
    fake.server_s = 3600
    up = Background(env, "--gpu", "NVIDIA GeForce RTX 4090")
    up.wait_for("pulling the image")
    assert len(fake.pods) == 1
    out = up.end(signal.SIGINT)
    assert up.process.returncode == 130 and "the pod being started was terminated" in out and fake.pods == {}


def slow_answers(fake, monkeypatch, slow_s, to=lambda method, path: method == "POST" and path == "/graphql"):
    """The fake does what a request asks at once and answers it slow_s later (a slow or lost answer)."""
    answer = fake.handle

    def slowly(method, path, authorization, body):
        done = answer(method, path, authorization, body)
        if to(method, path):
            time.sleep(slow_s)
        return done

    monkeypatch.setattr(fake, "handle", slowly)


def interrupted_create(env, fake, monkeypatch) -> tuple:
    """(pod up's process, its output) after a Ctrl-C while RunPod had made the pod but its answer had not come."""
    slow_answers(fake, monkeypatch, 5.0)
    up = Background(env, "--gpu", "NVIDIA GeForce RTX 4090")
    up.wait_for("waiting for a GPU")
    while not fake.pods:
        time.sleep(0.05)
    return up, up.end(signal.SIGINT)


def test_ctrl_c_while_the_create_is_in_flight_terminates_the_pod_it_made(env, fake, monkeypatch):
    """The pod is found by name while the list lags (not one look)."""
    up, out = interrupted_create(env, fake, monkeypatch)
    assert up.process.returncode == 130 and "the pod being started was terminated" in out and fake.pods == {}


def test_ctrl_c_while_the_create_is_in_flight_never_says_terminated_unless_it_was(env, fake, monkeypatch):
    fake.list_lag_s = 60.0  # RunPod lists the new pod only after the ~10 s we look for it
    up, out = interrupted_create(env, fake, monkeypatch)
    [(pod_id, created)] = fake.pods.items()
    assert up.process.returncode == 2 and "terminated" not in out and "Traceback" not in out
    assert (f"no pod named {created['name']} shows yet, but it may be running: check `segmentation-machine pod list` "
            "(or RunPod's console) in a minute and end it with `segmentation-machine pod down POD_ID`.") in out


def test_ctrl_c_while_the_resume_is_in_flight_stops_the_pod_again(env, fake, monkeypatch):
    assert pod(env, "up", "--detach", "--gpu", "NVIDIA L40S").returncode == 0
    [pod_id] = fake.pods
    assert pod(env, "stop", pod_id).returncode == 0
    slow_answers(fake, monkeypatch, 3.0, to=lambda method, path: path.endswith("/action"))
    resume = Background(env, pod_id, command="resume")
    resume.wait_for(f"Resuming pod {pod_id}.")
    while fake.pods[pod_id]["status"] == "EXITED":  # RunPod started it; its answer has not come
        time.sleep(0.05)
    out = resume.end(signal.SIGINT)
    assert resume.process.returncode == 130 and "the pod was stopped again, its volume kept" in out
    assert fake.pods[pod_id]["status"] == "EXITED"
    again = pod(env, "stop", pod_id)  # stopped already (as its agent does): done, not "RunPod cannot do that"
    assert again.returncode == 0 and f"Stopped pod {pod_id}: no GPU billing" in again.stdout


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_closing_the_terminal_or_stopping_a_connected_up_terminates_the_pod(env, fake, signum):
    fake.warning = "The pod terminates in 4.0 min: its budget of $1 is spent."
    up = Background(env, "--gpu", "NVIDIA GeForce RTX 4090")
    up.wait_for("Warning from the pod: The pod terminates in 4.0 min")
    [pod_id] = fake.pods
    assert fake.pods[pod_id]["heartbeats"] >= 1  # connected: the agent is told
    out = up.end(signum)
    assert up.process.returncode == 0 and f"Terminated pod {pod_id}" in out and fake.pods == {}


def test_ending_a_connected_desktop_up_stops_its_pod_keeping_the_users_files(env, fake):
    up = Background(env, "--gpu", "NVIDIA GeForce RTX 4090", "--mode", "desktop")
    up.wait_for("Ctrl-C or closing it stops the pod (its volume, with your files, stays")
    [pod_id] = fake.pods
    out = up.end(signal.SIGTERM)
    assert up.process.returncode == 0 and fake.pods[pod_id]["status"] == "EXITED"
    assert f"Stopped pod {pod_id}" in out and "its 50 GB volume costs $10.00/month" in out
    assert f"`segmentation-machine pod down {pod_id}` terminates it with your files" in out


def test_a_wrong_key_is_one_sentence(env, fake):
    done = pod({**env, "RUNPOD_API_KEY": "rpa_WRONGKEY_not_this_one"}, "list")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "RunPod rejected the API key" in done.stderr and "rpa_WRONGKEY" not in done.stderr
    missing = pod({k: v for k, v in env.items() if k != "RUNPOD_API_KEY"}, "gpus")
    assert missing.returncode == 2 and "No RunPod API key" in missing.stderr
    hasty = pod(env, "up", "--idle-timeout", "179")  # under three heartbeats: two late ones ended a pod in use
    assert hasty.returncode == 2 and "The idle timeout must be at least 180 s" in hasty.stderr
    assert pod(env, "up", "--budget", "-1").returncode == 2
    free = pod(env, "up", "--budget", "0")  # not "no budget"
    assert free.returncode == 2 and "The maximum lifetime and the budget must be numbers more than 0" in free.stderr
    # Not a number: the agent never ended the pod (its idle time, lifetime and budget compared as NaN), or a
    # traceback before the pod was made (an end time of NaN or infinity).
    limits = "The maximum lifetime and the budget must be numbers more than 0"
    for option, value, sentence in (("--idle-timeout", "nan", "The idle timeout must be at least 180 s"),
                                    ("--budget", "nan", limits), ("--max-lifetime", "nan", limits),
                                    ("--max-lifetime", "inf", limits)):
        refused = pod(env, "up", option, value)
        assert refused.returncode == 2 and sentence in refused.stderr and "Traceback" not in refused.stderr, option
    assert fake.pods == {}


def test_login_saves_the_key_user_only_and_logout_forgets_it(env, tmp_path):
    without = {k: v for k, v in env.items() if k != "RUNPOD_API_KEY"}
    login = subprocess.run([*CLI, "login"], env=without, input=RUNPOD_KEY + "\n", capture_output=True, text=True,
                           timeout=120)
    assert login.returncode == 0, login.stderr
    [saved] = (tmp_path / ".segmentation-machine" / "secrets").iterdir()
    assert saved.read_text() == RUNPOD_KEY and stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert pod(without, "gpus").returncode == 0  # the saved key is used
    assert pod(without, "logout").returncode == 0 and not saved.exists()
    again = pod(without, "logout")  # nothing stored: it says so, rather than that it forgot one
    assert again.returncode == 0 and again.stdout.startswith("No RunPod API key is stored here")
    Runs.seen += [login.stdout, login.stderr]


def test_no_key_or_pod_secret_appears_in_output_logs_or_urls(env, fake, tmp_path):
    """Runs last in this file: everything above ran with the known key, and every output was kept.
    The pods' own secrets are checked on this test's runs (above, one asks for them on purpose)."""
    log = tmp_path / "pod.log"
    fake.rate_limit_every = 8  # some 429s on the way (each costs a real 5 s pause in the CLI)
    before = len(Runs.seen)
    for args in (["gpus"], ["up", "--detach", "--gpu", "NVIDIA RTX A5000"], ["up", "--detach"], ["status"],
                 ["list"], ["down", "--all"], ["down", "pod9999x"]):
        pod(env, *args, "--log", str(log))
    up = Background(env, "--gpu", "NVIDIA GeForce RTX 4090")
    up.wait_for("Connected")
    up.end(signal.SIGINT)
    pod_secrets = [value for env_given in creates(fake) for name, value in env_given.items() if name in SECRET_NAMES]
    ours = "\n".join(Runs.seen[before:]) + log.read_text()
    assert fake.rate_limited and pod_secrets and all(RUNPOD_KEY not in text for text in Runs.seen)
    assert not [secret for secret in pod_secrets if secret in ours]
    assert fake.paths and not any(secret in path for path in fake.paths for secret in [RUNPOD_KEY, *pod_secrets])
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.parent.name != "secrets":
            assert RUNPOD_KEY not in path.read_text(errors="replace"), path


def test_wipe_at_end_reaches_a_desktop_pods_agent_and_is_refused_for_a_server_pod(env, fake):
    """A server pod keeps no uploads (it is terminated with its volume): asked there, the option is refused before
    RunPod is asked anything, not ignored."""
    refused = pod(env, "up", "--wipe-at-end")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "Wiping the uploads at the end is for desktop pods" in refused.stderr and fake.pods == {}
    done = pod(env, "up", "--detach", "--gpu", "NVIDIA L40S", "--mode", "desktop", "--wipe-at-end")
    assert done.returncode == 0, done.stderr
    (created,) = fake.pods.values()
    assert created["env"]["SM_MODE"] == "desktop" and created["env"]["SM_WIPE_AT_END"] == "1"
    plain = pod(env, "up", "--detach", "--gpu", "NVIDIA L40S", "--mode", "desktop")
    assert plain.returncode == 0 and [p["env"].get("SM_WIPE_AT_END") for p in fake.pods.values()] == ["1", None]
    assert pod(env, "down", "--all").returncode == 0


def test_pod_stop_and_ctrl_c_have_a_wiping_pods_agent_wipe_then_end_it_or_say_the_uploads_stay(env, fake, tmp_path):
    """A stop from here of a pod started with --wipe-at-end went straight to RunPod, which cannot wipe: the uploads
    stayed, though the user opted in. Now its agent (the real one, and its wiper) is asked to end it and wipes first;
    where it does not take the request (an image from before, an unreachable pod) RunPod stops the pod all the same
    and one sentence says the uploads were NOT wiped."""
    from pod_proxy import PodProxy
    from SegmentationMachineLib.cloud.cloudgpu import AGENT_PORT
    from SegmentationMachineLib.cloud.podagent import AGENT_FOLDER
    from test_podagent import WIPED, kill_started, uploaded, wiping_agent

    proxy = PodProxy(fake)  # to the real agent of a pod once routed, else to the fake's stand-ins
    env = {**env, "SM_RUNPOD_PROXY_URL": proxy.template()}
    try:
        for _ in range(3):
            done = pod(env, "up", "--detach", "--gpu", "NVIDIA L40S", "--mode", "desktop", "--wipe-at-end")
            assert done.returncode == 0, done.stderr
        reached, old_image, unreachable = fake.pods
        for pod_id in fake.pods:
            fake.volumes[pod_id] = tmp_path / f"volume-{pod_id}"
            (fake.volumes[pod_id] / AGENT_FOLDER).mkdir(parents=True)
            uploaded(fake.volumes[pod_id], tmp_path / f"outside-{pod_id}")
        (fake.volumes[reached] / "scenes").mkdir()
        (fake.volumes[reached] / "scenes/skull.mrb").write_bytes(b"the user's work")
        agent = wiping_agent(fake, reached, tmp_path / "run", fake.pods[reached]["env"]["SM_HEARTBEAT_TOKEN"])
        proxy.route(reached, AGENT_PORT, agent.port)

        stopped = pod(env, "stop", reached)
        assert stopped.returncode == 0, stopped.stderr
        assert fake.pods[reached]["status"] == "EXITED" and "Stopping pod" in agent.log()
        volume = fake.volumes[reached]
        assert [sorted(p.name for p in (volume / folder).iterdir()) for folder in WIPED] == [[]] * len(WIPED)
        assert (volume / "scenes/skull.mrb").read_bytes() == b"the user's work"
        out = stopped.stdout
        assert out.startswith(f"Asking the agent of pod {reached} to wipe the uploads and end it (up to 3 min)")
        assert (f"Stopped pod {reached} (this run cost $" in out and "its 50 GB volume costs $10.00/month" in out
                and "Its agent asked for the uploaded DICOM to be wiped before it ended the pod" in out
                and "NOT wiped" not in out)

        for pod_id in (old_image, unreachable):
            fake.agent_answers = pod_id == old_image  # the stand-in answers /end as a heartbeat; else a 502
            done = pod(env, "stop", pod_id)
            assert done.returncode == 0 and fake.pods[pod_id]["status"] == "EXITED", done.stderr
            assert (f"The uploads on its volume were NOT wiped (its agent did not answer, so it was stopped through "
                    f"RunPod): `segmentation-machine pod down {pod_id}` deletes them, with the volume.") in done.stdout
            assert (fake.volumes[pod_id] / "inbox/Doe Jane").is_dir()

        fake.agent_answers = True
        up = Background(env, "--gpu", "NVIDIA L40S", "--mode", "desktop", "--wipe-at-end")
        up.wait_for("Ctrl-C or closing it has its agent wipe the uploads and end the pod")
        [connected] = [pod_id for pod_id in fake.pods if pod_id not in (reached, old_image, unreachable)]
        fake.volumes[connected] = tmp_path / "volume-connected"  # the uploads only: nothing else of the user's
        (fake.volumes[connected] / AGENT_FOLDER).mkdir(parents=True)
        uploaded(fake.volumes[connected], tmp_path / "outside-connected")
        agent = wiping_agent(fake, connected, tmp_path / "run-connected",
                             fake.pods[connected]["env"]["SM_HEARTBEAT_TOKEN"])
        proxy.route(connected, AGENT_PORT, agent.port)
        out = up.end(signal.SIGINT, timeout=120)
        assert up.process.returncode == 0 and connected not in fake.pods, out  # terminated, its volume with it
        assert not (tmp_path / "volume-connected").exists() and "Terminating pod" in agent.log()
        assert (f"Pod {connected} has ended (this run cost $" in out and "Its agent had the uploaded DICOM wiped and, "
                "with nothing of yours left on its volume, terminated the pod, volume and all" in out)
        assert connected not in json.loads((tmp_path / ".segmentation-machine/pods.json").read_text())
    finally:
        proxy.close()
        kill_started()  # the wipers: the agents ended with their pods
    assert pod(env, "down", "--all").returncode == 0
