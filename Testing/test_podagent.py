"""The pod agent, run as the image runs it (`python -m SegmentationMachineLib.cloud.podagent`), against the fake RunPod."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import RUNPOD_KEY
from nninteractive_server import free_port
from SegmentationMachineLib.cloud.heartbeat import Heartbeat
from SegmentationMachineLib.cloud.podagent import (AGENT_FOLDER, AgentConfig, PodAgent, alone_env, holds_user_files,
                                                   verdict)
from SegmentationMachineLib.cloud.pods import KEPT_WHILE_CREDIT, PodSpec, RunPodRest

TOKEN = "heartbeat-token-of-this-pod"
REPO = Path(__file__).resolve().parents[1]
NOTICES = REPO / "docker/desktop/sm-pod-notices"


class RunningAgent:
    started = []  # each is killed after its test, passed or failed (a failed one's agent outlived the suite)

    def __init__(self, fake, pod_id, **limits):
        RunningAgent.started.append(self)
        self.port = free_port()
        env = {**os.environ, "RUNPOD_POD_ID": pod_id, "RUNPOD_API_KEY": RUNPOD_KEY, **fake.environment(),
               "SM_HEARTBEAT_TOKEN": TOKEN, "SM_AGENT_PORT": str(self.port), "SM_AGENT_POLL_S": "0.3",
               "SM_WORKSPACE": str(fake.volumes[pod_id]),
               **{name: str(value) for name, value in limits.items()}}
        self.process = subprocess.Popen([sys.executable, "-m", "SegmentationMachineLib.cloud.podagent"], env=env,
                                        stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                requests.get(self.url, timeout=1)  # any answer: it listens
                break
            except requests.RequestException:
                time.sleep(0.1)

    def log(self, timeout=30) -> str:
        """Waits for the agent to end (it ends once it terminated the pod) and returns its log."""
        try:
            self.process.wait(timeout)
        finally:
            self.process.kill()
        return self.process.stderr.read()


@pytest.fixture(autouse=True)
def no_agent_left_running():
    yield
    kill_started()


def kill_started():
    """Kills the agents (and wipers) started so far."""
    while RunningAgent.started:
        process = RunningAgent.started.pop().process
        process.kill()
        process.wait(10)


@pytest.fixture
def pod(backend, fake, tmp_path):
    fake.boot_s = fake.ports_s = fake.server_s = 0
    return new_pod(backend, fake, tmp_path / "volume")


def new_pod(backend, fake, volume: Path, network_volume: str = None):
    """A pod with a 50 GB volume of its own or a network volume, which a folder stands in for (/workspace as the
    entrypoint prepares it)."""
    created = backend.create(PodSpec("NVIDIA GeForce RTX 4090", image="example/sm:1", volume_gb=50,
                                     network_volume_id=network_volume))
    (volume / AGENT_FOLDER).mkdir(parents=True)
    fake.volumes[created.id] = volume
    return created


def beat_for(seconds, heartbeat, every=0.3):
    answers = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert heartbeat.beat(), heartbeat.problem
        answers.append(dict(heartbeat.last))
        time.sleep(every)
    return answers


def test_heartbeats_keep_the_pod_and_silence_terminates_it(fake, pod):
    agent = RunningAgent(fake, pod.id, SM_IDLE_TIMEOUT_S=2.5, SM_WARNING_S=1.8)
    answers = beat_for(4, Heartbeat(agent.url, TOKEN))  # twice the idle timeout
    assert pod.id in fake.pods
    assert answers[-1]["terminates_in_s"] > 1 and answers[-1]["warning"] == "" and "idle" in answers[-1]["reason"]
    silent_from = time.monotonic()
    log = agent.log()
    assert pod.id not in fake.pods and 2 <= time.monotonic() - silent_from < 15
    assert agent.process.returncode == 0
    assert "The pod terminates in" in log and f"Terminating pod {pod.id}: nothing has used it" in log


def test_beats_of_a_slicer_left_open_keep_nothing_running_but_are_told_the_end(fake, pod, monkeypatch):
    """The module's heartbeats say when nobody used the pod lately: a Slicer left open kept it to its lifetime."""
    from SegmentationMachineLib.cloud import heartbeat

    agent = RunningAgent(fake, pod.id, SM_IDLE_TIMEOUT_S=2.5, SM_WARNING_S=1.8)
    monkeypatch.setattr(heartbeat, "INTERVAL_S", 0.3)
    watching = Heartbeat(agent.url, TOKEN, watches_use=True)
    end = time.monotonic() + 4  # prompting for longer than the idle timeout
    while time.monotonic() < end:
        heartbeat.used()
        assert watching.beat() and watching.last["warning"] == "", watching.problem or watching.last
        time.sleep(0.3)
    assert pod.id in fake.pods
    monkeypatch.setattr(heartbeat, "_last_use", [time.monotonic() - 60])
    unused_from = time.monotonic()
    answers = []
    while pod.id in fake.pods and time.monotonic() - unused_from < 15:
        answers.append(dict(watching.last) if watching.beat() else {})
        time.sleep(0.3)
    assert pod.id not in fake.pods and 2 <= time.monotonic() - unused_from
    assert any(answer.get("warning", "").startswith("The pod terminates in") for answer in answers)


