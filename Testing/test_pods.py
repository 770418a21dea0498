"""The pods adapter: RunPod's REST v2 API over requests, against a local fake RunPod on loopback."""

import logging
import threading
import time

import pytest

from certificates import self_signed
from loopback import LoopbackServer
from conftest import RUNPOD_KEY as KEY
import fake_runpod
from fake_runpod import NO_CAPACITY, NO_FREE_GPUS, NO_RESOURCES, SOMETHING_WENT_WRONG, ends_within
from SegmentationMachineLib.cloud.cloudgpu import CloudGpu
from SegmentationMachineLib.cloud.podstart import PodRecords
from SegmentationMachineLib.cloud.pods import (CAPACITY_SENTENCE, CapacityError, PodsError, PodSpec, RunPodRest,
                                               redacted, spend_per_hr)

RTX_4090 = "NVIDIA GeForce RTX 4090"


@pytest.fixture
def virtual(fake, backend):
    """One clock for the fake's provisioning and list lag and the adapter's pauses: waits cost no real time."""
    now = [0.0]
    fake.clock = lambda: now[0]

    def sleep(seconds):
        backend.sleeps.append(seconds)
        now[0] += seconds

    backend._sleep = sleep
    return now


def creates(fake) -> list:
    return [(method, path) for method, path, _ in fake.requests
            if (method, path) == ("POST", "/v2/pods") or path == "/graphql"]


def test_only_nvidia_types_in_stock_with_16_gb_or_more_cheapest_first(backend, fake):
    secure = backend.gpu_types()
    # Left out: the 8 to 12 GB RTX 3070, 3080, 3080 Ti and 4070 Ti (cheaper, but too small for a whole-volume
    # prediction), the H100 without stock, the AMD MI300X (cheapest and largest, but no CUDA).
    assert [g.name for g in secure] == ["RTX A5000", "RTX 4090", "L40S"]
    # Stock is counted per cloud: the H100 has none on the secure cloud, some on the community cloud.
    assert [g.name for g in backend.gpu_types(cloud="COMMUNITY")] == ["RTX A5000", "RTX 4090", "L40S", "H100 SXM"]
    assert fake.requests[-1][1] == "/v2/catalog/gpus?product=POD&include=AVAILABILITY&cloud=COMMUNITY"
    assert secure[0].memory_gb == 24 and secure[0].price("SECURE") == 0.27
    everything = backend.gpu_types(min_vram_gb=0, in_stock=False)
    assert [g.name for g in everything if not g.in_stock] == ["H100 SXM"] and "MI300X" not in str(everything)


def test_the_default_gpu_skips_the_cheaper_cards_too_small_for_large_structures_but_they_can_be_named(backend):
    cloud = CloudGpu(backend)
    cheaper = [g for g in backend.gpu_types(min_vram_gb=0) if g.price("SECURE") < cloud.gpu_choices()[0].price("SECURE")]
    assert {g.memory_gb for g in cheaper} == {8, 10, 12}  # the catalog's cards between 8 and 24 GB
    assert cloud.gpu_choices()[0].name == "RTX A5000" and min(g.memory_gb for g in cloud.gpu_choices()) >= 16
    assert [g.memory_gb for g in cloud.gpu_choices("RTX 3080 Ti")] == [12]  # a user's own choice still goes


def test_create_sends_v2s_nested_body_with_values_intact(backend, fake):
    tricky = 'pa"ss\\word\nwith } and "quotes"'
    spec = PodSpec(RTX_4090, image="example/sm:1", env={"SM_VNC_PASSWORD": tricky}, min_cuda_version="12.8",
                   allowed_cuda_versions=["13.1"])  # (for GraphQL: v2 takes one of the two)
    pod = backend.create(spec)
    assert fake.pods[pod.id]["env"] == {"SM_VNC_PASSWORD": tricky}  # arrived intact, nothing injected
    [(method, path, body)] = [r for r in fake.requests if r[0] == "POST"]
    assert (method, path) == ("POST", "/v2/pods") and body == {  # CreatePodRequest, as RunPod's v2 schema has it
        "name": spec.name, "image": "example/sm:1", "cloud": "SECURE", "disk": 40,
        "gpu": {"id": RTX_4090, "count": 1, "minCudaVersion": "12.8"},
        "env": {"SM_VNC_PASSWORD": tricky}, "ports": ["8000/http", "8001/http", "22/tcp"],
        "mounts": {"persistent": {"size": 50, "path": "/workspace"}}, "startSsh": True}
    assert pod.name.startswith("segmentation-machine-") and pod.cost_per_hr == 0.69 and not pod.runtime_ready
    assert pod.status == "PROVISIONING" and pod.volume_gb == 50 and pod.volume_usd_per_month == 10.0


