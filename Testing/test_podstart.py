"""Starting a pod: phases, readiness through the (fake) proxy, capacity fallback, time limit, records."""

import os
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime
from urllib.parse import urlsplit

import pytest

from conftest import RUNPOD_KEY
from fake_runpod import FakeRunPod, ends_within
from SegmentationMachineLib.cloud.cloudgpu import CloudGpu, Limits
from SegmentationMachineLib.cloud.pods import KEPT_WHILE_CREDIT, LOG_QUIET_S, CapacityError, Pod, PodsError, PodSpec
from SegmentationMachineLib.cloud.podstart import Phase, PodRecords, server_answers, start_pod

SERVER_KEY = "nni-key-for-this-pod"


def spec(gpu):
    return PodSpec(gpu, image="example/sm:1", env={"SM_NNI_API_KEY": SERVER_KEY})


def ready_check(fake: FakeRunPod, key=SERVER_KEY):
    return lambda pod: server_answers(f"{fake.url}/proxy/{pod.id}-8000", key)


@pytest.fixture
def quick(fake):
    fake.boot_s, fake.ports_s, fake.server_s = 0.3, 0.4, 0.8
    return fake


def test_phases_until_the_server_answers_an_authenticated_request(backend, quick, tmp_path):
    quick.boot_s, quick.ports_s, quick.server_s = 1.0, 1.2, 1.8  # wide gaps: each phase is seen even on a busy machine
    records = PodRecords(tmp_path / "pods.json")
    seen = []
    pod = start_pod(backend, [spec("NVIDIA GeForce RTX 4090")], ready_check(quick), records, seen.append, poll_s=0.1)
    phases = [p.phase for p in seen]
    assert phases[0] == Phase.WAITING_FOR_GPU and phases[-1] == Phase.READY
    assert Phase.PULLING_IMAGE in phases and Phase.STARTING_SERVICES in phases
    assert phases.index(Phase.PULLING_IMAGE) < phases.index(Phase.STARTING_SERVICES)
    assert seen[-1].cost_so_far > 0 and pod.id in records.all()
    assert "server ready" in str(seen[-1]) and "$" in str(seen[-1])


def test_the_proxys_503_while_it_routes_is_not_ready_but_a_full_servers_is(backend, quick, tmp_path):
    """RunPod's proxy answers 503 (as well as 502) with its own page while it routes a new pod; upstream's server
    answers 503 with its JSON detail when every session is in use: up, and checking keys."""
    quick.routing_status = 503
    pod = backend.create(spec("NVIDIA GeForce RTX 4090"))
    check = ready_check(quick)
    assert not check(pod)
    quick.server_s = 0.0
    quick.server_full = True
    assert check(pod)
    import requests  # upstream's shape (nnInteractive 2.6's app.py): a full server says when to try again

    full = requests.post(f"{quick.url}/proxy/{pod.id}-8000/claim", headers={"Authorization": f"Bearer {SERVER_KEY}"},
                         timeout=10)
    assert full.status_code == 503 and full.headers["Retry-After"] == "10"
    quick.server_full = False
    claim = requests.post(f"{quick.url}/proxy/{pod.id}-8000/claim", headers={"Authorization": f"Bearer {SERVER_KEY}"},
                          timeout=10).json()
    assert set(claim) == {"lease_token", "idle_timeout_seconds", "liveness_timeout_seconds", "max_sessions"}


def test_no_capacity_moves_on_to_the_next_gpu_type(backend, quick, tmp_path):
    seen = []
    pod = start_pod(backend, [spec("NVIDIA RTX A5000"), spec("NVIDIA L40S")], ready_check(quick),
                    PodRecords(tmp_path / "pods.json"), seen.append, poll_s=0.1)
    assert pod.gpu == "NVIDIA L40S" and "no capacity for NVIDIA RTX A5000" in str(seen[-1])
    quick.no_capacity = {"NVIDIA RTX A5000", "NVIDIA L40S"}
    with pytest.raises(CapacityError, match="No capacity right now for NVIDIA RTX A5000, NVIDIA L40S"):
        start_pod(backend, [spec("NVIDIA RTX A5000"), spec("NVIDIA L40S")], ready_check(quick),
                  PodRecords(tmp_path / "other.json"), poll_s=0.1)


def requested(fake, method, ending) -> int:
    """Where in the fake's requests the first one of method to a path ending so is."""
    return next(i for i, (m, path, _) in enumerate(fake.requests) if m == method and urlsplit(path).path.endswith(ending))


