"""A pod used only through the AI prompts section is kept running while used, and ends once disconnected or left
unused (a Slicer left open with the pod connected kept it to its lifetime).

The pod is started on the fake RunPod; behind a proxy that stands in for RunPod's, its services run for real: the
upstream nnInteractive server on CPU (the test model) and the pod agent (`python -m ...podagent`, idle timeout
3 s, against the fake). The section is driven as Slicer drives it: its timer ticks on an idle main thread that
keeps the GIL, so its heartbeats have to get through as they would in Slicer.
"""

import hashlib
import json
import time

import numpy as np
import pytest

from pod_proxy import PodProxy
from slicer_standins import PROMPTS_MS, IdleMainThread, drive
from test_podagent import RunningAgent
from SegmentationMachineLib.cloud import heartbeat
from SegmentationMachineLib.cloud.cloudgpu import AGENT_PORT, SERVER_PORT, CloudGpu, ports
from SegmentationMachineLib.cloud.keepalive import heartbeat_note, pod_at, pod_heartbeat
from SegmentationMachineLib.cloud.podagent import AGENT_FOLDER, AgentConfig, PodAgent
from SegmentationMachineLib.cloud.pods import PodSpec
from SegmentationMachineLib.cloud.podstart import PodRecords
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.panels.prompts import PromptsPanel
from SegmentationMachineLib.prompts.session import SegmentTarget, headless_editor

IDLE_TIMEOUT_S = 3
BEAT_S = 0.5  # the section's heartbeat interval here (60 s in use, against a 15 min idle timeout)
SHAPE = (24, 32, 32)  # K, J, I


# -- which server is a pod's, and how its agent is reached ---------------------------------------------

def test_a_pods_server_is_known_by_runpods_proxy_address_and_nothing_else_is(monkeypatch):
    monkeypatch.delenv("SM_RUNPOD_PROXY_URL", raising=False)
    assert pod_at("https://abc123xyz-8000.proxy.runpod.net") == "abc123xyz"
    assert pod_at(" https://ABC123xyz-8000.proxy.runpod.net/ ") == "ABC123xyz"  # as pasted
    for other in ("https://abc123xyz-8001.proxy.runpod.net",  # the agent's port, not the server's
                  "https://abc123xyz-8000.proxy.runpod.net.example.com", "https://example.com/abc-8000.proxy.runpod.net",
                  "https://abc-123-8000.proxy.runpod.net", "http://127.0.0.1:8000", "https://nni.hospital.example"):
        assert pod_at(other) is None, other


def test_the_heartbeat_uses_the_pods_token_when_started_here_else_the_servers_key(tmp_path, monkeypatch):
    monkeypatch.delenv("SM_RUNPOD_PROXY_URL", raising=False)
    (tmp_path / "pods.json").write_text(json.dumps({"here1": {"mode": "server", "secrets": {
        "SM_HEARTBEAT_TOKEN": "token-of-here1"}}}))
    records = PodRecords(tmp_path / "pods.json")
    mine = pod_heartbeat("https://here1-8000.proxy.runpod.net", "server-key", records)
    assert mine.url == "https://here1-8001.proxy.runpod.net/heartbeat"
    assert mine._headers == {"Authorization": "Bearer token-of-here1"}
    theirs = pod_heartbeat("https://else2-8000.proxy.runpod.net/", "server-key", records)
    assert theirs.url == "https://else2-8001.proxy.runpod.net/heartbeat"
    assert theirs._headers == {"Authorization": "Bearer server-key"}
    assert pod_heartbeat("http://127.0.0.1:8000", "server-key", records) is None


def test_the_agent_takes_the_servers_key_only_as_the_pod_image_gives_its_hash():
    config = AgentConfig.from_env({"RUNPOD_POD_ID": "p1", "RUNPOD_API_KEY": "rpa_X", "SM_HEARTBEAT_TOKEN": "token",
                                   "SM_NNI_KEY_SHA256": hashlib.sha256(b"server-key").hexdigest().upper()})
    agent = PodAgent(config, backend=object())
    assert agent.authorized("Bearer token") and agent.authorized("Bearer server-key")
    for forged in ("Bearer server-ke", "server-key", "Bearer ", "", f"Bearer {config.server_key_sha256}"):
        assert not agent.authorized(forged), forged
    older = PodAgent(AgentConfig("p1", "rpa_X", "token"), backend=object())  # an image without the hash
    assert older.authorized("Bearer token") and not older.authorized("Bearer server-key")