def test_a_use_after_the_warning_is_told_at_once_not_a_minute_later():
    """A prompt placed when the pod said it ends in a minute reached the agent with the next beat, up to 60 s later:
    after the end."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from SegmentationMachineLib.cloud import heartbeat

    beats = []

    class Agent(BaseHTTPRequestHandler):
        def do_POST(self):
            beats.append(self.headers.get(heartbeat.UNUSED_HEADER))
            answer = json.dumps({"warning": "The pod terminates in 1.0 min: nothing has used it for 15 min."}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    agent = ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    heartbeat._last_use[0] = time.monotonic() - 3600  # a Slicer left open
    beating = Heartbeat(f"http://127.0.0.1:{agent.server_port}", TOKEN, watches_use=True).start()
    try:
        for _ in range(200):  # the answer read, not only the beat received
            if beating.warning:
                break
            time.sleep(0.05)
        assert beats == ["1"] and beating.warning  # unused, told the end is near
        heartbeat.used()
        for _ in range(100):
            if len(beats) == 2:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # nothing more comes
        assert beats == ["1", None]  # the use, at once (the interval is 60 s)
    finally:
        beating.stop()
        agent.shutdown()


def test_a_browser_on_the_desktop_counts_as_connected(fake, pod):
    desktop = socket.create_server(("127.0.0.1", 0))  # stands in for the VNC server, which websockify connects to
    agent = RunningAgent(fake, pod.id, SM_MODE="desktop", SM_ACTIVITY_PORTS=desktop.getsockname()[1],
                         SM_IDLE_TIMEOUT_S=2.5)
    assert requests.get(f"{agent.url}/healthz").json() == {"ok": True}
    browser = socket.create_connection(desktop.getsockname())
    session, _ = desktop.accept()
    session.sendall(b"\0" * 65536)  # the desktop's pixels: more than a login's worth (the agent's sign of a session)
    time.sleep(5)  # twice the idle timeout without a heartbeat
    assert pod.id in fake.pods
    browser.close()
    session.close()
    log = agent.log()
    assert pod.id not in fake.pods and "nothing has used it" in log
    desktop.close()


def test_a_forged_heartbeat_is_refused_and_keeps_nothing_alive(fake, pod):
    agent = RunningAgent(fake, pod.id, SM_IDLE_TIMEOUT_S=2)
    forged = Heartbeat(agent.url, "guessed-token")
    refusals = []
    while pod.id in fake.pods and agent.process.poll() is None:
        assert not forged.beat()
        refusals.append(forged.problem)
        time.sleep(0.3)
    log = agent.log()
    assert refusals.count("the pod agent answered 401") >= 3
    assert pod.id not in fake.pods and log.count("Refused 1 heartbeat(s) without the pod's token") == 1  # a minute's
    assert "guessed-token" not in log and TOKEN not in log


@pytest.mark.parametrize("limit, reason", [({"SM_BUDGET_USD": 0.001}, "its budget of $0.001 is spent"),
                                           ({"SM_MAX_LIFETIME_S": 5}, "its maximum lifetime of 5 s is reached")])
def test_budget_and_lifetime_end_the_pod_despite_heartbeats(fake, pod, limit, reason):
    agent = RunningAgent(fake, pod.id, SM_IDLE_TIMEOUT_S=60, SM_WARNING_S=2.5, **limit)
    heartbeat = Heartbeat(agent.url, TOKEN)
    answers, deadline = [], time.monotonic() + 60  # a limit never reached fails, never hangs the suite
    while agent.process.poll() is None and pod.id in fake.pods and time.monotonic() < deadline:
        if heartbeat.beat():
            answers.append(dict(heartbeat.last))
        time.sleep(0.2)
    log = agent.log()
    assert pod.id not in fake.pods and f"Terminating pod {pod.id}: {reason}" in log
    assert any(reason in a["warning"] for a in answers), "connected clients were warned before the end"
    assert answers[0]["warning"] == ""


def test_the_agent_without_its_environment_says_what_is_missing():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "SM_"))}
    done = subprocess.run([sys.executable, "-m", "SegmentationMachineLib.cloud.podagent"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "needs RUNPOD_POD_ID, RUNPOD_API_KEY, SM_HEARTBEAT_TOKEN" in done.stderr
    with pytest.raises(ValueError, match="SM_IDLE_TIMEOUT_S must be a number of seconds, not '15m'"):
        AgentConfig.from_env({"RUNPOD_POD_ID": "p", "RUNPOD_API_KEY": "k", "SM_HEARTBEAT_TOKEN": "t",
                              "SM_IDLE_TIMEOUT_S": "15m"})


def test_the_first_limit_reached_decides():
    config = AgentConfig("p", "k", "t", idle_timeout_s=900, max_lifetime_s=3600, budget_usd=1.0)
    assert "idle" in verdict(config, idle_s=0, lifetime_s=0, cost_usd=0, cost_per_hr=0.5).reason
    assert verdict(config, idle_s=0, lifetime_s=3500, cost_usd=0, cost_per_hr=0.5).seconds_left == 100
    spent = verdict(config, idle_s=0, lifetime_s=100, cost_usd=0.99, cost_per_hr=3.6)
    assert "budget" in spent.reason and spent.seconds_left == pytest.approx(10)


def test_a_short_idle_timeout_warns_only_in_its_second_half(tmp_path):
    """A 5 min idle timeout with the default 5 min warning showed the warning on every beat of a pod in use."""
    now = [0.0]
    agent = PodAgent(AgentConfig("p", "k", "t", idle_timeout_s=300, warning_s=300, workspace=str(tmp_path)),
                     backend=object(), clock=lambda: now[0])
    assert agent.status()["warning"] == ""
    now[0] = 149.0
    assert agent.status()["warning"] == ""
    now[0] = 151.0
    assert agent.status()["warning"].startswith("The pod terminates in 2.5 min")


@pytest.mark.parametrize("reads_as, said", [
    ("page", "RunPod answered 200 with something other than its API's JSON (text/html)"),
    ("renamed", "RunPod answered in a form this version does not know")])
def test_answers_runpod_was_not_meant_to_give_do_not_end_the_watch(fake, pod, reads_as, said):
    """v2 is a beta, and a proxy may answer with a page: a poll that cannot be read once crashed the agent (and
    supervisord gave up restarting it), leaving the pod billing with nothing to end it."""
    fake.reads_as = reads_as
    agent = RunningAgent(fake, pod.id, SM_IDLE_TIMEOUT_S=2)
    log = agent.log()
    assert agent.process.returncode == 0 and pod.id not in fake.pods  # ended at its idle timeout all the same
    assert f"Could not read the pod's cost from RunPod: {said}" in log and "Traceback" not in log


def test_when_preparing_the_pod_fails_the_entrypoint_still_runs_the_agent_which_ends_the_pod(fake, pod, tmp_path):
    """RunPod restarts a container whose entrypoint exits, forever and billing: an entrypoint that stopped at its first
    failing step (set -e) left nothing to end the pod. The image's entrypoint.sh, its paths moved here, with a
    renderer that fails."""
    app = tmp_path / "app"
    (app / "docker").mkdir(parents=True)
    (app / "docker/render_config.py").write_text("raise SystemExit(1)  # as a full disk would make it\n")
    script = (REPO / "docker/entrypoint.sh").read_text()
    script = script.replace("APP=/opt/segmentation-machine", f"APP={app}").replace(
        "VENV=/opt/venv/bin", f"VENV={Path(sys.executable).parent}")
    (tmp_path / "entrypoint.sh").write_text(script)
    # The pod's raw environment, as the renderer would have repaired it: no heartbeat token (it makes one), a limit
    # that is not a number (docker/README's own example).
    env = {**os.environ, "RUNPOD_POD_ID": pod.id, "RUNPOD_API_KEY": RUNPOD_KEY, **fake.environment(),
           "SM_AGENT_PORT": str(free_port()), "SM_AGENT_POLL_S": "0.3", "SM_WORKSPACE": str(fake.volumes[pod.id]),
           "SM_IDLE_TIMEOUT_S": "2", "SM_MAX_LIFETIME_S": "15m"}
    env.pop("SM_HEARTBEAT_TOKEN", None)
    started = subprocess.run(["bash", str(tmp_path / "entrypoint.sh")], env=env, capture_output=True, text=True,
                             timeout=60)
    assert started.returncode == 0 and pod.id not in fake.pods  # the agent ran, and ended the pod when idle
    assert "preparing the pod failed (entrypoint.sh line" in started.stderr
    assert "Ignoring SM_MAX_LIFETIME_S='15m': not a number above 0." in started.stderr
    assert f"Terminating pod {pod.id}: nothing has used it" in started.stderr


def test_alone_a_limit_of_nan_is_dropped_as_one_that_is_not_a_number():
    """Kept, NaN compared as never reached: the pod ran on without an idle timeout (its default of 15 min holds)."""
    env = alone_env({"SM_IDLE_TIMEOUT_S": "NaN", "SM_BUDGET_USD": "nan", "SM_MAX_LIFETIME_S": "3600"})
    assert {name: env.get(name) for name in ("SM_IDLE_TIMEOUT_S", "SM_BUDGET_USD", "SM_MAX_LIFETIME_S")} == {
        "SM_IDLE_TIMEOUT_S": None, "SM_BUDGET_USD": None, "SM_MAX_LIFETIME_S": "3600"}
    assert AgentConfig.from_env({"RUNPOD_POD_ID": "p", "RUNPOD_API_KEY": "k", **env}).idle_timeout_s == 900.0

def test_a_check_that_fails_unexpectedly_is_logged_once_and_the_watch_goes_on(tmp_path, caplog):
    """Whatever goes wrong in a look at the pod (here: reading it, every time; ending it, the first time), the agent's
    run goes on and still ends the pod at its idle timeout."""
    class Broken:
        terminated = []

        def get(self, pod_id):
            raise RuntimeError("a bug of ours")

        def terminate(self, pod_id):
            self.terminated.append(pod_id)
            if len(self.terminated) == 1:
                raise RuntimeError("another bug of ours")

    config = AgentConfig("pod0001x", "k", TOKEN, idle_timeout_s=1.0, poll_s=0.1, warning_s=0.5, port=free_port(),
                         workspace=str(tmp_path))
    runner = threading.Thread(target=PodAgent(config, Broken()).run, kwargs={"check_every_s": 0.1}, daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive() and Broken.terminated == ["pod0001x"] * 2
    assert caplog.text.count("The pod agent's check failed; it goes on watching the pod.") == 2  # once each
    assert "a bug of ours" in caplog.text and "another bug of ours" in caplog.text


def test_a_failing_terminate_is_retried_each_poll_interval_not_each_second(fake, pod, caplog):
    now = [0.0]
    config = AgentConfig(pod.id, "rpa_revoked_key", TOKEN, idle_timeout_s=10, poll_s=60)
    agent = PodAgent(config, RunPodRest("rpa_revoked_key"), clock=lambda: now[0])
    now[0] = 11  # idle for longer than the timeout
    for _ in range(5):
        agent.check()
    assert caplog.text.count("Terminating failed: RunPod rejected the API key") == 1
    now[0] = 72
    agent.check()
    assert caplog.text.count("Terminating failed") == 2 and caplog.text.count("Stopping failed too") == 2
    assert pod.id in fake.pods and "rpa_revoked_key" not in caplog.text and not agent.terminated.is_set()


def test_a_pod_key_that_may_not_terminate_stops_the_pod_instead(fake, pod):
    fake.limited_keys = {"rpa_POD_SCOPED"}  # RunPod's pod key: its rights beyond stopping are not documented
    agent = RunningAgent(fake, pod.id, RUNPOD_API_KEY="rpa_POD_SCOPED", SM_IDLE_TIMEOUT_S=1.5)
    log = agent.log()
    assert agent.process.returncode == 0 and fake.pods[pod.id]["status"] == "EXITED"  # no GPU billing
    assert "Terminating failed: RunPod refused: this API key may not do that" in log
    assert re.search(rf"Stopped pod {pod.id} instead: its \d+ GB volume costs \$\d+\.\d\d/month until it is "
                     rf"terminated, and is {re.escape(KEPT_WHILE_CREDIT)} \(RunPod console", log), log
    assert "rpa_POD_SCOPED" not in log


def test_a_pod_key_that_may_only_stop_ends_the_pod_through_a_stop_of_unknown_outcome(fake, pod, caplog):
    """All RunPod documents of the pod-scoped key is that it stops the pod: where it may not even read the pod, a stop
    answered with a server error (done all the same) is sent again, and the 409 a stopped pod answers is the stop done;
    the failed reads are said once, not every poll."""
    fake.stop_only_keys = {"rpa_STOP_ONLY"}
    fake.action_fault = (502, "Bad gateway")  # the stop happens, its answer is lost
    now = [0.0]
    config = AgentConfig(pod.id, "rpa_STOP_ONLY", TOKEN, idle_timeout_s=10, poll_s=60, price_per_hr=0.69)
    agent = PodAgent(config, RunPodRest("rpa_STOP_ONLY", sleep=lambda s: None), clock=lambda: now[0])
    agent.check()
    now[0] = 61
    agent.check()  # a second poll, refused as the first
    assert caplog.text.count("Could not read the pod's cost from RunPod: RunPod refused: this API key may not") == 1
    now[0] = 121  # idle for longer than the timeout
    agent.check()
    assert agent.terminated.is_set() and fake.pods[pod.id]["status"] == "EXITED"  # no GPU billing
    stops = [body for method, path, body in fake.requests if body == {"action": "stop"}]
    assert len(stops) == 2 and "Stopping failed" not in caplog.text and "rpa_STOP_ONLY" not in caplog.text


def test_the_budget_holds_with_the_price_from_the_environment_when_runpod_cannot_be_read(fake, pod):
    now = [0.0]
    config = AgentConfig.from_env({"RUNPOD_POD_ID": pod.id, "RUNPOD_API_KEY": "rpa_unreadable",
                                   "SM_HEARTBEAT_TOKEN": TOKEN, "SM_BUDGET_USD": "1", "SM_PRICE_PER_HOUR": "3600"})
    agent = PodAgent(config, RunPodRest("rpa_unreadable"), clock=lambda: now[0])
    now[0] = 0.25
    agent.check()  # RunPod refuses the key: the cost is not read, the quoted price is used
    assert agent.status()["reason"] == "its budget of $1 is spent"
    assert agent.status()["terminates_in_s"] == pytest.approx(0.8, abs=0.05)  # $1 a second, 0.25 s gone
    unpriced = PodAgent(AgentConfig(pod.id, "k", TOKEN, budget_usd=1.0), RunPodRest("rpa_unreadable"),
                        clock=lambda: now[0])
    unpriced.check()
    assert "idle" in unpriced.status()["reason"]  # without the price the budget could not be guarded


def test_a_cost_of_0_in_runpods_answer_leaves_the_quoted_price_to_guard_the_budget(fake, pod):
    """RunPod answers 0.0 as the cost of a pod it does not bill as running (its answer lags a resume): taken as the
    price, the budget was never reached and the pod ran on to its lifetime."""
    fake.pods[pod.id]["cost"] = 0.0
    now = [0.0]
    agent = PodAgent(AgentConfig(pod.id, RUNPOD_KEY, TOKEN, budget_usd=1.0, price_per_hr=360.0),
                     RunPodRest(RUNPOD_KEY), clock=lambda: now[0])
    now[0] = 0.25
    agent.check()  # RunPod read: its pod, priced at 0
    assert agent.status()["reason"] == "its budget of $1 is spent"

def owners_heartbeat_gets_in(server, seconds: float = 20) -> bool:
    url, deadline = f"http://127.0.0.1:{server.server_port}/heartbeat", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2).ok:
                return True
        except requests.RequestException:
            time.sleep(0.5)
    return False


def test_silent_connections_cannot_crowd_out_the_owners_heartbeats(fake, pod, monkeypatch):
    """~1,000 idle sockets once took a thread each for ever and starved the heartbeats: the pod was terminated as
    idle. Now each is dropped after the time-out and beyond a cap refused at once."""
    from SegmentationMachineLib.cloud import podagent

    monkeypatch.setattr(podagent, "CONNECTION_TIMEOUT_S", 1)  # read when the agent starts serving
    threads = threading.active_count()
    server = podagent.serve(PodAgent(AgentConfig(pod.id, RUNPOD_KEY, TOKEN, port=0)), host="127.0.0.1")
    silent = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(300)]
    try:
        time.sleep(0.5)
        assert threading.active_count() < threads + 100  # 300 silent sockets, not a thread each
        assert owners_heartbeat_gets_in(server), "the owner's heartbeat never got through the silent connections"
    finally:
        for connection in silent:
            connection.close()
        server.shutdown()


def test_connections_dribbling_their_requests_cannot_crowd_out_the_owners_heartbeats(fake, pod, monkeypatch):
    """64 connections each sending a byte of a request every half second: a time-out per read never ended them, and
    no heartbeat got in while they went on (the pod would have been terminated as idle)."""
    from SegmentationMachineLib.cloud import podagent

    monkeypatch.setattr(podagent, "CONNECTION_TIMEOUT_S", 1)
    server = podagent.serve(PodAgent(AgentConfig(pod.id, RUNPOD_KEY, TOKEN, port=0)), host="127.0.0.1")
    stop = threading.Event()

    def dribble(connection):
        with connection:
            for byte in b"POST /heartbeat HTTP/1.1\r\n" * 100:
                try:
                    connection.sendall(bytes([byte]))
                except OSError:  # dropped
                    return
                if stop.wait(0.5):
                    return

    dribblers = [threading.Thread(target=dribble, args=(socket.create_connection(("127.0.0.1", server.server_port)),))
                 for _ in range(podagent.MAX_CONNECTIONS)]
    for thread in dribblers:
        thread.start()
    try:
        time.sleep(0.5)
        assert owners_heartbeat_gets_in(server), "the owner's heartbeat never got through the dribbling connections"
    finally:
        stop.set()
        for thread in dribblers:
            thread.join(10)
        server.shutdown()


# --- a desktop user's files, and limits over all of a pod's starts ------------------------------------

def test_only_what_the_image_keeps_on_the_volume_counts_as_nothing_of_the_users(tmp_path):
    assert not holds_user_files(tmp_path / "no-volume")
    for folder in ("inbox/upload", "exports", "scenes", "nninteractive/huggingface", AGENT_FOLDER, ".uploads",
                   ".inbox-state/0123", "lost+found"):  # what the entrypoint, the server, the agent and mkfs make
        (tmp_path / folder).mkdir(parents=True)
    for file in ("nninteractive/huggingface/weights.bin", f"{AGENT_FOLDER}/running.json", ".uploads/ab12.part",
                 ".inbox-state/0123/journal.json"):
        (tmp_path / file).write_bytes(b"x")
    assert not holds_user_files(tmp_path)
    (tmp_path / "scenes/skull.mrb").write_bytes(b"PK")
    assert holds_user_files(tmp_path)
    (tmp_path / "scenes/skull.mrb").unlink()
    (tmp_path / "notes.txt").symlink_to("/nowhere")  # anything else at the top is the user's, even a broken link
    assert holds_user_files(tmp_path)


def test_a_desktop_pod_holding_the_users_files_is_stopped_and_only_one_without_is_terminated(fake, backend, pod,
                                                                                            tmp_path):
    """RunPod deletes a pod's own volume with it: a desktop user's export must not go with it. A network volume
    outlives the pod: that pod is terminated, its files stay."""
    networked = new_pod(backend, fake, tmp_path / "network-volume", network_volume="nv-skulls")
    empty = new_pod(backend, fake, tmp_path / "empty-volume")
    for kept in (pod, networked):
        export = fake.volumes[kept.id] / "exports" / "skull" / "skull.stl"
        export.parent.mkdir(parents=True)
        export.write_bytes(b"solid skull\nendsolid skull\n")
    for folder in ("inbox", "exports", "scenes", "nninteractive"):  # what the image makes, with nothing of the user's
        (fake.volumes[empty.id] / folder).mkdir()
    (fake.volumes[empty.id] / "nninteractive/weights.bin").write_bytes(b"\0" * 1024)
    kept_log, networked_log, emptied_log = [agent.log() for agent in [
        RunningAgent(fake, p.id, SM_MODE="desktop", SM_ACTIVITY_PORTS=free_port(), SM_IDLE_TIMEOUT_S=1.5)
        for p in (pod, networked, empty)]]
    assert fake.pods[pod.id]["status"] == "EXITED"  # no GPU billing, the volume kept
    assert (tmp_path / "volume/exports/skull/skull.stl").read_bytes().startswith(b"solid skull")
    assert f"Stopping pod {pod.id}: nothing has used it for 1.5 s (idle timeout)" in kept_log
    assert ("are kept, and its 50 GB volume costs $10.00/month until it is terminated, and is "
            + KEPT_WHILE_CREDIT) in kept_log
    assert "Terminating" not in kept_log
    assert networked.id not in fake.pods and (tmp_path / "network-volume/exports/skull/skull.stl").exists()
    assert f"Terminating pod {networked.id}" in networked_log and "stay on network volume nv-skulls" in networked_log
    assert empty.id not in fake.pods and not (tmp_path / "empty-volume").exists()  # gone, with its volume
    assert f"Terminating pod {empty.id}: nothing has used it" in emptied_log


def test_the_budget_and_lifetime_are_totals_over_stops_and_resumes(fake, backend, tmp_path):
    """Whether RunPod's runtime.uptime counts from the last start or from create (its docs do not say), a resumed pod
    continues its budget and lifetime: it does not get them afresh."""
    now = [1000.0]
    fake.clock = lambda: now[0]
    fake.boot_s = fake.ports_s = fake.server_s = 0
    for per_start, limit, reason in [(True, {"budget_usd": 0.69}, "its budget of $0.69 is spent"),
                                     (True, {"max_lifetime_s": 3600}, "its maximum lifetime of 60 min is reached"),
                                     (False, {"budget_usd": 0.69}, "its budget of $0.69 is spent")]:
        fake.uptime_per_start = per_start
        volume = tmp_path / f"volume-{len(fake.volumes) + len(fake.ended)}"
        pod = new_pod(backend, fake, volume)  # an RTX 4090 at $0.69/h: the budget lasts an hour
        config = AgentConfig(pod.id, RUNPOD_KEY, TOKEN, idle_timeout_s=10 ** 6, poll_s=60, workspace=str(volume),
                             **limit)
        first = PodAgent(config, RunPodRest(RUNPOD_KEY), clock=lambda: now[0])
        first.check()
        now[0] += 2400  # 40 minutes of work
        first.check()
        assert first.status()["terminates_in_s"] == pytest.approx(1200, abs=1)
        backend.stop(pod.id)  # the container and its agent go
        now[0] += 86400
        backend.resume(pod.id)  # the next day: a new container, a new agent
        second = PodAgent(config, RunPodRest(RUNPOD_KEY), clock=lambda: now[0])
        second.check()
        assert second.status()["terminates_in_s"] == pytest.approx(1200, abs=1), (per_start, limit)
        assert second.status()["reason"] == reason
        now[0] += 1201
        second.check()
        assert pod.id not in fake.pods, (per_start, limit)  # server mode: terminated after an hour in all
    other = new_pod(backend, fake, tmp_path / "network-volume-reused")  # the kept time is its own pod's only
    (tmp_path / "network-volume-reused" / AGENT_FOLDER / "running.json").write_text(
        json.dumps({"pod_id": "pod-before", "running_s": 3000}))
    fresh = PodAgent(AgentConfig(other.id, RUNPOD_KEY, TOKEN, idle_timeout_s=10 ** 6, max_lifetime_s=3600,
                                 workspace=str(tmp_path / "network-volume-reused")), RunPodRest(RUNPOD_KEY),
                     clock=lambda: now[0])
    fresh.check()
    assert fresh.status()["terminates_in_s"] == pytest.approx(3600, abs=1)


def test_the_desktop_shows_when_its_pod_stops_and_that_the_files_stay(fake, backend, pod):
    """The agent's notice, shown by the desktop's own script (sm-pod-notices, as xstartup runs it) with xmessage on a
    real X server: the only warning a user at the pod's desktop sees."""
    if not shutil.which("Xvfb") or not shutil.which("xmessage"):
        pytest.skip("Xvfb and xmessage are not installed (scripts/test.sh installs xvfb and x11-utils)")
    number = next(n for n in range(50, 100) if not Path(f"/tmp/.X{n}-lock").exists())
    display = f":{number}"
    xvfb = subprocess.Popen(["Xvfb", display, "-nolisten", "tcp", "-noreset", "-screen", "0", "800x600x24"],
                            stderr=subprocess.DEVNULL)  # -noreset: no restart (refusing clients) as the last one leaves
    root_window = ["xwininfo", "-root", "-children", "-display", display]
    for _ in range(100):
        if subprocess.run(root_window, capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    (fake.volumes[pod.id] / "scenes").mkdir()
    (fake.volumes[pod.id] / "scenes" / "skull.mrb").write_bytes(b"PK")  # a scene saved where Slicer saves
    notice = fake.volumes[pod.id] / AGENT_FOLDER / "notice"
    notice.write_text("1000\nleft by an earlier start\n")  # withdrawn by the new agent, and long past anyway
    fake.uptime_per_start = True
    backend.stop(pod.id)
    backend.resume(pod.id)  # its lifetime counts from here: the pod's age before does not eat into the test's
    watcher = subprocess.Popen([str(NOTICES)], start_new_session=True, env={
        "PATH": os.environ["PATH"], "DISPLAY": display, "SM_POD_NOTICE": str(notice), "SM_POD_NOTICE_EVERY_S": "0.2"})
    try:
        agent = RunningAgent(fake, pod.id, SM_MODE="desktop", SM_ACTIVITY_PORTS=free_port(), SM_IDLE_TIMEOUT_S=60,
                             SM_MAX_LIFETIME_S=10, SM_WARNING_S=7)
        heartbeat, shown, window = Heartbeat(agent.url, TOKEN), "", ""
        while agent.process.poll() is None and not (shown and window):
            heartbeat.beat()  # a client is connected: only the lifetime ends this pod
            shown = subprocess.run(["ps", "-ww", "-o", "args=", "--ppid", str(watcher.pid)], capture_output=True,
                                   text=True).stdout  # the xmessage the script started, with its text
            shown = shown if "xmessage" in shown else ""
            window = subprocess.run(root_window, capture_output=True, text=True).stdout
            window = window if "this pod ends soon" in window else ""
            time.sleep(0.2)
        assert heartbeat.beat() and "The pod stops in" in heartbeat.warning  # connected clients are told too
        assert "The pod stops in 0." in shown, shown
        assert "its maximum lifetime of 10 s is reached (at " in shown and " UTC)." in shown
        assert f"Your files in {fake.volumes[pod.id]} are kept: its 50 GB volume costs $10.00/month" in shown
        assert "earlier start" not in shown and window, "the notice is a window on the desktop"
        log = agent.log()
        assert fake.pods[pod.id]["status"] == "EXITED" and f"Stopping pod {pod.id}: its maximum lifetime" in log
    finally:
        os.killpg(watcher.pid, 9)  # the script and the xmessage it started
        xvfb.terminate()  # not killed: it removes its lock and socket
        xvfb.wait()
        watcher.wait()


# --- --wipe-at-end: a desktop pod's uploaded DICOM deleted before its agent ends it ------------------------------

def wiper(volume: Path, run: Path) -> subprocess.Popen:
    """The wiper as the image runs it (the desktop user's program), its two folders under run."""
    for side in ("agent", "wiper"):
        (run / side).mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "SegmentationMachineLib.cloud.wipe"], stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "SM_WORKSPACE": str(volume),
                                               "SM_WIPE_REQUEST": str(run / "agent/wipe"),
                                               "SM_WIPE_ANSWER": str(run / "wiper/wiped")})
    RunningAgent.started.append(type("Started", (), {"process": process}))  # killed after the test too
    return process


