"""Starting a pod: phases, readiness through the (fake) proxy, capacity fallback, time limit, records."""

import stat
import time
from datetime import datetime

import pytest

from fake_runpod import FakeRunPod
from SegmentationMachineLib.cloud.cloudgpu import CloudGpu, Limits
from SegmentationMachineLib.cloud.pods import CapacityError, PodsError, PodSpec
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


def test_no_capacity_moves_on_to_the_next_gpu_type(backend, quick, tmp_path):
    seen = []
    pod = start_pod(backend, [spec("NVIDIA RTX A5000"), spec("NVIDIA L40S")], ready_check(quick),
                    PodRecords(tmp_path / "pods.json"), seen.append, poll_s=0.1)
    assert pod.gpu == "L40S" and "no capacity for NVIDIA RTX A5000" in str(seen[-1])
    quick.no_capacity = {"NVIDIA RTX A5000", "NVIDIA L40S"}
    with pytest.raises(CapacityError, match="No capacity right now for NVIDIA RTX A5000, NVIDIA L40S"):
        start_pod(backend, [spec("NVIDIA RTX A5000"), spec("NVIDIA L40S")], ready_check(quick),
                  PodRecords(tmp_path / "other.json"), poll_s=0.1)


def test_a_start_that_is_never_ready_is_terminated_and_said(backend, quick, tmp_path):
    quick.server_s = 3600  # the server never comes up
    records = PodRecords(tmp_path / "pods.json")
    with pytest.raises(PodsError, match=r"not ready after 0 min \(still starting services\): it was terminated"):
        start_pod(backend, [spec("NVIDIA GeForce RTX 4090")], ready_check(quick), records, timeout_s=1.0, poll_s=0.1)
    assert quick.pods == {} and records.all() == {}  # nothing left billing, nothing left listed


def test_a_key_the_pod_does_not_know_is_an_error_not_a_wait(backend, quick, tmp_path):
    with pytest.raises(PodsError, match="rejected the key it was started with"):
        start_pod(backend, [spec("NVIDIA GeForce RTX 4090")], ready_check(quick, key="other"),
                  PodRecords(tmp_path / "pods.json"), poll_s=0.1, timeout_s=30)


def test_pods_started_and_not_stopped_are_listed_at_the_next_start(backend, quick, tmp_path):
    path = tmp_path / "pods.json"
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


def test_stopping_says_what_the_volume_costs_and_until_when(backend, fake, tmp_path):
    records = PodRecords(tmp_path / "pods.json")
    cloud = CloudGpu(backend, records)
    fake.graphql_retired = True  # created through v2: RunPod has no end for it
    plain = backend.create(PodSpec("NVIDIA L40S", image="x", volume_gb=80, terminate_after="2030-01-01T00:00:00Z"))
    records.add(plain, 0)
    assert cloud.stop(plain.id) == "its 80 GB volume is kept and costs $16.00/month until the pod is terminated"
    fake.graphql_retired = False
    ending = backend.create(PodSpec("NVIDIA L40S", image="x", terminate_after="2030-01-01T00:00:00Z"))
    records.add(ending, 0)
    assert cloud.stop(ending.id) == ("its 50 GB volume is kept and costs $10.00/month until RunPod terminates the "
                                     "pod at 2030-01-01 00:00 UTC (its maximum lifetime)")
    with pytest.raises(PodsError, match="RunPod cannot do that to the pod now"):
        cloud.stop(ending.id)  # 409: already stopped