def test_a_start_that_is_never_ready_keeps_its_streamed_log_within_seconds_and_is_terminated(backend, quick, tmp_path):
    quick.server_s = 3600  # the server never comes up; RunPod's log stream never ends either
    records = PodRecords(tmp_path / "pods.json")
    started = time.monotonic()
    with pytest.raises(PodsError, match=r"not ready after 0 min \(still starting services\): it was terminated "
                                        r"\(cost \$0\.00\); its container log is in .*logs/pod0001x\.log; try another"):
        ends_within(30, start_pod, backend, [spec("NVIDIA GeForce RTX 4090")], ready_check(quick), records,
                    timeout_s=1.0, poll_s=0.1)
    assert time.monotonic() - started < 1.0 + LOG_QUIET_S + 3  # the time-out, the log's quiet end, some slack
    assert quick.pods == {} and records.all() == {}  # nothing left billing, nothing left listed
    assert requested(quick, "GET", "/logs") < requested(quick, "POST", "/action")  # the log while RunPod has it
    assert "starting the container" in (tmp_path / "logs" / "pod0001x.log").read_text()


@pytest.mark.parametrize("state", ["ERROR", "EXITED"])
def test_a_pod_that_fails_or_is_stopped_while_starting_ends_the_wait_at_once(backend, quick, tmp_path, state):
    quick.fails_as = state
    records = PodRecords(tmp_path / "pods.json")

    def careless_container(progress):  # a container that prints its secrets, and the account's key
        if progress.pod_id in quick.pods:
            quick.pods[progress.pod_id]["log"].append(f"env: SM_NNI_API_KEY={SERVER_KEY} RUNPOD_API_KEY={RUNPOD_KEY}")

    started = time.monotonic()
    with pytest.raises(PodsError) as error:
        ends_within(30, start_pod, backend, [spec("NVIDIA GeForce RTX 4090")], ready_check(quick), records,
                    careless_container, poll_s=0.1, details={"secrets": {"SM_NNI_API_KEY": SERVER_KEY}})
    assert time.monotonic() - started < quick.boot_s + LOG_QUIET_S + 3  # not the 10 min of the ready time-out
    assert str(error.value).startswith(f"RunPod reports the pod as {state} while pulling the image: it was "
                                       "terminated (cost $0.00); its container log is in ")
    assert quick.pods == {} and records.all() == {}
    saved = (tmp_path / "logs" / "pod0001x.log").read_text()
    assert "env: SM_NNI_API_KEY=*** RUNPOD_API_KEY=***" in saved and SERVER_KEY not in saved and RUNPOD_KEY not in saved
    assert ("CUDA error" in saved) == (state == "ERROR")


def test_a_log_that_cannot_be_kept_is_a_warning_not_instead_of_the_sentence(backend, quick, tmp_path, caplog):
    quick.fails_as = "ERROR"
    (tmp_path / "logs").write_text("a file where the logs folder would be")
    with pytest.raises(PodsError, match=r"as ERROR while pulling the image: it was terminated \(cost \$0\.00\); try"):
        ends_within(30, start_pod, backend, [spec("NVIDIA GeForce RTX 4090")], ready_check(quick),
                    PodRecords(tmp_path / "pods.json"), poll_s=0.1)
    assert quick.pods == {} and "The log of pod pod0001x was not kept (FileExistsError)" in caplog.text


@pytest.mark.parametrize("state, said", [
    ("EXITED", "it was stopped again, its volume kept; its container log is in "),  # e.g. RunPod stopped it again
    ("ERROR", "and it could not be stopped (RunPod cannot do that to the pod now: Pod pod0001x is ERROR: stop is not valid now): "
              "terminate it with `segmentation-machine pod down pod0001x`")])
def test_a_resume_that_fails_keeps_the_volume(backend, quick, tmp_path, state, said):
    records = PodRecords(tmp_path / "pods.json")
    cloud = CloudGpu(backend, records)
    pod = backend.create(spec("NVIDIA L40S"))
    records.add(pod, 0, mode="server", secrets={"SM_NNI_API_KEY": SERVER_KEY, "SM_HEARTBEAT_TOKEN": "beat"})
    backend.stop(pod.id)
    quick.pods[pod.id]["fails_as"] = state  # nothing to wait for
    with pytest.raises(PodsError) as error:
        ends_within(30, cloud.resume, pod.id, sleep=lambda s: time.sleep(0.1))
    assert f"RunPod reports the pod as {state} while pulling the image" in str(error.value) and said in str(error.value)
    assert quick.pods[pod.id]["status"] == state and pod.id in records.all()  # the volume is the user's