def uploaded(volume: Path, outside: Path):
    """What a desktop user leaves on the volume: a CT series dropped into the inbox (a folder named after the
    patient), the upload page's part file, the inbox's journal and an unpacked zip's slice, Slicer's DICOM database
    (its copy of a slice, its index of patients), and links planted in the inbox to files outside it."""
    from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series

    write_ct_series(volume / "inbox/Doe Jane", make_phantom(shape=(3, 16, 16)).hu, 1.5,
                    [(0.0, 0.0, z) for z in (0.0, 2.0, 4.0)], "uploaded")
    for path in (".uploads/ab12.part", ".inbox-state/0123/journal.sqlite", ".inbox-state/0123/unpacked/CT1.dcm",
                 ".desktop/SlicerDICOMDatabase/ctkDICOM.sql", ".desktop/SlicerDICOMDatabase/dicom/1.2.3/CT1.dcm"):
        (volume / path).parent.mkdir(parents=True, exist_ok=True)
        (volume / path).write_bytes(b"Doe^Jane")
    (outside / "kept").mkdir(parents=True)
    (outside / "kept/CT.dcm").write_bytes(b"not the pod's to delete")
    (volume / "inbox/a link to a file").symlink_to(outside / "kept/CT.dcm")
    (volume / "inbox/a link to a folder").symlink_to(outside / "kept", target_is_directory=True)