# -- the whole flow -----------------------------------------------------------------------------------

@pytest.fixture
def pod_proxy(fake, tmp_path, monkeypatch):
    """RunPod's proxy, and a home of the test's own (the records of pods started here live there)."""
    fake.boot_s = fake.ports_s = fake.server_s = 0
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    proxy = PodProxy(fake)
    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", proxy.template())
    monkeypatch.setattr(heartbeat, "INTERVAL_S", BEAT_S)
    yield proxy
    proxy.close()


@pytest.fixture
def nni_model(tmp_path):
    pytest.importorskip("torch")  # the server's model: only in .venv (scripts/test.sh, step 2)
    pytest.importorskip("nnInteractive")
    from nninteractive_model import write_model_folder

    return write_model_folder(tmp_path / "model")


@pytest.fixture
def running(nni_model, pod_proxy, tmp_path):
    """Starts a pod's server with its key (the real upstream server on CPU), then its agent, behind the proxy."""
    from nninteractive_server import Server

    servers, agents = [], []

    def services(pod_id, server_key, **agent_env):
        servers.append(Server(nni_model, server_key).start())
        volume = tmp_path / "volumes" / pod_id  # a folder stands in for /workspace, as test_podagent's pods have
        (volume / AGENT_FOLDER).mkdir(parents=True)
        pod_proxy.fake.volumes[pod_id] = volume
        agents.append(RunningAgent(pod_proxy.fake, pod_id, SM_IDLE_TIMEOUT_S=IDLE_TIMEOUT_S, **agent_env))
        pod_proxy.route(pod_id, SERVER_PORT, servers[-1].port)
        pod_proxy.route(pod_id, AGENT_PORT, agents[-1].port)
        return agents[-1]

    yield services
    for server in servers:
        server.stop()
    for agent in agents:
        agent.process.kill()


@pytest.fixture
def scene_parts(ctx):
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    arrays.set_volume_array(volume, np.random.default_rng(2).normal(0, 100, SHAPE).astype(np.int16), np.eye(4))
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("", "target")
    return volume, SegmentTarget(segmentation, target, headless_editor(ctx.scene, ctx.app_logic, segmentation, volume))


def prompting(panel, server_url, key, scene_parts, seconds=2.5 * IDLE_TIMEOUT_S):
    """Connect from the AI section, then a point a second until seconds have passed: more than twice the agent's
    idle timeout in all, with none of the Cloud GPU section's heartbeats."""
    main = IdleMainThread()
    panel.connect(server_url, key)
    assert drive(main, lambda: not panel.busy, (PROMPTS_MS, panel.tick), seconds=60), panel.status
    assert panel.connected, panel.status
    panel.choose(*scene_parts)
    points = iter([(i, 16.0, 12.0) for i in (8.0, 16.0, 24.0)] * 20)
    end = time.monotonic() + seconds
    drive(main, lambda: time.monotonic() > end, (PROMPTS_MS, panel.tick),
          (1000, lambda: panel.submit("point", ras=next(points))), seconds=seconds + 30)
    assert drive(main, lambda: not panel.busy, (PROMPTS_MS, panel.tick), seconds=30), panel.status
    # the last point answered: it changed the segment, or (the same three points again and again) it changed nothing
    assert panel.status.startswith(("Point applied in", "Point sent in")), panel.status


def ends_when_left_open(panel, fake, agent, pod_id):
    """Connected, but nobody prompts: the heartbeats say so, and the pod ends after its idle timeout, said first."""
    main, said, left = IdleMainThread(), set(), time.monotonic()

    def tick():
        panel.tick()
        said.add(panel.status)

    assert drive(main, lambda: pod_id not in fake.pods, (PROMPTS_MS, tick), seconds=60), "kept while unused"
    assert IDLE_TIMEOUT_S - 2 * BEAT_S - 1.5 <= time.monotonic() - left and panel.connected
    assert any("nothing has used it" in line for line in said), said
    assert f"Terminating pod {pod_id}: nothing has used it" in agent.log(timeout=30)
    panel.disconnect()


def ends_after_disconnect(panel, fake, agent, pod_id):
    """Disconnect with a prompt on its way: it is dropped, and the pod ends after its idle timeout."""
    panel.submit("point", ras=(16.0, 16.0, 12.0))
    panel.tick()
    assert panel.can_cancel
    disconnected = time.monotonic()
    panel.disconnect()
    panel.tick()
    assert panel.status == "Disconnected." and not panel.busy and not panel.connected and panel.heartbeat is None
    log = agent.log(timeout=30)
    assert pod_id not in fake.pods and f"Terminating pod {pod_id}: nothing has used it" in log
    assert IDLE_TIMEOUT_S - BEAT_S - 1.5 <= time.monotonic() - disconnected  # not ended while connected