def test_a_key_the_pod_does_not_know_is_an_error_not_a_wait(backend, quick, tmp_path):
    with pytest.raises(PodsError, match="rejected the key it was started with"):
        start_pod(backend, [spec("NVIDIA GeForce RTX 4090")], ready_check(quick, key="other"),
                  PodRecords(tmp_path / "pods.json"), poll_s=0.1, timeout_s=30)


def test_pods_started_and_not_stopped_are_listed_at_the_next_start(backend, quick, tmp_path):
    path = tmp_path / "pods.json"
    quick.list_lag_s = 60.0  # lags through the test however slow the machine
    pod = start_pod(backend, [spec("NVIDIA GeForce RTX 4090")], ready_check(quick), PodRecords(path), poll_s=0.1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    later = PodRecords(path)  # e.g. Slicer restarted after a crash
    assert backend.pods() == []  # RunPod's list still lags behind the create: the record is not taken for gone
    [(listed, cost)] = later.still_running(backend)
    assert listed.id == pod.id and cost >= 0
    backend.terminate(pod.id)
    assert later.still_running(backend) == [] and later.all() == {}


def test_ready_needs_a_heartbeat_the_agent_accepted_and_a_failed_start_keeps_its_log(backend, quick, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", quick.proxy_template())
    quick.agent_answers = False  # the server answers, but nothing guards the pod: not ready
    records = PodRecords(tmp_path / "pods.json")
    cloud = CloudGpu(backend, records)
    [l40s] = [g for g in backend.gpu_types() if g.name == "L40S"]
    with pytest.raises(PodsError, match=r"still starting services\): it was terminated .*container log is in") as error:
        cloud.up([l40s], timeout_s=2.0, sleep=lambda s: time.sleep(0.1))
    [log] = (tmp_path / "logs").iterdir()
    assert str(log) in str(error.value) and "pulling image" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and quick.pods == {} and records.all() == {}
    quick.agent_answers = True
    started = cloud.up([l40s], limits=Limits(max_lifetime_s=3600), timeout_s=30, sleep=lambda s: time.sleep(0.1))
    created = quick.pods[started.pod_id]
    assert created["heartbeats"] >= 1 and created["env"]["SM_PRICE_PER_HOUR"] == "0.86"
    assert records.get(started.pod_id)["terminate_after"] == created["terminateAfter"]  # RunPod's own end is set
    end = datetime.fromisoformat(created["terminateAfter"].replace("Z", "+00:00")).timestamp()
    assert 3600 + 30 - 60 < end - time.time() <= 3600 + 30  # start timeout + lifetime: the agent ends it first


def test_a_running_pod_whose_runtime_is_not_reported_is_asked_itself_and_not_terminated(backend, quick, tmp_path,
                                                                                         monkeypatch, capsys):
    """v2's schema lets a RUNNING pod's runtime (uptime, ports) be null: readiness is the proxy's answer, so a start
    that waited for a runtime timed out and terminated a working pod. Its cost since its start is then unknown, not
    $0.00."""
    from SegmentationMachineLib.cli.pod import _cost_of, _pod_line

    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", quick.proxy_template())
    quick.runtime_reported = False
    cloud = CloudGpu(backend, PodRecords(tmp_path / "pods.json"))
    [l40s] = [g for g in backend.gpu_types() if g.name == "L40S"]
    started = cloud.up([l40s], limits=Limits(max_lifetime_s=3600), timeout_s=5, sleep=lambda s: time.sleep(0.1))
    pod = backend.get(started.pod_id)
    assert pod.status == "RUNNING" and not pod.runtime_ready and started.pod_id in quick.pods
    assert "0 min" not in _pod_line(pod) and "$0.86/h" in _pod_line(pod) and _cost_of(pod) == ""


def test_hosts_on_drivers_newer_than_any_list_we_could_write_still_take_our_pods(backend, quick, tmp_path,
                                                                                 monkeypatch):
    """RunPod matches a create's CUDA versions exactly: a list ending at 13.0 once made every RTX 4090 host (13.1 and
    13.2 drivers) look like no capacity. The catalog, asked with our floor, names what the hosts run."""
    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", quick.proxy_template())
    cloud = CloudGpu(backend, PodRecords(tmp_path / "pods.json"))
    [rtx_4090] = cloud.gpu_choices("RTX 4090")
    assert rtx_4090.cuda_versions == ("13.1", "13.2")  # its 12.4 hosts cannot run the image's torch
    started = cloud.up([rtx_4090], limits=Limits(max_lifetime_s=3600), timeout_s=30, sleep=lambda s: time.sleep(0.1))
    pod = quick.pods[started.pod_id]
    assert pod["gpu"]["allowedCudaVersions"] == ["13.1", "13.2"] and pod["cudaVersion"] == "13.1"  # via GraphQL
    quick.graphql_retired = 410  # through v2: its floor keeps the pod off the type's 12.4 hosts (RunPod may take any)
    on_v2 = cloud.up([rtx_4090], timeout_s=30, sleep=lambda s: time.sleep(0.1))
    assert quick.pods[on_v2.pod_id]["cudaVersion"] == "13.1"
    with pytest.raises(PodsError, match="no capacity"):  # what a fixed list did
        backend.create(PodSpec(rtx_4090.id, image="x", allowed_cuda_versions=["12.8", "12.9", "13.0"]))
    assert backend.create(PodSpec(rtx_4090.id, image="x", min_cuda_version="12.8")).id in quick.pods  # v2's floor


def test_stopping_says_what_the_volume_costs_and_until_when(backend, fake, tmp_path):
    records = PodRecords(tmp_path / "pods.json")
    cloud = CloudGpu(backend, records)
    fake.graphql_retired = 410  # created through v2: RunPod has no end for it
    plain = backend.create(PodSpec("NVIDIA L40S", image="x", volume_gb=80, terminate_after="2030-01-01T00:00:00Z"))
    records.add(plain, 0)
    assert cloud.stop(plain.id) == ("its 80 GB volume costs $16.00/month until the pod is terminated, and is kept "
                                    "while the account has credit (at $0 RunPod terminates pods without a network "
                                    "volume)")
    fake.graphql_retired = 0
    ending = backend.create(PodSpec("NVIDIA L40S", image="x", terminate_after="2030-01-01T00:00:00Z"))
    records.add(ending, 0)
    assert cloud.stop(ending.id) == ("its 50 GB volume costs $10.00/month until RunPod terminates the pod at "
                                     "2030-01-01 00:00 UTC (its maximum lifetime), and is " + KEPT_WHILE_CREDIT)
    assert cloud.stop(ending.id).startswith("its 50 GB volume costs $10.00/month")  # stopped already (its agent
    assert fake.pods[ending.id]["status"] == "EXITED"  # stopped it): RunPod's 409 means done, not "could not end"


# One process adding records: it says it is ready, then adds them once told to go (both at once).
ADDER = """
import sys, time
from SegmentationMachineLib.cloud.podstart import PodRecords
from SegmentationMachineLib.cloud.pods import Pod
records = PodRecords(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for i in range(40):
    records.add(Pod(f"{sys.argv[2]}{i:03d}", "n", "RUNNING", "g", 0.69, 0, True, []), time.time(), mode="server")
"""


def test_two_processes_recording_pods_at_once_lose_none(tmp_path):
    """Two Slicers, or Slicer and `pod up`, share ~/.segmentation-machine/pods.json: a record lost is a pod that is
    neither listed at the next start nor ended at quit."""
    path = tmp_path / "pods.json"
    adders = [subprocess.Popen([sys.executable, "-c", ADDER, str(path), tag], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for tag in "ab"]
    assert [adder.stdout.readline() for adder in adders] == ["ready\n"] * 2
    for adder in adders:
        adder.stdin.write("go\n")
        adder.stdin.flush()
    assert [adder.wait(120) for adder in adders] == [0, 0]
    assert len(PodRecords(path).all()) == 80


@pytest.mark.skipif(os.name == "nt", reason="fcntl's locks are POSIX")
def test_threads_recording_pods_at_once_lose_none_where_the_file_lock_is_the_processs(tmp_path, monkeypatch):
    """Over NFS, flock is emulated with fcntl's record locks, which belong to the process and do not keep its threads
    apart (pods are ended on threads of their own at quit): the threads take a lock of the process too."""
    import fcntl

    from SegmentationMachineLib.core import files

    class OverNfs:
        LOCK_EX, LOCK_NB, flock = fcntl.LOCK_EX, fcntl.LOCK_NB, staticmethod(fcntl.lockf)

    monkeypatch.setattr(files, "fcntl", OverNfs)
    records = PodRecords(tmp_path / "pods.json")

    def add(tag):
        for i in range(10):
            records.add(Pod(f"{tag}{i:03d}", "n", "RUNNING", "g", 0.69, 0, True, []), time.time(), mode="server")

    threads = [threading.Thread(target=add, args=(tag,)) for tag in "abcdef"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(records.all()) == 60