WIPED = ("inbox", ".uploads", ".inbox-state", ".desktop/SlicerDICOMDatabase")


def test_wipe_at_end_deletes_the_uploads_and_only_them_before_the_agent_ends_the_pod(fake, backend, pod, tmp_path):
    """A stopped desktop pod kept the uploaded DICOM on its volume, billed, until `pod down`. With SM_WIPE_AT_END the
    agent has it wiped first: a pod with exports left is stopped with them; one with nothing else is terminated. A
    wiper that does not answer leaves the pod stopped all the same, said in the log."""
    with_exports, uploads_only, no_wiper = pod, new_pod(backend, fake, tmp_path / "v2"), new_pod(backend, fake,
                                                                                               tmp_path / "v3")
    for index, started in enumerate((with_exports, uploads_only, no_wiper)):
        uploaded(fake.volumes[started.id], tmp_path / f"outside-{index}")
    volume = fake.volumes[with_exports.id]
    for path in ("exports/skull/skull.stl", "scenes/skull.mrb", ".desktop/OrcaSlicer/printer.json"):
        (volume / path).parent.mkdir(parents=True)
        (volume / path).write_bytes(b"the user's work")
    wipers = [wiper(fake.volumes[p.id], tmp_path / f"run-{p.id}") for p in (with_exports, uploads_only)]
    (tmp_path / f"run-{no_wiper.id}/agent").mkdir(parents=True)
    logs = [agent.log() for agent in [
        RunningAgent(fake, p.id, SM_MODE="desktop", SM_ACTIVITY_PORTS=free_port(), SM_IDLE_TIMEOUT_S=1.5,
                     SM_WIPE_AT_END=1, SM_WIPE_WAIT_S=2, SM_WIPE_REQUEST=tmp_path / f"run-{p.id}/agent/wipe",
                     SM_WIPE_ANSWER=tmp_path / f"run-{p.id}/wiper/wiped")
        for p in (with_exports, uploads_only, no_wiper)]]

    assert fake.pods[with_exports.id]["status"] == "EXITED", logs[0]  # its exports stay with it
    assert "Wiped the uploaded DICOM on the volume" in logs[0] and f"Stopping pod {with_exports.id}" in logs[0]
    assert [sorted(p.name for p in (volume / folder).iterdir()) for folder in WIPED] == [[]] * len(WIPED)
    assert all((volume / path).read_bytes() == b"the user's work"
               for path in ("exports/skull/skull.stl", "scenes/skull.mrb", ".desktop/OrcaSlicer/printer.json"))
    for index in range(3):  # a link is deleted as a link, never followed
        assert (tmp_path / f"outside-{index}/kept/CT.dcm").read_bytes() == b"not the pod's to delete"
    assert uploads_only.id not in fake.pods and not (tmp_path / "v2").exists()  # nothing of the user's was left
    assert f"Terminating pod {uploads_only.id}" in logs[1]

    assert fake.pods[no_wiper.id]["status"] == "EXITED" and f"Stopping pod {no_wiper.id}" in logs[2]
    assert (f"The uploaded DICOM on the volume was not all wiped (the wiper did not answer in 2 s): "
            f"`segmentation-machine pod down {no_wiper.id}` deletes the volume with it.") in logs[2]
    assert (tmp_path / "v3/inbox/Doe Jane").is_dir()
    for process in wipers:
        process.kill()
        assert "Wiped the uploaded DICOM in" in process.stderr.read()


