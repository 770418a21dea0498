"""Prompt results the region sent would cut, and a server that fails on a prompt, against the real upstream server.

The server runs with autozoom, as on a pod, and the test model lets the image vote (image_weight), so
a point on a bright "vessel" grows along it past the prompt, as far as autozoom carries (about 160
slices here), like a real model following a long vessel. The volume is 240 slices of soft tissue
with a 12x12-voxel vessel through all of them; upload limits scaled down (kB instead of 90 MB) make
the first region, which is all of the body in-plane, hold only part of the vessel.
"""

import time

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")  # the server's model: only in .venv (scripts/test.sh, step 2)
pytest.importorskip("nnInteractive")

from nninteractive_model import write_model_folder  # noqa: E402
from nninteractive_server import Server  # noqa: E402
from SegmentationMachineLib.core import arrays  # noqa: E402
from SegmentationMachineLib.prompts import errors  # noqa: E402
from SegmentationMachineLib.prompts.promptfile import Prompt  # noqa: E402
from SegmentationMachineLib.prompts.region import Limits  # noqa: E402
from SegmentationMachineLib.prompts.session import (  # noqa: E402
    headless_editor, InteractiveError, InteractiveSession, SegmentTarget)

KEY = "cut-test-key-0123456"
SHAPE = (240, 48, 48)  # K, J, I; voxels of 1 mm, so RAS (x, y, z) = (I, J, K)
VESSEL = slice(18, 30)  # in J and I, on every slice


