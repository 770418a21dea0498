"""Starting a pod: phases, readiness through the (fake) proxy, capacity fallback, time limit, records."""

import pytest

from fake_runpod import FakeRunPod
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
    import stat
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    later = PodRecords(path)  # e.g. Slicer restarted after a crash
    [(listed, cost)] = later.still_running(backend)
    assert listed.id == pod.id and cost >= 0
    backend.terminate(pod.id)
    assert later.still_running(backend) == [] and later.all() == {}