def test_a_wipe_in_part_is_said_so_in_the_pods_log_never_said_done(fake, pod, tmp_path):
    """The pod's log is where the user learns whether the uploads went: a wiper that could not delete everything
    (here Slicer's DICOM database is a link, which is never followed) must not be logged as a wipe done."""
    volume = fake.volumes[pod.id]
    uploaded(volume, tmp_path / "outside")
    shutil.rmtree(volume / ".desktop/SlicerDICOMDatabase")
    (volume / ".desktop/SlicerDICOMDatabase").symlink_to(tmp_path / "outside/kept", target_is_directory=True)
    log = wiping_agent(fake, pod.id, tmp_path / "run", SM_IDLE_TIMEOUT_S=1.5).log()
    assert "The uploaded DICOM on the volume was not all wiped (.desktop/SlicerDICOMDatabase is not a folder (" in log
    assert "Wiped the uploaded DICOM on the volume" not in log and f"Terminating pod {pod.id}" in log
    assert pod.id not in fake.pods and (tmp_path / "outside/kept/CT.dcm").exists()  # only a link was left on it


def test_the_wiper_never_follows_a_link_in_place_of_a_folder_and_says_what_it_could_not_delete(tmp_path):
    """The desktop user owns .desktop: Slicer's DICOM database there may be a link to anywhere. Not followed; and
    what cannot be deleted is counted, never named (an upload's name may be a patient's)."""
    from SegmentationMachineLib.cloud.wipe import wipe

    volume, elsewhere = tmp_path / "volume", tmp_path / "elsewhere"
    (elsewhere / "dicom").mkdir(parents=True)
    (elsewhere / "dicom/CT.dcm").write_bytes(b"elsewhere")
    (volume / ".desktop").mkdir(parents=True)
    (volume / ".desktop/SlicerDICOMDatabase").symlink_to(elsewhere, target_is_directory=True)
    stuck = volume / "inbox/Doe Jane"
    stuck.mkdir(parents=True)
    (stuck / "CT1.dcm").write_bytes(b"Doe^Jane")
    (volume / "inbox/CT2.dcm").write_bytes(b"Doe^Jane")
    if os.geteuid() != 0:
        stuck.chmod(0o500)  # its file cannot be deleted
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode:
        pytest.skip("no way to make a folder read-only for root here (chattr +i needs ext4 and CAP_LINUX_IMMUTABLE)")
    try:
        problems = wipe(volume)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(stuck)], check=True)
        stuck.chmod(0o700)
    assert not (volume / "inbox/CT2.dcm").exists() and (stuck / "CT1.dcm").exists()  # the rest goes all the same
    assert any(problem.startswith("1 entry in inbox could not be deleted (") for problem in problems), problems
    assert (elsewhere / "dicom/CT.dcm").read_bytes() == b"elsewhere" and (volume / ".desktop/SlicerDICOMDatabase").is_symlink()
    assert any(problem.startswith(".desktop/SlicerDICOMDatabase is not a folder (") for problem in problems)
    assert not any("Doe" in problem for problem in problems)
    assert wipe(tmp_path / "no-volume") == []