def limits(request_bytes: int) -> Limits:
    return Limits(request_bytes=request_bytes, context=8, edge=4, body_margin=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = write_model_folder(tmp_path_factory.mktemp("grows") / "model", image_weight=0.3)
    running = Server(folder, KEY, autozoom=True).start()
    yield running
    running.stop()


@pytest.fixture
def scene_parts(ctx):
    image = (40 + np.random.default_rng(1).normal(0, 20, SHAPE)).astype(np.int16)  # soft tissue fills every slice
    image[:, VESSEL, VESSEL] = 1000  # contrast in a vessel running through all of them
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cta")
    arrays.set_volume_array(volume, image, np.eye(4))
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("", "vessel")
    return volume, SegmentTarget(segmentation, target, headless_editor(ctx.scene, ctx.app_logic, segmentation, volume))


def point(k: int) -> Prompt:
    return Prompt("point", True, ras=(24.0, 24.0, float(k)))


def spans(mask: np.ndarray) -> tuple:
    """The first and last slice the mask has voxels on."""
    k = np.flatnonzero(mask.any(axis=(1, 2)))
    return int(k[0]), int(k[-1])


def vessel_only(mask: np.ndarray) -> bool:
    """Every slice the mask reaches holds the vessel's whole section and nothing else."""
    low, high = spans(mask)
    expected = np.zeros(SHAPE, bool)
    expected[low:high + 1, VESSEL, VESSEL] = True
    return np.array_equal(mask, expected)


def session_on(server, scene_parts, said: list) -> InteractiveSession:
    """A session on server, its first region sent (the body in-plane, part of the vessel's slices); its status
    sentences go to said."""
    volume, target = scene_parts
    session = InteractiveSession(server.url, KEY, status=said.append, limits=limits(250_000))
    session.connect()
    session.set_volume(volume)
    session.select_segment(target)
    return session


def test_a_result_the_region_would_cut_runs_again_on_a_region_that_holds_it(server, scene_parts):
    target = scene_parts[1]
    said = []
    session = session_on(server, scene_parts, said)
    first = session._region.copy()
    assert first[1, 0] - first[0, 0] < 150 and (first[:, 1:] == [[0, 0], [48, 48]]).all()  # the body, part of it
    uploads, points = server.count('"POST /set_image'), server.count("Added new point interaction")

    timing = session.add(point(120))
    mask = session._segment_mask(target.segment_id)
    low, high = spans(mask)
    assert low < first[0, 0] - 10 and high >= first[1, 0] + 10  # well past both faces of the first region
    assert vessel_only(mask) and 0 < low and high < SHAPE[0] - 1  # as far as the model follows it, not cut
    region = session._region  # narrower in-plane than the body, so that more slices fit in one upload
    assert region[0, 0] < low and high < region[1, 0] - 1 and (region[0, 1:] > 0).all() and (region[1, 1:] < 48).all()
    assert server.count('"POST /set_image') == uploads + 1 and server.count("Added new point interaction") == points + 2
    assert said == [] and timing.warning == "" and timing.total_s >= timing.server_s > 0
    session.undo()  # one step: the cut result was never written
    assert not session._segment_mask(target.segment_id).any() and not session.can_undo
    session.close()


def test_a_prompt_that_ran_again_often_enough_is_written_as_it_came_and_said(server, scene_parts):
    """At most MAX_RERUNS larger regions: a structure that would go on reaching the edge (the model following it
    from region to region) is written once that many have been tried, with the sentence."""
    from SegmentationMachineLib.prompts.session import MAX_RERUNS

    target = scene_parts[1]
    session = session_on(server, scene_parts, [])
    k0, k1 = session._region[:, 0]
    pending = session.prepare(point(120))
    pending.reruns = MAX_RERUNS  # as if this were its last try
    timing = session.finish(pending, pending.run())
    assert pending.again is None and spans(session._segment_mask(target.segment_id)) == (k0, k1 - 1)
    assert timing.warning == (f"The result reaches the edge of the part of the scan sent (slices {k0 + 1}-{k1} of 240 "
                              f"on the server) and may be cut off there: the prompt ran on larger parts {MAX_RERUNS} "
                              "times already; place a prompt on the structure beyond that edge to continue it.")
    session.close()


def run_recording(panel, clock: list) -> list:
    """Ticks the panel until it is idle, advancing its clock 2 s a tick; the status lines it showed, in order."""
    seen, deadline = [], time.monotonic() + 120
    while panel.busy:
        assert time.monotonic() < deadline, panel.status
        panel.tick()
        clock[0] += 2.0
        if not seen or seen[-1] != panel.status:
            seen.append(panel.status)
        time.sleep(0.01)
    return seen


def panel_on(server, scene_parts, request_bytes: int) -> tuple:
    """(the prompts panel connected to server and ready on the scene's vessel, its clock)."""
    from SegmentationMachineLib.panels.prompts import PromptsPanel

    volume, target = scene_parts
    clock = [0.0]
    panel = PromptsPanel(clock=lambda: clock[0])
    panel.connect(server.url, KEY)
    run_recording(panel, clock)
    panel.session.limits = limits(request_bytes)
    panel.choose(volume, target)
    run_recording(panel, clock)
    return panel, clock


def test_where_no_larger_region_fits_the_cut_result_is_kept_and_the_status_line_says_so(server, scene_parts):
    target = scene_parts[1]
    panel, clock = panel_on(server, scene_parts, 65_000)  # the first region holds about 30 slices; a narrower one 90
    panel.submit("point", ras=point(120).ras)
    seen = run_recording(panel, clock)

    session = panel.session
    region = session._region
    (k0, k1), mask = region[:, 0], session._segment_mask(target.segment_id)
    assert spans(mask) == (k0, k1 - 1) and vessel_only(mask)  # cut flat at both faces of the larger region
    assert 60 < k1 - k0 < 120
    waited = [line for line in seen if "repeating" in line]
    assert waited and waited[0].startswith(f"Point: its result reaches the edge of the part of the scan sent: sending "
                                           f"slices {k0 + 1}-{k1} and repeating the prompt, ")
    assert panel.status.startswith("Point applied in ") and panel.status.endswith(
        f"server + network). The result reaches the edge of the part of the scan sent (slices {k0 + 1}-{k1} of 240 on "
        "the server) and may be cut off there: a part that holds more of it does not fit in one upload; place a "
        "prompt on the structure beyond that edge to continue it.")

    panel.submit("point", ras=point(k1 + 20).ras)  # as the sentence says: the segment goes on there
    run_recording(panel, clock)
    low, high = spans(session._segment_mask(target.segment_id))
    assert low == k0 and high > k1 + 40 and vessel_only(session._segment_mask(target.segment_id))
    panel.undo()
    run_recording(panel, clock)
    assert spans(session._segment_mask(target.segment_id)) == (k0, k1 - 1)
    session.close()


@pytest.fixture
def fails_on_larger_regions(tmp_path):
    """The growing model, out of memory after 20 forward passes: the first region's prediction takes 12, a larger
    region's more, as on a GPU whose memory holds the first region's but not a larger one's."""
    folder = write_model_folder(tmp_path / "model", image_weight=0.3, out_of_memory=True, passes_before_failing=20)
    running = Server(folder, KEY, autozoom=True).start()
    yield running
    running.stop()


CUT_KEPT = ("The result reaches the edge of the part of the scan sent and may be cut off there, as running the prompt "
            "on a larger part failed: the nnInteractive server failed on this prompt (HTTP 500: Internal Server "
            "Error): its log says why (a pod's logs are in RunPod's console); where that is CUDA out of memory, run "
            "the server on a GPU with more memory (a pod's server, or one run by segmentation-machine server, "
            "restarts itself within a minute; another is about half as fast on large structures until restarted); "
            "otherwise try the prompt again; place a prompt on the structure beyond that edge to continue it.")


def test_a_cut_result_is_kept_when_the_larger_region_fails(fails_on_larger_regions, scene_parts):
    """The seconds the first answer took are not lost with it: it is written, cut, and the sentence says why."""
    target = scene_parts[1]
    panel, clock = panel_on(fails_on_larger_regions, scene_parts, 250_000)
    k0, k1 = panel.session._region[:, 0]
    panel.submit("point", ras=point(120).ras)
    seen = run_recording(panel, clock)

    assert any("repeating the prompt" in line for line in seen) and panel.status == CUT_KEPT
    assert fails_on_larger_regions.logged("torch.OutOfMemoryError: CUDA out of memory") == 1
    mask = panel.session._segment_mask(target.segment_id)
    assert spans(mask) == (k0, k1 - 1) and vessel_only(mask)  # the first region's answer, cut flat at its faces
    panel.undo()  # one step
    run_recording(panel, clock)
    assert not panel.session._segment_mask(target.segment_id).any()
    panel.session.close()


def test_a_prompt_file_keeps_a_cut_result_when_the_larger_region_fails(fails_on_larger_regions, scene_parts):
    """session.add, which the CLI's prompt files run."""
    target = scene_parts[1]
    said = []
    session = session_on(fails_on_larger_regions, scene_parts, said)
    k0, k1 = session._region[:, 0]
    timing = session.add(point(120))
    assert timing.warning == CUT_KEPT and said == [CUT_KEPT]
    assert spans(session._segment_mask(target.segment_id)) == (k0, k1 - 1)
    session.close()


def test_a_server_out_of_gpu_memory_is_a_sentence_that_helps(tmp_path, scene_parts):
    """The real server answers a CUDA out of memory with HTTP 500 and 'Internal Server Error' only."""
    volume, target = scene_parts
    failing = Server(write_model_folder(tmp_path / "model", out_of_memory=True), KEY).start()
    try:
        session = InteractiveSession(failing.url, KEY, limits=limits(250_000))
        session.connect()
        session.set_volume(volume)
        session.select_segment(target)
        with pytest.raises(InteractiveError) as error:
            session.add(point(120))
        assert str(error.value) == (
            "The nnInteractive server failed on this prompt (HTTP 500: Internal Server Error); the segment is left as "
            "it was: its log says why (a pod's logs are in RunPod's console); where that is CUDA out of memory, "
            "run the server on a GPU with more memory (a pod's server, or one run by segmentation-machine server, "
            "restarts itself within a minute; another is about half as fast on large structures until restarted); "
            "otherwise try the prompt again.")
        assert failing.logged("torch.OutOfMemoryError: CUDA out of memory") == 1
        assert not session._segment_mask(target.segment_id).any()
        session.close()
    finally:
        failing.stop()


def test_an_answer_that_names_out_of_memory_says_the_gpu_is_too_small():
    session = InteractiveSession("https://pod-8000.proxy.runpod.net", KEY)
    request = httpx.Request("POST", "https://pod-8000.proxy.runpod.net/add_point_interaction")
    answer = httpx.Response(500, json={"detail": "CUDA out of memory. Tried to allocate 2.25 GiB"}, request=request)
    error = errors.http_error(session, httpx.HTTPStatusError("500", request=request, response=answer))
    assert str(error) == ("The nnInteractive server ran out of GPU memory on this prompt (HTTP 500: CUDA out of "
                          "memory. Tried to allocate 2.25 GiB); the segment is left as it was: the GPU has too little "
                          "memory for this region and prompt, so run the server on a GPU with more memory (a pod's "
                          "server, or one run by segmentation-machine server, restarts itself within a minute; "
                          "another is about half as fast on large structures until restarted).")


def test_two_clients_on_one_server_keep_their_own_image_and_segment(server):
    """Two Slicers (or a Slicer and `model --server`) on one pod: upstream keeps a session per client (its lease),
    so B's upload never becomes the image of A's next prompt, nor B's prompts A's segment."""
    from SegmentationMachineLib.core.scene import create_headless_scene

    def opened(image, bright):
        image[bright] = 1000
        ctx = create_headless_scene()
        volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
        arrays.set_volume_array(volume, image, np.eye(4))
        segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segment = segmentation.GetSegmentation().AddEmptySegment("", "target")
        session = InteractiveSession(server.url, KEY)
        session.connect()
        session.set_volume(volume)
        session.select_segment(SegmentTarget(segmentation, segment,
                                             headless_editor(ctx.scene, ctx.app_logic, segmentation, volume)))
        return session, lambda: session._segment_mask(segment)

    noise = np.random.default_rng(5)
    a, a_mask = opened(noise.integers(-10, 10, (40, 48, 56)).astype(np.int16), np.s_[15:25, 15:25, 15:25])
    b, b_mask = opened(noise.integers(-10, 10, (36, 44, 52)).astype(np.int16), np.s_[2:8, 30:40, 30:40])
    try:  # B's volume went up after A's: A's prompt is on A's image still
        a.add(Prompt("point", True, ras=(20.0, 20.0, 20.0)))
        b.add(Prompt("point", True, ras=(20.0, 20.0, 20.0)))
        assert a_mask().shape == (40, 48, 56) and a_mask()[15:25, 15:25, 15:25].all() and not a_mask()[4, 35, 35]
        assert not b_mask()[16, 16, 16] and not b_mask()[24, 24, 24]
        b.add(Prompt("point", False, ras=(20.0, 20.0, 20.0)))  # B's exclude does not reach A's segment
        a.add(Prompt("point", True, ras=(5.0, 5.0, 5.0)))
        assert a_mask()[20, 20, 20] and a_mask()[5, 5, 5] and not b_mask()[20, 20, 20] and not b_mask()[5, 5, 5]
    finally:
        a.close()
        b.close()