# What _v2_body sent before RunPod's v2 schema was read (v1's flat names, mounts as a list): every create
# after GraphQL's retirement would have failed.
BODY_BEFORE_THE_SCHEMA = {
    "name": "segmentation-machine-0badc0de", "cloudType": "SECURE", "gpu": {"id": RTX_4090, "count": 1},
    "containerDiskInGb": 40, "env": {}, "ports": ["8000/http", "8001/http", "22/tcp"],
    "mounts": [{"volumeInGb": 50, "mountPath": "/workspace"}], "supportPublicIp": False, "image": "example/sm:1"}


def test_the_body_sent_before_the_schema_was_read_is_refused_as_runpod_refuses_it(fake):
    import requests

    answer = requests.post(f"{fake.url}/v2/pods", json=BODY_BEFORE_THE_SCHEMA,
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert answer.status_code == 422 and answer.headers["Content-Type"] == "application/problem+json"
    assert answer.json()["errors"] == [
        "$: additional properties 'cloudType', 'containerDiskInGb', 'supportPublicIp' not allowed",
        "$.mounts: expected object"]
    assert fake.pods == {}


@pytest.mark.parametrize("change, status, said", [
    ({"gpu": None}, 400, "exactly one of gpu or cpu must be set"),
    ({"cpu": {"id": "cpu5c", "vcpuCount": 4}}, 400, "exactly one of gpu or cpu must be set"),
    ({"mounts": {"persistent": {"size": 50, "path": "/workspace"},
                 "network": [{"volumeId": "vol1", "path": "/workspace"}]}}, 400, "mutually exclusive"),
    ({"mounts": {"persistent": {"size": 5, "path": "/workspace"}}}, 422, "$.mounts.persistent.size: must be >= 10"),
    ({"mounts": {"persistent": {"size": 50}}}, 422, "$.mounts.persistent: missing property 'path'"),
    ({"mounts": {"network": [{"volumeId": "a", "path": "/a"}, {"volumeId": "b", "path": "/b"}]}}, 422,
     "$.mounts.network: maximum 1 items"),
    ({"image": None}, 422, "$: missing property 'image'"),
    ({"gpu": {"id": RTX_4090, "count": True}}, 422, "$.gpu.count: expected integer"),
    ({"gpu": {"id": RTX_4090, "allowedCudaVersions": ["12"]}}, 422, "does not match pattern"),
    ({"gpu": {"id": RTX_4090, "allowedCudaVersions": ["12.8"], "minCudaVersion": "12.4"}}, 400, "mutually exclusive"),
    ({"env": {"SM_IDLE_TIMEOUT_S": 900}}, 422, "$.env.SM_IDLE_TIMEOUT_S: expected string"),
    ({"cloud": "CHEAP"}, 422, "$.cloud: value must be one of SECURE, COMMUNITY"),
])
def test_the_fake_refuses_what_runpods_v2_schema_and_handler_refuse(fake, change, status, said):
    import requests

    from SegmentationMachineLib.cloud.pods import _v2_body

    body = {**_v2_body(PodSpec(RTX_4090, image="example/sm:1")), **change}
    body = {k: v for k, v in body.items() if v is not None}
    answer = requests.post(f"{fake.url}/v2/pods", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    problem = answer.json()
    assert answer.status_code == status and said in " ".join([problem["detail"], *problem.get("errors", [])])
    assert fake.pods == {}


def test_the_fake_takes_the_bodies_runpods_own_documentation_sends(fake):
    """The create examples of RunPod's v2 reference (the gpuPod example, the region-constrained deploy loop): a
    fake that refused them would be stricter than RunPod."""
    import requests

    for body in ({"name": "pytorch-training", "image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
                  "gpu": {"id": RTX_4090, "count": 1}, "disk": 50},
                 {"name": "inference-worker", "image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
                  "gpu": {"id": RTX_4090, "count": 1}, "dataCenterIds": ["EU-RO-1"], "disk": 50}):
        answer = requests.post(f"{fake.url}/v2/pods", json=body, headers={"Authorization": f"Bearer {KEY}"},
                               timeout=10)
        assert answer.status_code == 201 and answer.json()["status"] == "PROVISIONING"
        assert answer.json()["gpu"] == {"id": RTX_4090, "count": 1} and answer.json()["template"] is None


def test_a_network_volume_is_mounted_instead_of_the_pods_own_volume(backend, fake):
    pod = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1", network_volume_id="vol_abc123"))
    assert fake.requests[-1][2]["mounts"] == {"network": [{"volumeId": "vol_abc123", "path": "/workspace"}]}
    assert fake.pods[pod.id]["mounts"] == {"network": [{"volumeId": "vol_abc123", "path": "/workspace"}]}
    assert pod.volume_gb == 0  # a network volume bills on its own, not as this pod's volume
    assert pod.stopped_cost() == ("it has no volume of its own (its network volume vol_abc123 bills apart, on "
                                  "RunPod's Storage page, until you delete it there)")
    own = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1", volume_gb=20))
    assert fake.pods[own.id]["mounts"] == {"persistent": {"size": 20, "path": "/workspace"}} and own.volume_gb == 20
    with pytest.raises(PodsError, match=r"^RunPod rejected the pod's settings: Request validation failed; "
                                        r"\$\.mounts\.persistent\.size: must be >= 10\.$"):
        backend.create(PodSpec("NVIDIA L40S", image="example/sm:1", volume_gb=5))  # RunPod's floor: 10 GB


def test_a_template_is_named_and_runpod_spreads_its_settings_into_the_pod(backend, fake):
    fake.templates["tpl9x4m"] = {"image": "example/from-template:2", "ports": ["8888/http"], "disk": 80,
                                 "env": {"FROM_TEMPLATE": "1", "SM_MODE": "desktop"},
                                 "allowedCudaVersions": ["12.4"], "serverless": False}
    pod = backend.create(PodSpec("NVIDIA L40S", template_id="tpl9x4m", env={"SM_MODE": "server"}))
    body = fake.requests[-1][2]
    assert body["templateId"] == "tpl9x4m" and "image" not in body  # v2 takes the template's image
    created = fake.pods[pod.id]
    assert created["image"] == "example/from-template:2" and created["ports"] == ["8000/http", "8001/http", "22/tcp"]
    assert created["env"] == {"FROM_TEMPLATE": "1", "SM_MODE": "server"}  # merged per key, ours winning
    assert created["disk"] == 40  # what we send overrides the template's
    with pytest.raises(PodsError, match=r"^RunPod has no template nosuch that this API key can use: check the "):
        backend.create(PodSpec("NVIDIA L40S", template_id="nosuch"))


def test_a_pod_provisions_slowly_lists_late_stops_resumes_and_terminates(backend, fake, virtual):
    pod = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1"))
    assert backend.pods() == []  # the list lags behind the create; the pod itself answers at once
    virtual[0] = 1.5
    booted = backend.get(pod.id)
    assert booted.status == "RUNNING" and booted.runtime_ready and booted.ports == []  # ports come later still
    virtual[0] = 2.5
    ready = backend.get(pod.id)
    assert sorted(ready.ports) == [22, 8000, 8001] and ready.gpu == "NVIDIA L40S" and ready.uptime_s == 2
    assert [p.id for p in backend.pods()] == [pod.id]
    backend.stop(pod.id)
    assert backend.get(pod.id).status == "EXITED"
    backend.stop(pod.id)  # RunPod's 409: stopped already (its agent stopped it) counts as stopped
    assert backend.get(pod.id).status == "EXITED"
    backend.resume(pod.id)
    assert backend.get(pod.id).status == "PROVISIONING"
    with pytest.raises(PodsError, match=f"RunPod cannot do that to the pod now: Pod {pod.id} is PROVISIONING: start is "
                                        "not valid now.$"):
        backend.resume(pod.id)  # 409
    backend.terminate(pod.id)
    assert backend.get(pod.id) is None and backend.pods() == []
    backend.terminate(pod.id)  # 404: already gone counts as terminated
    with pytest.raises(PodsError, match=f"There is no pod {pod.id}"):
        backend.resume(pod.id)


@pytest.mark.parametrize("message", [NO_CAPACITY, NO_RESOURCES, NO_FREE_GPUS])
def test_every_capacity_message_is_the_capacity_sentence(backend, fake, message):
    fake.capacity_message = message
    with pytest.raises(CapacityError) as error:
        backend.create(PodSpec("NVIDIA RTX A5000", image="example/sm:1"))
    assert str(error.value) == CAPACITY_SENTENCE and fake.pods == {}


def test_a_resume_without_free_gpus_on_the_host_is_a_capacity_error(backend, fake):
    pod = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1"))
    backend.stop(pod.id)
    fake.no_capacity_on_resume = True
    with pytest.raises(CapacityError, match=rf"^The host of pod {pod.id} has no free GPU right now: try resuming it "
                                            "later, or terminate it and start a new pod"):
        backend.resume(pod.id)
    assert fake.pods[pod.id]["status"] == "EXITED"


def test_balance_and_invalid_settings_are_sentences_without_the_pods_secrets(backend, fake):
    fake.balance = 0
    with pytest.raises(PodsError, match="balance is too low. Add credit in the RunPod console"):
        backend.create(PodSpec("NVIDIA L40S", image="example/sm:1"))
    fake.balance = 25
    with pytest.raises(PodsError, match=r"refused the request \(400\): ports must be formatted as port/proto") as error:
        backend.create(PodSpec("NVIDIA L40S", image="x", ports=["8000"], env={"SM_NNI_API_KEY": "secret-token-123"}))
    assert "secret-token-123" not in str(error.value) and fake.pods == {}
    assert error.value.__suppress_context__ or error.value.__context__ is None  # no HTTP error chained to show


@pytest.mark.parametrize("status, detail", [(500, "Internal Server Error"), (502, "Bad Gateway"),
                                            (400, SOMETHING_WENT_WRONG),
                                            (200, "Created.")])  # a 2xx of another shape (no pod in it)
def test_a_create_of_unknown_outcome_looks_the_pod_up_while_the_list_lags(backend, fake, virtual, status, detail):
    fake.list_lag_s, fake.create_fault = 4.0, (status, detail)
    spec = PodSpec(RTX_4090, image="example/sm:1")
    pod = backend.create(spec)
    assert list(fake.pods) == [pod.id] and pod.name == spec.name  # found by name, not created twice
    assert len(creates(fake)) == 1 and backend.sleeps == [2, 3]  # looked twice: the list showed it after 4 s


def actions(fake) -> list:
    return [body["action"] for method, path, body in fake.requests if path.endswith("/action")]


@pytest.mark.parametrize("status, detail", [(500, "Internal Server Error"), (400, SOMETHING_WENT_WRONG)])
def test_an_action_of_unknown_outcome_looks_the_pod_up_before_trying_again(backend, fake, virtual, status, detail):
    """RunPod: after "something went wrong" or a server error the action may have happened. A stop reported as
    failed when it happened sends a user to terminate (the volume lost); a resume so reported bills unseen."""
    pod = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1"))
    fake.action_fault = (status, detail)
    backend.stop(pod.id)
    assert fake.pods[pod.id]["status"] == "EXITED" and actions(fake) == ["stop"]
    fake.action_fault = (status, detail)
    backend.resume(pod.id)
    assert fake.pods[pod.id]["status"] == "RUNNING" and actions(fake) == ["stop", "start"]
    fake.action_fault = (status, detail)
    backend.terminate(pod.id)
    assert backend.get(pod.id) is None and actions(fake) == ["stop", "start", "terminate"] and backend.sleeps == []


def test_an_action_that_happened_but_shows_late_is_not_reported_failed(backend, fake, virtual, monkeypatch):
    """The pod looked up after the unclear answer still shows it running; the stop sent again is refused (409) as not
    valid now: a second look shows it happened."""
    pod = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1"))
    stale = [backend.get(pod.id)]  # RUNNING: as RunPod may still describe it just after the stop
    real_get = backend.get
    monkeypatch.setattr(backend, "get", lambda pod_id: stale.pop() if stale else real_get(pod_id))
    fake.action_fault = (500, "Internal Server Error")
    backend.stop(pod.id)
    assert fake.pods[pod.id]["status"] == "EXITED" and actions(fake) == ["stop", "stop"]


def test_an_action_that_did_not_happen_is_sent_again_and_one_never_confirmed_is_a_sentence(backend, fake, virtual,
                                                                                         monkeypatch):
    pod = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1"))
    real_act = fake._act
    refused = iter([True])

    def fails_first(pod_, action, key):  # the first stop answers 502 before RunPod acted on it
        if next(refused, False):
            raise fake_runpod._Failure(502, "Bad Gateway")
        return real_act(pod_, action, key)

    monkeypatch.setattr(fake, "_act", fails_first)
    backend.stop(pod.id)
    assert fake.pods[pod.id]["status"] == "EXITED" and actions(fake) == ["stop", "stop"] and backend.sleeps == [5]
    refused = iter([True] * 3)
    with pytest.raises(PodsError, match=rf"^RunPod did not confirm the start of pod {pod.id} \(server errors or no "
                                        r"answer\), and the pod does not show it: try again in a minute"):
        backend.resume(pod.id)
    assert fake.pods[pod.id]["status"] == "EXITED" and actions(fake)[2:] == ["start"] * 3


def test_a_pod_the_list_shows_too_late_is_terminated_as_a_twin(backend, fake, virtual):
    fake.list_lag_s, fake.create_fault = 12.0, (500, SOMETHING_WENT_WRONG)  # lags longer than the 10 s of looking
    pod = backend.create(PodSpec(RTX_4090, image="example/sm:1"))
    assert len(creates(fake)) == 2 and list(fake.pods) == [pod.id]  # the first pod, seen late, was terminated
    assert backend.sleeps == [2, 3, 5, 2]


def test_429_waits_what_retry_after_says(backend, fake):
    fake.rate_limit_every, fake.retry_after_s = 2, 3
    assert len(backend.gpu_types()) == 3 and backend.pods() == [] and backend.gpu_types()
    assert fake.rate_limited and backend.sleeps and set(backend.sleeps) == {3}


def test_a_rejected_key_is_a_sentence_and_no_secret_leaks(fake, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = RunPodRest("rpa_WRONGKEY_do_not_print")
    with pytest.raises(PodsError, match="RunPod rejected the API key") as error:
        wrong.gpu_types()
    # Everything this test saw: the exception, its chain, and every log line; and every URL asked for.
    seen = str(error.value) + repr(error.value) + str(error.value.__cause__) + caplog.text + "".join(fake.paths)
    assert "rpa_WRONGKEY_do_not_print" not in seen and KEY not in seen


def test_no_answer_is_tried_twice_more_then_said(monkeypatch):
    import socket

    from SegmentationMachineLib.cloud import pods

    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v2"
        monkeypatch.setenv("RUNPOD_REST_URL", url)
        monkeypatch.setattr(pods, "TIMEOUT_S", 0.2)
        sleeps = []
        with pytest.raises(PodsError) as error:
            RunPodRest(KEY, sleep=sleeps.append).pods()
    assert str(error.value) == f"RunPod at {url} did not answer within 0.2 s (time-out): try again in a minute."
    assert sleeps == [5, 10]  # seconds, not minutes, before the user hears of it


def test_a_certificate_this_computer_does_not_trust_is_said_at_once(monkeypatch, tmp_path):
    """A hospital proxy that inspects TLS shows its own CA's certificate: requests refuses it, and waiting or
    trying again cannot help."""
    sleeps = []
    with LoopbackServer(tls=self_signed(tmp_path, "inspecting", "127.0.0.1")) as server:
        url = f"{server.url}/v2"
        monkeypatch.setenv("RUNPOD_REST_URL", url)
        with pytest.raises(PodsError) as error:
            RunPodRest(KEY, sleep=sleeps.append).pods()
    assert str(error.value) == (f"Cannot reach RunPod at {url}: it shows a certificate this computer does not trust "
                                "(self-signed certificate); behind a proxy that inspects TLS, set REQUESTS_CA_BUNDLE "
                                "to your organisation's CA certificates.")
    assert sleeps == []


def test_terminate_after_goes_through_graphql_and_runpod_ends_the_pod(backend, fake):
    tricky = 'a"b\\c\n}'
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    pod = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1", env={"SM_VNC_PASSWORD": tricky},
                                 terminate_after=end))
    assert creates(fake) == [("POST", "/graphql")] and fake.pods[pod.id]["terminateAfter"] == end
    assert fake.pods[pod.id]["env"] == {"SM_VNC_PASSWORD": tricky}  # a variable: nothing pasted into the query
    assert pod.gpu == "NVIDIA L40S" and pod.status == "PROVISIONING" and pod.terminate_after == end  # described by v2
    fake.wall = lambda: time.time() + 3601  # RunPod's clock passes terminateAfter
    assert backend.get(pod.id) is None and fake.pods == {}


@pytest.mark.parametrize("cloud, public_ip", [("COMMUNITY", True), ("SECURE", False)])
def test_a_community_pod_asks_for_the_public_ip_its_tcp_port_needs(backend, fake, cloud, public_ip):
    """RunPod exposes TCP ports (22/tcp: SSH) on the community cloud only with supportPublicIp; the secure cloud has
    them anyway. A pod without them, and v2's create cannot ask (its schema has no such field), has no public port."""
    fake.boot_s = fake.ports_s = 0
    pod = backend.create(PodSpec("NVIDIA L40S", image="x", cloud=cloud, terminate_after="2030-01-01T00:00:00Z"))
    [(_, _, body)] = [r for r in fake.requests if r[1] == "/graphql"]
    assert body["variables"]["input"]["supportPublicIp"] is public_ip
    [ssh] = [p for p in fake._view(fake.pods[pod.id])["runtime"]["ports"] if p["private"] == 22]
    assert ssh["public"] and ssh["ip"]
    fake.graphql_retired = 410
    unexposed = backend.create(PodSpec("NVIDIA L40S", image="x", cloud="COMMUNITY"))  # through v2
    [ssh] = [p for p in fake._view(fake.pods[unexposed.id])["runtime"]["ports"] if p["private"] == 22]
    assert ssh["public"] is None and ssh["ip"] is None


@pytest.mark.parametrize("gone", [410, 404])
def test_graphql_capacity_errors_and_its_retirement(backend, fake, gone, caplog):
    end = "2030-01-01T00:00:00Z"
    with pytest.raises(CapacityError):
        backend.create(PodSpec("NVIDIA RTX A5000", image="x", terminate_after=end))
    fake.graphql_retired = gone  # 2027: /graphql is gone, v2 creates (without a server-side end)
    pod = backend.create(PodSpec("NVIDIA L40S", image="x", terminate_after=end, network_volume_id="vol_abc123"))
    assert creates(fake)[-2:] == [("POST", "/graphql"), ("POST", "/v2/pods")]
    assert fake.pods[pod.id]["terminateAfter"] is None and pod.terminate_after is None
    assert fake.pods[pod.id]["mounts"] == {"network": [{"volumeId": "vol_abc123", "path": "/workspace"}]}
    assert (f"RunPod's GraphQL API is gone ({gone}): the pod is created through its REST API, without RunPod's own "
            "end at the maximum lifetime (its agent still ends it).") in caplog.text  # said, not silent


def wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end
        time.sleep(0.05)


def test_the_log_stream_that_never_ends_is_read_until_quiet_and_closed(backend, fake):
    """RunPod streams the log (SSE) and keeps the stream open with keep-alives: the backfill is what we get."""
    pod = backend.create(PodSpec("NVIDIA L40S", image="example/sm:1"))
    fake.pods[pod.id]["log"].append(f"echoed by a careless script: {KEY}")
    started = time.monotonic()
    text = ends_within(10, backend.logs, pod.id, quiet_s=1.0)
    assert 1.0 <= time.monotonic() - started < 4  # quiet for 1 s (only keep-alives came): the backfill is over
    assert text == "[system] pulling image example/sm:1\nstarting the container\nechoed by a careless script: ***"
    # (the API key is never kept, not even in the user's own file)
    wait_for(lambda: fake.log_streams == 0)  # the stream was closed behind us, not left open
    fake.logs_as_json = True  # as RunPod's API answered before it streamed: read too
    assert ends_within(10, backend.logs, pod.id, quiet_s=1.0).startswith("pulling image example/sm:1\nstarting")
    with pytest.raises(PodsError, match=r"RunPod refused the request \(404\): Pod pod9999x not found"):
        ends_within(10, backend.logs, "pod9999x")


def test_a_log_that_keeps_coming_is_cut_at_the_deadline_or_at_its_last_lines(backend, fake):
    pod = backend.create(PodSpec("NVIDIA L40S", image="x"))
    log = fake.pods[pod.id]["log"]
    log += [f"line {i}" for i in range(500)]
    assert ends_within(10, backend.logs, pod.id, max_lines=50).splitlines() == [f"line {i}" for i in range(450, 500)]
    crash_loop = threading.Event()

    def keep_logging():  # a container restarting for ever: a line every 0.1 s, never quiet
        while not crash_loop.wait(0.1):
            log.append("RuntimeError: CUDA error")

    threading.Thread(target=keep_logging, daemon=True).start()
    try:
        started = time.monotonic()
        text = ends_within(10, backend.logs, pod.id, within_s=1.5, quiet_s=1.0, max_lines=1000)
        assert 1.5 <= time.monotonic() - started < 6 and text.endswith("RuntimeError: CUDA error")  # not the 10 s
    finally:
        crash_loop.set()
    wait_for(lambda: fake.log_streams == 0)


def test_graphqls_create_keeps_the_cuda_versions_and_names_a_low_balance(backend, fake):
    """Every start from the panel or `pod up` has an end, so goes through GraphQL: what v2 is checked for holds
    there too."""
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    pod = backend.create(PodSpec("NVIDIA L40S", image="x", terminate_after=end, allowed_cuda_versions=["12.8"]))
    assert creates(fake) == [("POST", "/graphql")] and fake.pods[pod.id]["gpu"]["allowedCudaVersions"] == ["12.8"]
    fake.balance = 0
    with pytest.raises(PodsError, match=r"^RunPod refused: the account's balance is too low. Add credit"):
        backend.create(PodSpec("NVIDIA L40S", image="x", terminate_after=end))


def test_the_fake_graphql_refuses_an_input_field_runpods_does_not_define(backend, fake, monkeypatch):
    """As GraphQL does, before anything runs: the check behind the test above."""
    from SegmentationMachineLib.cloud import pods

    real = pods._graphql_input
    monkeypatch.setattr(pods, "_graphql_input", lambda spec: {**real(spec), "minCudaVersion": "12.8"})  # v2's only
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    with pytest.raises(PodsError, match=r'\(400\): Variable "\$input" got invalid value; Field "minCudaVersion" is not '
                                        r'defined by type "PodFindAndDeployOnDemandInput"'):
        backend.create(PodSpec("NVIDIA L40S", image="x", terminate_after=end))
    assert fake.pods == {}


def test_a_terminated_pod_is_listed_as_terminated_for_a_while_and_counts_as_gone(backend, fake, virtual):
    import requests

    pod = backend.create(PodSpec("NVIDIA L40S", image="x"))
    virtual[0] = 3.0
    backend.terminate(pod.id)
    listed = requests.get(f"{fake.url}/v2/pods", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert [(p["id"], p["status"]) for p in listed["pods"]] == [(pod.id, "TERMINATED")]  # RunPod still lists it
    assert backend.get(pod.id) is None and backend.pods() == [] and backend.named(pod.name) == []
    backend.terminate(pod.id)  # 409 for a TERMINATED pod: already done
    with pytest.raises(PodsError, match=f"There is no pod {pod.id} on this account"):
        backend.stop(pod.id)
    virtual[0] = 3.0 + fake.terminated_listed_s
    assert requests.get(f"{fake.url}/v2/pods/{pod.id}", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=10).status_code == 404  # then it is gone


def test_runpod_text_is_shown_without_anything_that_looks_like_a_secret():
    text = ("invalid env SM_NNI_API_KEY=Zr8x-secret-value from key rpa_ABC123def456 (Authorization: Bearer eyJhbGciOi"
            ".payload) token: 0123456789abcdef0123456789abcdef01\x1b[2J; pod abc123xyz, GPU NVIDIA GeForce RTX 4090; "
            "password=hunter2; files page pw7.Q (as sent)")
    shown = redacted(text, ["Zr8x-secret-value", "pw7.Q"])  # pw7.Q: a secret only by its value, not by its look
    for secret in ("Zr8x-secret-value", "rpa_ABC123def456", "eyJhbGciOi", "0123456789abcdef0123456789abcdef01", "\x1b",
                   "hunter2", "pw7.Q"):
        assert secret not in shown
    assert "pod abc123xyz, GPU NVIDIA GeForce RTX 4090" in shown  # what helps the user stays


def test_a_pod_in_error_still_bills_a_stopped_one_only_for_its_volume(backend, fake, virtual):
    failing = backend.create(PodSpec("NVIDIA L40S", image="x"))
    fake.fails_as = "ERROR"  # its container keeps failing, and RunPod keeps restarting it
    backend.create(PodSpec("NVIDIA GeForce RTX 4090", image="x"))
    virtual[0] = 3.0
    backend.stop(failing.id)
    assert sorted(p.status for p in backend.pods()) == ["ERROR", "EXITED"]
    assert spend_per_hr(backend.pods()) == 0.69  # the pod in ERROR, not the stopped one


def test_a_graphql_that_refuses_every_try_creates_through_v2_and_says_what_that_leaves(backend, fake, virtual, caplog):
    """RunPod tightens GraphQL's rate limits ahead of retiring it: after its retries a start goes on through v2
    (without RunPod's own end, which only GraphQL sets) instead of failing."""
    fake.graphql_rate_limited = True
    pod = backend.create(PodSpec("NVIDIA L40S", image="x", terminate_after="2030-01-01T00:00:00Z"))
    assert creates(fake)[-1] == ("POST", "/v2/pods") and fake.pods[pod.id]["terminateAfter"] is None
    assert "without RunPod's own end at the maximum lifetime (its agent still ends it)" in caplog.text


def test_runpods_billing_counts_every_start_where_the_pods_uptime_counts_the_last(backend, fake, virtual):
    """v2's uptime restarts with the container (a resume, a crash restart); its billing does not."""
    pod = backend.create(PodSpec("NVIDIA L40S", image="x"))  # $0.86/h
    backend._sleep(3600)
    backend.stop(pod.id)
    backend.resume(pod.id)
    backend._sleep(1800)
    pod = backend.get(pod.id)
    assert pod.created_at and pod.cost_since_started == pytest.approx(0.43, abs=0.01)
    assert backend.billed(pod) == pytest.approx(0.86 * 1.5, abs=0.01)
    [(method, path, _)] = [r for r in fake.requests if "/billing/" in r[1]]
    assert path == f"/v2/billing/pods?podId={pod.id}&bucketSize=day&startTime={pod.created_at.replace(':', '%3A')}"


def reads_answer(fake, monkeypatch, status: int, problem: str):
    """Reading a pod (v2 GET /pods/ID) answers status with problem; everything else as before."""
    answer = fake.handle

    def reads(method, path, authorization, body):
        if method == "GET" and path.startswith("/v2/pods/"):
            return (*fake_runpod._problem(status, problem), {})
        return answer(method, path, authorization, body)

    monkeypatch.setattr(fake, "handle", reads)


def test_a_pod_graphql_made_whose_first_read_fails_is_kept_by_its_id_and_ended(backend, fake, virtual, monkeypatch,
                                                                               tmp_path):
    """GraphQL answered the new pod's id, then reading the pod got server errors: the id is kept (a retry would make a
    second pod), so the start records the pod and, failing, terminates it by its id."""
    reads_answer(fake, monkeypatch, 502, "Bad Gateway")
    end = "2030-01-01T00:00:00Z"
    pod = backend.create(PodSpec("NVIDIA L40S", image="x", terminate_after=end))
    assert (pod.id, pod.status, pod.gpu, pod.terminate_after) == (next(iter(fake.pods)), "PROVISIONING", "NVIDIA L40S",
                                                                  end)
    backend.terminate(pod.id)
    cloud = CloudGpu(backend, PodRecords(tmp_path / "pods.json"))
    with pytest.raises(PodsError, match=r"answered with a server error \(502\): try again in a minute\.$"):
        cloud.up(cloud.gpu_choices("NVIDIA L40S"), sleep=backend._sleep)
    assert len(creates(fake)) == 2 and fake.pods == {} and cloud.records.all() == {}  # one create, ended by its id


def test_a_pod_graphql_made_that_reads_as_not_there_yet_is_kept_by_its_id(backend, fake, virtual, monkeypatch):
    """GraphQL answered the new pod's id, and v2's read of it answered 404 (it lags behind the create): the id is kept,
    not looked for by name and made again."""
    reads_answer(fake, monkeypatch, 404, "Pod not found.")
    fake.list_lag_s = 3600.0  # nor listed: a look by name would not find it
    pod = backend.create(PodSpec("NVIDIA L40S", image="x", name="sm-pod-1", terminate_after="2030-01-01T00:00:00Z"))
    assert (pod.id, pod.status, pod.gpu) == (next(iter(fake.pods)), "PROVISIONING", "NVIDIA L40S")
    assert creates(fake) == [("POST", "/graphql")] and len(fake.pods) == 1


def test_an_interrupted_start_ends_its_recorded_pod_even_when_the_list_then_fails(backend, fake, virtual, monkeypatch,
                                                                                tmp_path):
    """The recorded pod is terminated by its id first: the list of pods (asked for others of its name) failing must
    not leave it running."""
    answer = fake.handle

    def list_fails(method, path, authorization, body):
        if method == "GET" and path.split("?")[0] == "/v2/pods":
            return (*fake_runpod._problem(502, "Bad Gateway"), {})
        return answer(method, path, authorization, body)

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(fake, "handle", list_fails)
    cloud = CloudGpu(backend, PodRecords(tmp_path / "pods.json"))
    with pytest.raises(PodsError, match="Starting failed, and so did terminating what it started"):
        cloud.up(cloud.gpu_choices("NVIDIA L40S"), sleep=interrupted)
    assert len(creates(fake)) == 1 and fake.pods == {} and cloud.records.all() == {}


def test_a_stop_is_never_said_done_on_a_read_that_failed():
    """A stop's answer is lost, RunPod then fails every read (a bad minute: server errors, with the user's full key),
    and the stop sent again is refused as not valid now (409: also what a pod in ERROR answers). Only a key that may
    not read the pod (403, test_podagent.py) makes that 409 a stop done: here it is RunPod's failure, said so, never
    "Stopped pod X: no GPU billing"."""
    from types import SimpleNamespace

    from SegmentationMachineLib.cloud import pods

    posts = []

    def request(method, path, body=None, create=False, url=None):
        if method == "GET":
            raise PodsError("RunPod answered with a server error (502): try again in a minute.")
        posts.append(body)
        if len(posts) == 1:
            raise pods._Unknown()
        return SimpleNamespace(status_code=409, content=b'{"detail": "not valid now"}', headers={},
                               json=lambda: {"detail": "not valid now"})

    rest = RunPodRest(KEY, sleep=lambda s: None)
    rest._request = request
    with pytest.raises(PodsError, match=r"server error \(502\)"):
        rest.stop("pod1")
    assert posts == [{"action": "stop"}]  # not sent again on a read that failed: RunPod says what happened first