def test_the_wiper_wipes_once_for_each_request_and_both_sides_files_are_readable_by_the_other_user(tmp_path):
    """The agent (smagent) and the wiper (sm) are different users: each one's file must be readable by the other,
    whatever the umask, or no wipe ever happens. The request stays on the container disk until the pod stops: a file
    uploaded after the wipe (the pod's stop failed and is tried again) is not wiped again, nor is the log filled,
    until the next request."""
    from SegmentationMachineLib.cloud.wipe import ask, serve

    volume, run = tmp_path / "volume", tmp_path / "run"
    for folder in (volume / "inbox", run / "agent", run / "wiper"):
        folder.mkdir(parents=True)
    (volume / "inbox/CT1.dcm").write_bytes(b"Doe^Jane")
    request, answer, stop = run / "agent/wipe", run / "wiper/wiped", threading.Event()
    umask = os.umask(0o077)
    wiper = threading.Thread(target=serve, args=(volume, request, answer, 0.05, stop), daemon=True)
    wiper.start()
    try:
        assert ask(request, answer, wait_s=10, poll_s=0.05) == (True, [])
        assert not (volume / "inbox/CT1.dcm").exists()
        assert all(path.stat().st_mode & 0o044 == 0o044 for path in (request, answer))
        (volume / "inbox/CT2.dcm").write_bytes(b"Doe^John")
        first = answer.read_text()
        time.sleep(0.5)  # ten of the wiper's polls
        assert (volume / "inbox/CT2.dcm").exists() and answer.read_text() == first
        assert ask(request, answer, wait_s=10, poll_s=0.05) == (True, [])
        assert not (volume / "inbox/CT2.dcm").exists()
    finally:
        os.umask(umask)
        stop.set()
        wiper.join(10)


