"""The pods adapter: the real `runpod` SDK against a local fake RunPod API on loopback."""

import logging

import pytest

from conftest import RUNPOD_KEY as KEY
from SegmentationMachineLib.cloud.pods import CapacityError, PodsError, PodSpec, RunPodGraphQL


def test_gpu_types_have_10_gb_or_more_cheapest_first(backend):
    secure = backend.gpu_types()
    assert [g.name for g in secure] == ["RTX A5000", "RTX 4090", "L40S"]  # the 8 GB RTX 3070 is left out
    assert [g.name for g in backend.gpu_types(cloud="COMMUNITY")] == ["RTX A5000", "RTX 4090", "L40S"]
    assert secure[0].memory_gb == 24 and secure[0].price("SECURE") == 0.27
    assert backend.account() == {"balance": 25.0, "spend_per_hr": 0}


def test_create_escapes_values_the_sdk_pastes_into_graphql(backend, fake):
    tricky = 'pa"ss\\word\nwith } and "quotes"'
    pod = backend.create(PodSpec("NVIDIA GeForce RTX 4090", image="example/sm:1", env={"SM_VNC_PASSWORD": tricky}))
    assert fake.pods[pod.id]["env"] == {"SM_VNC_PASSWORD": tricky}  # arrived intact, nothing injected
    assert pod.name.startswith("segmentation-machine-") and pod.cost_per_hr == 0.69 and not pod.runtime_ready


def test_a_pod_provisions_slowly_then_stops_resumes_and_terminates(backend, fake):
    fake.boot_s, fake.ports_s = 0.2, 0.4
    pod = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1"))
    import time
    time.sleep(0.5)
    ready = backend.get(pod.id)
    assert ready.runtime_ready and sorted(ready.ports) == [22, 8000, 8001] and ready.gpu == "L40S"
    backend.stop(pod.id)
    assert backend.get(pod.id).status == "EXITED"
    backend.resume(pod.id)
    assert backend.get(pod.id).status == "RUNNING"
    assert [p.id for p in backend.pods()] == [pod.id]
    backend.terminate(pod.id)
    assert backend.get(pod.id) is None and backend.pods() == []


def test_no_capacity_is_its_own_error(backend, fake):
    with pytest.raises(CapacityError, match="no capacity for that GPU"):
        backend.create(PodSpec("NVIDIA RTX A5000", image="example/sm:1"))
    assert fake.pods == {}


def test_a_500_after_the_pod_was_created_leaves_exactly_one_pod(backend, fake):
    fake.fail_next_create_after_creating = True
    spec = PodSpec("NVIDIA GeForce RTX 4090", image="example/sm:1")
    pod = backend.create(spec)
    assert list(fake.pods) == [pod.id] and pod.name == spec.name  # found by name, not created twice
    creates = [name for name, _ in fake.requests if name == "podFindAndDeployOnDemand"]
    assert len(creates) == 1


def test_429_is_waited_out_with_growing_pauses(backend, fake):
    fake.rate_limit_every = 2
    assert len(backend.gpu_types()) == 3 and backend.account()["balance"] == 25.0
    assert backend.sleeps and backend.sleeps[0] == 5


def test_a_rejected_key_is_a_sentence_and_no_secret_leaks(fake, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = RunPodGraphQL("rpa_WRONGKEY_do_not_print")
    with pytest.raises(PodsError, match="RunPod rejected the API key") as error:
        wrong.gpu_types()
    # Everything this test saw: the exception, its chain, and every log line.
    seen = str(error.value) + repr(error.value) + str(error.value.__cause__) + caplog.text
    assert "rpa_WRONGKEY_do_not_print" not in seen and KEY not in seen


def test_query_errors_never_carry_the_query_with_its_secrets(backend, fake):
    fake.no_capacity = {"NVIDIA L40S"}
    with pytest.raises(CapacityError) as error:
        backend.create(PodSpec("NVIDIA L40S", image="x", env={"SM_NNI_API_KEY": "secret-token-123"}))
    assert "secret-token-123" not in str(error.value) and "secret-token-123" not in repr(error.value)
    assert error.value.__suppress_context__  # raised `from None`: a traceback does not show the SDK's error


def test_no_answer_is_tried_twice_more_then_said(backend, monkeypatch):
    from nninteractive_server import free_port

    monkeypatch.setenv("RUNPOD_API_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(PodsError, match="RunPod did not answer properly"):
        backend.account()
    assert backend.sleeps == [5, 10]  # seconds, not minutes, before the user hears of it