def test_a_pod_started_here_and_used_only_from_the_ai_section_runs_while_used(pod_proxy, backend, running,
                                                                                   scene_parts):
    fake = pod_proxy.fake
    cloud = CloudGpu(backend)  # records in the test's home, where the section finds them
    started = cloud.up(cloud.gpu_choices("NVIDIA GeForce RTX 4090"), sleep=lambda s: time.sleep(0.05))
    agent = running(started.pod_id, started.secrets["SM_NNI_API_KEY"],
                    SM_HEARTBEAT_TOKEN=started.secrets["SM_HEARTBEAT_TOKEN"], SM_WARNING_S=1.5)  # once unused
    panel = PromptsPanel()
    prompting(panel, started.server_url, started.secrets["SM_NNI_API_KEY"], scene_parts)
    assert started.pod_id in fake.pods and agent.process.poll() is None, "the pod was ended while in use"
    ends_when_left_open(panel, fake, agent, started.pod_id)


def test_a_pod_known_only_by_its_url_and_key_runs_while_used(pod_proxy, backend, running, scene_parts,
                                                                tmp_path):
    """Started elsewhere (another computer's `pod up --detach`, a colleague): no record here, only what was pasted."""
    from test_image import environment, programs, rendered

    fake, key = pod_proxy.fake, "server-key-of-someone-elses-pod"
    pod = backend.create(PodSpec("NVIDIA GeForce RTX 4090", image="example/sm:1", ports=ports("server"),
                                 env={"SM_NNI_API_KEY": key, "SM_HEARTBEAT_TOKEN": "a-token-never-seen-here"}))
    # The agent's environment as the pod's entrypoint renders it: the key's hash, never the key.
    rendered_env = environment(programs(rendered(tmp_path / "root", SM_NNI_API_KEY=key,
                                                 SM_HEARTBEAT_TOKEN="a-token-never-seen-here"))["agent"])
    assert key not in rendered_env.values()
    agent = running(pod.id, key, SM_HEARTBEAT_TOKEN="a-token-never-seen-here",
                    SM_NNI_KEY_SHA256=rendered_env["SM_NNI_KEY_SHA256"])
    forged = heartbeat.Heartbeat(agent.url, "not-the-servers-key")
    assert not forged.beat() and forged.refused
    panel = PromptsPanel()
    prompting(panel, f"{pod_proxy.template().format(pod_id=pod.id, port=SERVER_PORT)}/", key, scene_parts)
    assert pod.id in fake.pods and agent.process.poll() is None, "the pod was ended while in use"
    ends_after_disconnect(panel, fake, agent, pod.id)


def test_the_warning_of_an_unused_pod_says_how_to_keep_it():
    beat = heartbeat.Heartbeat("http://127.0.0.1:9", "token")
    beat.last = {"warning": "The pod terminates in 4.9 min: nothing has used it for 15 min (idle timeout)."}
    assert heartbeat_note(beat).endswith("(idle timeout). A prompt, or Refresh in the Cloud GPU section, keeps it.")
    beat.last = {"warning": "The pod terminates in 4.9 min: its budget of $5 is spent."}
    assert heartbeat_note(beat) == beat.last["warning"]  # nothing keeps it then


def test_the_pods_warning_leaves_the_status_line_as_it_was_once_it_clears():
    """The warning showed once, then the agent's next answer had none: the status line went blank, and said nothing
    until the next prompt."""
    from SegmentationMachineLib.panels.prompts import PromptsPanel

    panel = PromptsPanel(heartbeat=heartbeat.Heartbeat("http://127.0.0.1:9", "token"))  # never started: no beats
    panel.heartbeat.last = {"warning": "The pod terminates in 4.9 min: its budget of $5 is spent."}
    panel.tick()
    assert panel.status == "The pod terminates in 4.9 min: its budget of $5 is spent."
    panel.status = "Point applied in 0.4 s."
    panel.tick()  # said once: the prompts' own lines follow
    assert panel.status == "Point applied in 0.4 s."
    panel.heartbeat.last = {}
    panel.tick()
    assert panel.status == "Point applied in 0.4 s."