# --- a stop the user asks for, through the agent of a pod started with the wipe -------------------------------------

def wiping_agent(fake, pod_id: str, run: Path, token: str = TOKEN, **env) -> RunningAgent:
    """A desktop pod's agent started with the wipe, and its wiper, as the image runs them (the pod's volume set)."""
    wiper(fake.volumes[pod_id], run)
    return RunningAgent(fake, pod_id, SM_MODE="desktop", SM_ACTIVITY_PORTS=free_port(), SM_WIPE_AT_END=1,
                        SM_HEARTBEAT_TOKEN=token, SM_WIPE_REQUEST=run / "agent/wipe",
                        SM_WIPE_ANSWER=run / "wiper/wiped", **env)


def test_the_pods_user_ends_a_wiping_pod_through_its_agent_with_the_heartbeat_token_only(fake, pod, tmp_path):
    """RunPod's stop cannot wipe: a client's Stop asks the agent to end the pod, which wipes first. Ending the pod is
    the owner's alone: no token, a guessed one, or the server's key (which keeps the pod running) are refused."""
    import hashlib

    volume = fake.volumes[pod.id]
    uploaded(volume, tmp_path / "outside")
    (volume / "exports").mkdir()
    (volume / "exports/skull.stl").write_bytes(b"the user's work")
    agent = wiping_agent(fake, pod.id, tmp_path / "run",
                         SM_NNI_KEY_SHA256=hashlib.sha256(b"server-key").hexdigest())
    for header in ({}, {"Authorization": "Bearer guessed-token"}, {"Authorization": "Bearer server-key"},
                   {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):
        refused = requests.post(f"{agent.url}/end", headers=header, timeout=10)
        assert refused.status_code == 401 and "ending" not in refused.json(), header
    assert Heartbeat(agent.url, "server-key").beat()  # the server's key keeps the pod running, as before
    time.sleep(1.5)  # more than one of the agent's checks
    assert fake.pods[pod.id]["status"] == "RUNNING" and (volume / "inbox/Doe Jane").is_dir()

    taken = requests.post(f"{agent.url}/end", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert taken.status_code == 202 and taken.json() == {"pod_id": pod.id, "ending": True, "wipes_first": True}
    log = agent.log()
    assert fake.pods[pod.id]["status"] == "EXITED"  # stopped: the exports stay with it
    assert [sorted(p.name for p in (volume / folder).iterdir()) for folder in WIPED] == [[]] * len(WIPED)
    assert (volume / "exports/skull.stl").read_bytes() == b"the user's work"
    assert (tmp_path / "outside/kept/CT.dcm").read_bytes() == b"not the pod's to delete"
    assert log.index("Wiped the uploaded DICOM on the volume") < log.index(
        f"Stopping pod {pod.id}: its user asked to end it.")
    assert log.count("Refused 1 request(s) to end the pod without the pod's heartbeat token") == 1  # a minute's
    assert TOKEN not in log and "guessed-token" not in log and "server-key" not in log


def stopped_from_here(fake, pod, agent, tmp_path, monkeypatch, wait_s: float):
    """A stop asked from this computer of a desktop pod started with the wipe, its agent reached through the proxy."""
    from pod_proxy import PodProxy
    from SegmentationMachineLib.cloud.cloudgpu import AGENT_PORT, CloudGpu
    from SegmentationMachineLib.cloud.podstart import PodRecords

    proxy = PodProxy(fake)
    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", proxy.template())
    proxy.route(pod.id, AGENT_PORT, agent.port)
    records = PodRecords(tmp_path / "pods.json")
    records.add(pod, time.time(), mode="desktop", secrets={"SM_HEARTBEAT_TOKEN": TOKEN}, wipe_at_end=True)
    try:
        return CloudGpu(RunPodRest(RUNPOD_KEY), records).stop_asked(pod.id, wait_s=wait_s)
    finally:
        proxy.close()


def test_a_stop_whose_agent_has_not_ended_the_pod_in_time_is_runpods_and_says_the_uploads_may_stay(fake, pod, tmp_path,
                                                                                                  monkeypatch):
    """The client's wait for the agent is bounded: a wiper that hangs must not keep the GPU billing while the user
    believes the pod stopped. RunPod stops it then, and the user is told the uploads were not wiped."""
    uploaded(fake.volumes[pod.id], tmp_path / "outside")
    run = tmp_path / "run"
    (run / "agent").mkdir(parents=True)  # no wiper answers
    agent = RunningAgent(fake, pod.id, SM_MODE="desktop", SM_ACTIVITY_PORTS=free_port(), SM_WIPE_AT_END=1,
                         SM_WIPE_WAIT_S=60, SM_WIPE_REQUEST=run / "agent/wipe", SM_WIPE_ANSWER=run / "wiper/wiped")
    began = time.monotonic()
    stopped = stopped_from_here(fake, pod, agent, tmp_path, monkeypatch, wait_s=3)
    assert 3 <= time.monotonic() - began < 15 and fake.pods[pod.id]["status"] == "EXITED"
    assert stopped.still.startswith("its 50 GB volume costs $10.00/month") and stopped.uploads == (
        f"The uploads on its volume were NOT wiped (its agent had not ended the pod after 3 s, so it was stopped "
        f"through RunPod): `segmentation-machine pod down {pod.id}` deletes them, with the volume.")
    assert (fake.volumes[pod.id] / "inbox/Doe Jane").is_dir() and (run / "agent/wipe").exists()  # it was asked


def test_a_stop_whose_agent_terminates_the_pod_is_said_ended_while_runpod_still_lists_it_terminated(
        fake, pod, tmp_path, monkeypatch):
    """With nothing of the user's left after the wipe the agent terminates the pod, which RunPod may list as
    TERMINATED for a while: that is ended, said so and forgotten here, not a wait for the pod to go from the list and
    then a stop of a pod that no longer exists."""
    from SegmentationMachineLib.cloud.cloudgpu import Stopped
    from SegmentationMachineLib.cloud.podstart import PodRecords

    uploaded(fake.volumes[pod.id], tmp_path / "outside")  # the uploads only
    fake.terminated_listed_s = 600.0
    agent = wiping_agent(fake, pod.id, tmp_path / "run")
    stopped = stopped_from_here(fake, pod, agent, tmp_path, monkeypatch, wait_s=60)
    assert f"Terminating pod {pod.id}" in agent.log() and fake.ended[pod.id]["status"] == "TERMINATED"
    assert stopped == Stopped("", "Its agent had the uploaded DICOM wiped and, with nothing of yours left on its "
                                  "volume, terminated the pod, volume and all: nothing of it bills any more.",
                              terminated=True)
    assert pod.id not in PodRecords(tmp_path / "pods.json").all()  # forgotten here


def test_a_pod_gone_as_runpod_stops_it_is_said_ended_and_a_stop_runpod_refuses_is_a_failure(fake, backend, pod,
                                                                                                tmp_path, monkeypatch):
    """Where the agent did not take the request, RunPod's stop may fail: because the agent terminated the pod just
    then (said ended, and forgotten here), or for a pod that is still there, which then bills on: that failure is
    the user's to see, never said ended."""
    from SegmentationMachineLib.cloud.cloudgpu import CloudGpu, Stopped
    from SegmentationMachineLib.cloud.podstart import PodRecords
    from SegmentationMachineLib.cloud.pods import PodsError

    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", f"http://127.0.0.1:{free_port()}/{{pod_id}}-{{port}}")  # refused
    gone, failing = pod, new_pod(backend, fake, tmp_path / "v2")
    records = PodRecords(tmp_path / "pods.json")
    read = {}
    for started in (gone, failing):
        records.add(started, time.time(), mode="desktop", secrets={"SM_HEARTBEAT_TOKEN": TOKEN}, wipe_at_end=True)
        read[started.id] = backend.get(started.id)  # running, as RunPod described it a moment before the stop
    backend.terminate(gone.id)  # by its agent, meanwhile
    fake.pods[failing.id]["status"] = "ERROR"  # its container failed meanwhile: RunPod refuses to stop it
    cloud = CloudGpu(backend, records)
    assert cloud.stop_asked(gone.id, read[gone.id], wait_s=30) == Stopped(
        "", "Its agent terminated the pod as it was being stopped: nothing of it bills any more.", terminated=True)
    assert gone.id not in records.all()
    with pytest.raises(PodsError):
        cloud.stop_asked(failing.id, read[failing.id], wait_s=30)
    assert failing.id in records.all() and fake.pods[failing.id]["status"] == "ERROR"


def test_a_stop_whose_agent_cannot_be_reached_is_runpods_at_once_and_says_the_uploads_stay(fake, pod, tmp_path,
                                                                                           monkeypatch):
    """Nothing listens where the agent should (its container died, a network that refuses): RunPod stops the pod at
    once, not after the whole wait for an agent that never took the request, and the sentence says why."""
    from SegmentationMachineLib.cloud.cloudgpu import CloudGpu
    from SegmentationMachineLib.cloud.podstart import PodRecords

    uploaded(fake.volumes[pod.id], tmp_path / "outside")
    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", f"http://127.0.0.1:{free_port()}/{{pod_id}}-{{port}}")  # refused
    records = PodRecords(tmp_path / "pods.json")
    records.add(pod, time.time(), mode="desktop", secrets={"SM_HEARTBEAT_TOKEN": TOKEN}, wipe_at_end=True)
    stopped = CloudGpu(RunPodRest(RUNPOD_KEY), records).stop_asked(pod.id, wait_s=30)
    assert fake.pods[pod.id]["status"] == "EXITED" and stopped.uploads == (
        f"The uploads on its volume were NOT wiped (its agent did not answer, so it was stopped through RunPod): "
        f"`segmentation-machine pod down {pod.id}` deletes them, with the volume.")
    assert (fake.volumes[pod.id] / "inbox/Doe Jane").is_dir()


def test_waiting_for_the_agent_to_end_its_pod_outlasts_runpods_hiccups(backend, pod):
    """RunPod failing a few reads (past the adapter's own retries) while the client waits for the agent's wipe and
    stop must not end the wait: the client would stop the pod through RunPod and say nothing was wiped, though the
    agent may have wiped it all."""
    from SegmentationMachineLib.cloud.agentend import wait_until_ended
    from SegmentationMachineLib.cloud.pods import PodsError

    class Hiccups:
        failures = 2

        def get(self, pod_id):
            if self.failures:
                self.failures -= 1
                raise PodsError("RunPod answered with a server error (502): try again in a minute.")
            return backend.get(pod_id)

    backend.stop(pod.id)  # the agent's stop, after its wipe
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    ended, listed = wait_until_ended(Hiccups(), pod.id, deadline=60.0, poll_s=5.0, sleep=sleep, clock=lambda: now[0])
    assert ended and listed.status == "EXITED" and now[0] == 15.0  # the third read, not the deadline
