"""AI prompt tools against the real upstream nnInteractive server on CPU (loopback, hand-set test model).

The test model makes foreground = previous segmentation + positive prompts - 2 x negative ones, so
every assertion here is about exact voxels. The volume is oblique, mirrored and anisotropic, so a
prompt can only land on the right voxels if RAS, IJK and array order are all handled right. The
model reports the official weights' capabilities (no 3D boxes). Requests are counted in the
server's own log. Undo and redo are tested in test_interactive_undo.py, the prompts panel in
test_interactive_panel.py; the server and the volume are conftest.py's, the helpers interactive_parts.py's.
"""

import time

import numpy as np
import pytest

from interactive_parts import counts, KEY, mask_of, oblique_matrix, open_session, paint, ras, SHAPE, wait_for_log
from nninteractive_model import write_model_folder
from nninteractive_server import Server
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.prompts import geometry
from SegmentationMachineLib.prompts.promptfile import Prompt
from SegmentationMachineLib.prompts.session import InteractiveError, InteractiveSession, SegmentTarget
from SegmentationMachineLib.segment.presets import add_segment_from_mask


def box_ras(low_kji, high_kji):
    """RAS corners whose voxel box is exactly low..high (inclusive) on the oblique grid."""
    corners = np.array([ras((k, j, i)) for k in (low_kji[0], high_kji[0]) for j in (low_kji[1], high_kji[1])
                        for i in (low_kji[2], high_kji[2])])
    return corners.min(axis=0), corners.max(axis=0)


def test_capabilities_are_the_official_models(server, scene_parts):
    session = open_session(server, scene_parts)
    caps = session.capabilities
    assert caps.interactions == {"points", "bbox2d", "scribble", "lasso"} and caps.initial_mask and caps.undo
    assert caps.prompt_types == ("point", "box", "scribble", "lasso") and not caps.box_3d
    assert caps.describe() == "point, box (on one slice), scribble, lasso"
    assert caps.licence.startswith("Apache-2.0")
    session.close()


def test_point_lands_on_its_voxel_and_an_exclude_point_erases_it(server, scene_parts):
    session = open_session(server, scene_parts)
    timing = session.add(Prompt("point", True, ras=ras((20, 24, 28))))
    mask = mask_of(session)
    assert mask[20, 24, 28] and 20 <= mask.sum() <= 60
    assert np.allclose(np.argwhere(mask).mean(axis=0), (20, 24, 28), atol=0.01)  # a ball centred on it
    assert timing.total_s >= timing.server_s > 0 and timing.client_s >= 0
    session.add(Prompt("point", False, ras=ras((20, 24, 28))))
    assert not mask_of(session).any()
    session.close()


def test_a_box_flat_in_ras_is_one_slice_on_the_closest_voxel_axis(server, scene_parts):
    session = open_session(server, scene_parts)
    centre = np.array(ras((18, 15, 20)))
    low, high = centre - [6, 5, 0], centre + [6, 5, 0]  # flat in S, as drawn in an axial view
    session.add(Prompt("box", True, ras_min=tuple(low), ras_max=tuple(high)))
    got = mask_of(session)
    assert set(np.argwhere(got)[:, 0]) == {18}  # K is the voxel axis closest to S on this grid
    assert got[18, 15, 20] and got.sum() > 50
    session.add(Prompt("box", False, ras_min=tuple(low), ras_max=tuple(high)))
    assert not mask_of(session).any()
    session.close()


def test_a_3d_box_maps_to_the_voxel_box_of_its_corners():
    low, high = box_ras((5, 6, 7), (12, 14, 20))
    box = geometry.box_voxels(oblique_matrix(), SHAPE, low, high)
    assert all(lo <= want_lo and hi >= want_hi + 1 for (lo, hi), want_lo, want_hi in zip(box, (5, 6, 7), (12, 14, 20)))
    kji = np.array([[k, j, i] for k in (5, 12) for j in (6, 14) for i in (7, 20)])
    assert np.prod([hi - lo for lo, hi in box]) <= np.prod(np.ptp(kji, axis=0) + 1) * 3  # not much beyond it


def test_a_3d_box_is_refused_in_one_sentence_and_never_sent(server, scene_parts):
    session = open_session(server, scene_parts)
    session.add(Prompt("point", True, ras=ras((20, 24, 28))))
    before, boxes = mask_of(session), server.count('"POST /add_bbox_interaction')
    low, high = box_ras((5, 6, 7), (12, 14, 20))
    with pytest.raises(InteractiveError) as error:
        session.add(Prompt("box", True, ras_min=tuple(low), ras_max=tuple(high)))
    assert str(error.value) == "A 3D box, which this server's model does not take; draw the box on one slice."
    assert server.count('"POST /add_bbox_interaction') == boxes and np.array_equal(mask_of(session), before)
    session.add(Prompt("point", True, ras=ras((10, 10, 10))))  # the session goes on
    assert mask_of(session)[10, 10, 10] and mask_of(session)[20, 24, 28]
    session.close()


def test_a_kind_the_model_does_not_take_is_refused_before_sending(server, scene_parts):
    session = open_session(server, scene_parts)
    session.capabilities.interactions -= {"scribble"}  # as a model without scribbles reports it
    with pytest.raises(InteractiveError, match="^A scribble, which this server's model does not take; use another "
                                               r"kind of prompt \(point, box, lasso\)\.$"):
        session.check(Prompt("scribble", True, ras_points=(ras((22, 10, 10)), ras((22, 10, 30)))))
    session.close()


def test_a_prompt_on_an_all_zero_image_is_one_sentence_and_the_next_volume_works(server, scene_parts):
    """The real server answers HTTP 400 'Input image is entirely zero' (an MR's air, a blank volume): retrying
    cannot help, so the sentence says what can."""
    volume = scene_parts[0]
    image = arrays.volume_array(volume).copy()
    arrays.set_volume_array(volume, np.zeros_like(image), oblique_matrix())
    session = open_session(server, scene_parts)
    with pytest.raises(InteractiveError) as error:
        session.add(Prompt("point", True, ras=ras((20, 24, 28))))
    assert str(error.value) == (
        "The part of the scan sent for this prompt is all zero (slices 1-40 of 40 on the server), which nnInteractive "
        "cannot segment; the segment is left as it was: place the prompt on the structure, or choose the scan's own "
        "volume.")
    assert not mask_of(session).any()
    arrays.set_volume_array(volume, image, oblique_matrix())
    session.set_volume(volume)
    session.add(Prompt("point", True, ras=ras((20, 24, 28))))
    assert mask_of(session)[20, 24, 28]
    session.close()


def test_scribble_and_lasso_include_and_exclude(server, scene_parts):
    session = open_session(server, scene_parts)
    line = [ras((22, 10, 10)), ras((22, 10, 30))]
    session.add(Prompt("scribble", True, ras_points=tuple(line)))
    scribbled = mask_of(session)
    assert scribbled[22, 10, 10:31].all() and set(np.argwhere(scribbled)[:, 0]) == {22}
    square = [ras((30, 5, 5)), ras((30, 5, 20)), ras((30, 20, 20)), ras((30, 20, 5))]
    session.add(Prompt("lasso", True, ras_points=tuple(square)))
    lassoed = mask_of(session)
    assert lassoed[30, 6:20, 6:20].all() and not lassoed[30, 25:, 25:].any()
    assert lassoed[22, 10, 10:31].all()  # the scribble's voxels stay
    session.add(Prompt("lasso", False, ras_points=tuple(square)))
    session.add(Prompt("scribble", False, ras_points=tuple(line)))
    assert not mask_of(session)[30, 6:20, 6:20].any() and not mask_of(session)[22, 10, 10:31].any()
    session.close()


def test_hand_edits_reach_the_model_before_the_next_prompt(server, scene_parts):
    session = open_session(server, scene_parts)
    session.add(Prompt("point", True, ras=ras((10, 10, 10))))
    seeds = server.count('"POST /reset_interactions')
    session.add(Prompt("point", True, ras=ras((10, 30, 40))))  # no edit in between: the model keeps its memory
    assert server.count('"POST /reset_interactions') == seeds
    edited = mask_of(session)
    edited[8:13, 8:13, 8:13] = False  # erase the first ball
    edited[30:33, 5:8, 5:8] = True  # paint a block
    paint(session, edited)
    session.add(Prompt("point", True, ras=ras((20, 24, 28))))
    got = mask_of(session)
    assert got[30:33, 5:8, 5:8].all() and not got[10, 10, 10] and got[10, 30, 40] and got[20, 24, 28]
    assert server.count('"POST /reset_interactions') == seeds + 1  # re-seeded once, with the edited segment
    session.close()


def test_a_hand_edit_made_while_a_prompt_runs_stays_and_the_next_prompt_starts_from_it(server, scene_parts):
    session = open_session(server, scene_parts)
    session.add(Prompt("point", True, ras=ras((20, 24, 28))))
    pending = session.prepare(Prompt("point", True, ras=ras((20, 24, 36))))
    box = pending.run()  # the server has answered; the panel writes it at its next tick
    edited = mask_of(session)
    edited[30:33, 5:8, 5:8] = True  # painted meanwhile
    edited[17:24, 21:28, 25:32] = False  # the first ball erased meanwhile
    paint(session, edited)
    session.finish(pending, box)
    got = mask_of(session)
    assert got[30:33, 5:8, 5:8].all() and not got[20, 24, 28] and got[20, 24, 36]
    seeds = server.count('"POST /reset_interactions')
    session.add(Prompt("point", True, ras=ras((24, 24, 24))))
    got = mask_of(session)
    assert server.count('"POST /reset_interactions') == seeds + 1  # the server learnt of the edit first
    assert got[30:33, 5:8, 5:8].all() and not got[20, 24, 28] and got[20, 24, 36] and got[24, 24, 24]
    session.close()


def test_neighbours_untouched_when_overlap_is_not_allowed(server, scene_parts):
    volume, segmentation, target, editor = scene_parts
    neighbour = np.zeros(SHAPE, bool)
    neighbour[10:30, 20:40, 25:45] = True
    add_segment_from_mask(segmentation, neighbour, oblique_matrix(), "neighbour", (0, 0, 1))
    editor.GetSegmentEditorNode().SetMaskMode(segmentation.EditAllowedOutsideAllSegments)
    session = open_session(server, scene_parts)
    square = [ras((20, 15, 20)), ras((20, 15, 35)), ras((20, 30, 35)), ras((20, 30, 20))]
    session.add(Prompt("lasso", True, ras_points=tuple(square)))
    got, kept = mask_of(session), mask_of(session, "neighbour")
    assert np.array_equal(kept, neighbour)  # not a voxel of the neighbour changed
    assert got[20, 16:20, 21:35].all() and not (got & neighbour).any()
    session.close()


def test_voxels_the_editor_masked_out_do_not_come_back_with_the_next_prompt(server, scene_parts):
    """The server's state holds the whole result; where masking kept part of it out, the next prompt starts the server
    from the segment as written."""
    volume, segmentation, target, editor = scene_parts
    neighbour = np.zeros(SHAPE, bool)
    neighbour[15:25, 15:30, 15:30] = True
    add_segment_from_mask(segmentation, neighbour.copy(), oblique_matrix(), "neighbour", (0, 0, 1))
    editor.GetSegmentEditorNode().SetMaskMode(segmentation.EditAllowedOutsideAllSegments)
    session = open_session(server, scene_parts)
    square = [ras((20, 10, 10)), ras((20, 10, 24)), ras((20, 24, 24)), ras((20, 24, 10))]
    session.add(Prompt("lasso", True, ras_points=tuple(square)))
    lassoed = mask_of(session)
    assert lassoed[20, 11:15, 11:24].all() and not (lassoed & neighbour).any()
    editor.GetSegmentEditorNode().SetMaskMode(segmentation.EditAllowedEverywhere)  # changed in the Segment Editor
    session.add(Prompt("point", True, ras=ras((20, 20, 34))))
    got = mask_of(session)
    assert got[20, 20, 34] and not (got & neighbour & ~lassoed).any()
    session.close()


def test_wrong_key_is_one_sentence(server):
    session = InteractiveSession(server.url, "wrong-key")
    with pytest.raises(InteractiveError, match="rejected the API key") as error:
        session.connect()
    assert "wrong-key" not in str(error.value) and KEY not in str(error.value)


def test_unreachable_server_is_one_sentence():
    from nninteractive_server import free_port

    with pytest.raises(InteractiveError, match="Cannot reach the nnInteractive server"):
        InteractiveSession(f"http://127.0.0.1:{free_port()}", KEY).connect()


def test_server_full_waits_says_so_and_gets_in_when_a_session_ends(model_dir, scene_parts):
    full = Server(model_dir, KEY, None, "--max-sessions", "1").start()
    try:
        first = open_session(full, scene_parts)
        messages = []
        second = InteractiveSession(full.url, KEY, status=messages.append, sleep=lambda s: first.close())
        second.connect()  # waited once: the first session ended meanwhile
        assert messages == ["The server is full (all its sessions are in use); trying again in 10 s."]
        third = InteractiveSession(full.url, KEY, sleep=lambda s: None, max_wait_s=0)
        with pytest.raises(InteractiveError, match="still full"):
            third.connect()
        second.close()
    finally:
        full.stop()


def test_resumes_after_the_session_is_reaped_and_after_a_server_restart(model_dir, scene_parts):
    reaping = Server(model_dir, KEY, None, "--idle-timeout-seconds", "1").start()
    try:
        messages = []
        session = open_session(reaping, scene_parts, status=messages.append)
        session.add(Prompt("point", True, ras=ras((10, 10, 10))))
        time.sleep(17)  # the server reaps idle sessions every 15 s
        session.add(Prompt("point", True, ras=ras((30, 30, 40))))
        assert messages == ["The server session was lost; reconnecting and restoring the segment."]
        assert mask_of(session)[10, 10, 10] and mask_of(session)[30, 30, 40]  # segment intact, new prompt applied
        port = reaping.port
        reaping.stop()
        with pytest.raises(InteractiveError) as stopped:  # while it restarts (after a GPU out of memory, say)
            session.add(Prompt("point", False, ras=ras((10, 10, 10))))
        assert str(stopped.value) == (f"The nnInteractive server at {reaping.url} stopped answering (ConnectError); "
                                      "the segment is left as it was: it may be restarting, so prompt again in a "
                                      "minute, else check that it runs.")
        assert mask_of(session)[10, 10, 10]
        reaping = Server(model_dir, KEY, port).start()
        volume = scene_parts[0]
        arrays.set_volume_array(volume, arrays.volume_array(volume) + 1, oblique_matrix())  # the next volume
        uploads = reaping.count('"POST /set_image')  # (the log goes on from the server before, on this port)
        session.set_volume(volume)  # its upload finds the lease gone: the resume sends it, and only the resume
        assert reaping.count('"POST /set_image') == uploads + 1
        session.add(Prompt("point", False, ras=ras((10, 10, 10))))
        assert not mask_of(session)[10, 10, 10] and mask_of(session)[30, 30, 40]
        assert len(messages) == 3
        session.close()
    finally:
        reaping.stop()


def test_a_restarted_server_is_asked_again_what_it_takes_and_an_undo_it_cannot_do_re_seeds(model_dir, scene_parts):
    """Upstream's server answers an undo it cannot do (run with --no-undo, say) with nothing undone."""
    restarting = Server(model_dir, KEY).start()
    try:
        session = open_session(restarting, scene_parts)
        a, b, c, d, e, f = (12, 12, 12), (12, 20, 20), (20, 14, 22), (24, 24, 14), (16, 26, 26), (20, 20, 20)
        session.add(Prompt("point", True, ras=ras(a)))
        restarting.stop()
        restarting = Server(model_dir, KEY, restarting.port, "--no-undo").start()
        session.add(Prompt("point", True, ras=ras(b)))  # resumes on the server as it runs now
        assert not session.capabilities.undo
        session.add(Prompt("point", True, ras=ras(c)))
        session.undo()
        session.add(Prompt("point", True, ras=ras(d)))
        got = mask_of(session)
        assert got[a] and got[b] and not got[c] and got[d]
        session.capabilities.undo = True  # a server that says it can undo, and then cannot
        session.add(Prompt("point", True, ras=ras(e)))
        session.undo()
        session.add(Prompt("point", True, ras=ras(f)))
        got = mask_of(session)
        assert got[a] and got[b] and got[d] and not got[e] and got[f]
        session.close()
    finally:
        restarting.stop()


def test_a_model_that_cannot_start_from_a_segment_says_so_when_prompting_into_one_with_voxels(tmp_path, scene_parts):
    """A custom model (--model-dir) may not take a segment's voxels to start from: its result then replaces them
    around the prompt, which the status line says (the official weights take them)."""
    volume, segmentation, _, editor = scene_parts
    block = np.zeros(SHAPE, bool)
    block[5:9, 5:9, 5:9] = True
    painted = add_segment_from_mask(segmentation, block, oblique_matrix(), "painted", (1, 0, 0))
    custom = Server(write_model_folder(tmp_path / "model", initial_label=False), KEY).start()
    try:
        messages = []
        session = InteractiveSession(custom.url, KEY, status=messages.append)
        session.connect()
        session.set_volume(volume)
        session.select_segment(SegmentTarget(segmentation, painted, editor))
        session.add(Prompt("point", True, ras=ras((20, 20, 20))))
        assert messages == ["This server's model cannot start from the segment's voxels: around the prompt its "
                            "result replaces them (Undo brings them back); prompt into a new segment to keep them "
                            "apart."]
        session.close()
    finally:
        custom.stop()


def test_a_read_timeout_is_a_sentence_and_the_prompt_is_sent_exactly_once(slow_server, scene_parts):
    session = open_session(slow_server, scene_parts, read_timeout_s=1.0)
    before, done = counts(slow_server), slow_server.count("Done. Total time")
    with pytest.raises(InteractiveError, match=r"^The nnInteractive server has not answered within 1 s \(a large "
                                               r"structure can take that long\); the segment is left as it was"):
        session.add(Prompt("point", True, ras=ras((20, 24, 28))))
    assert not mask_of(session).any()
    wait_for_log(slow_server, "Done. Total time", done + 1)  # the server finished the prediction nobody awaits
    claims, uploads, points = counts(slow_server)
    assert (claims, uploads, points) == (before[0], before[1], before[2] + 1)  # no reconnect, no re-upload, no repeat
    session.close()


def run_cli(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "SegmentationMachineLib.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_model_command_replays_a_prompt_file_and_exports(server, tmp_path):
    import json

    import pydicom

    from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series

    write_ct_series(tmp_path / "dicom", make_phantom(shape=(24, 64, 64)).hu, 1.5,
                    [(-47.25, -47.25, 2.0 * k) for k in range(24)], "prompted")
    # LPS (x, y, z) in the file is RAS (-x, -y, z): a point near the middle of the phantom.
    prompts = {"version": 1, "segments": [{"name": "blob", "prompts": [
        {"type": "point", "ras": [0.75, 0.75, 24.0], "include": True},
        {"type": "box", "ras_min": [-10, -10, 10], "ras_max": [5, 5, 10], "include": True}]}]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    result = run_cli("model", tmp_path / "dicom", "--server", server.url, "--prompts", tmp_path / "prompts.json",
                     "--out", tmp_path / "out", "--format", "stl,3mf,seg", "--quiet", env={"SM_NNI_API_KEY": KEY})
    assert result.returncode == 0, result.stderr
    assert "blob: prompt 1/2 (point, include) in" in result.stdout and "blob: prompt 2/2 (box, include)" in result.stdout
    assert "Sending the scan to the server...\nSent slices 1-24 of 24 on the server in " in result.stdout  # a minute
    assert KEY not in result.stdout + result.stderr
    report = json.loads(next((tmp_path / "out").glob("*/report.json")).read_text())
    assert [m["name"] for m in report["meshes"]] == ["blob"] and report["meshes"][0]["watertight"]
    segment = pydicom.dcmread(next((tmp_path / "out").glob("*/segmentation.dcm"))).SegmentSequence[0]  # made by AI
    assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"


def test_model_command_bad_prompt_file_and_missing_key_are_sentences(server, tmp_path, phantom_dir):
    (tmp_path / "bad.json").write_text('{"version": 1, "segments": [{"name": "x", "prompts": [{"type": "point"}]}]}')
    bad = run_cli("model", phantom_dir, "--server", server.url, "--prompts", tmp_path / "bad.json",
                  "--out", tmp_path, env={"SM_NNI_API_KEY": KEY})
    assert bad.returncode == 2 and "segments[0].prompts[0] (point) ras must be three numbers" in bad.stderr
    (tmp_path / "good.json").write_text('{"version": 1, "segments": [{"name": "x", "prompts": []}]}')
    nokey = run_cli("model", phantom_dir, "--server", server.url, "--prompts", tmp_path / "good.json",
                    "--out", tmp_path, "--api-key-env", "SM_TEST_UNSET_KEY")
    assert nokey.returncode == 2 and "environment variable SM_TEST_UNSET_KEY" in nokey.stderr
    (tmp_path / "cube.json").write_text('{"version": 1, "segments": [{"name": "x", "prompts": [{"type": "point", '
                                        '"ras": [0, 0, 40]}, {"type": "box", "ras_min": [-10, -10, 30], '
                                        '"ras_max": [5, 5, 50]}]}]}')
    uploads = server.count('"POST /set_image')
    cube = run_cli("model", phantom_dir, "--server", server.url, "--prompts", tmp_path / "cube.json",
                   "--out", tmp_path, env={"SM_NNI_API_KEY": KEY})
    assert cube.returncode == 2, cube.stderr
    assert ("segments[0].prompts[1] (box): a 3D box, which this server's model does not take; draw the box on one "
            "slice.") in cube.stderr
    assert server.count('"POST /set_image') == uploads  # refused before the volume was sent
    assert "Traceback" not in bad.stderr + nokey.stderr + cube.stderr


def test_server_command_keeps_the_key_off_the_command_line_and_refuses_a_stranger_unread(model_dir, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    from nninteractive_server import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "SegmentationMachineLib.cli", "server", "--model-dir",
                                str(model_dir), "--device", "cpu", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                               env={k: v for k, v in os.environ.items() if k != "SM_NNI_API_KEY"})
    try:
        first_line = process.stdout.readline()
        assert first_line.startswith("API key (shown once; clients need it): ")
        key = first_line.split(": ", 1)[1].strip()
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        session = InteractiveSession(f"http://127.0.0.1:{port}", key)
        try:
            assert session.connect().prompt_types
        finally:
            session.close()  # its lease held the server's shutdown up to the 30 s below
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        command_lines = [open(f"/proc/{pid}/cmdline", "rb").read().decode() for pid in children]
        assert command_lines and all(key not in line for line in command_lines)
        assert all("SegmentationMachineLib.cli.server_guard\0--host" in line for line in command_lines)
        # A stranger announcing 100 MB: refused at once, before a byte of the body. Upstream alone read and parsed
        # the whole body before its key check (half a GB for 90 MB), so this request got no answer at all.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stranger:
            stranger.sendall(b"POST /predict HTTP/1.1\r\nHost: pod\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000000\r\nAuthorization: Bearer guess\r\n\r\n{")
            assert stranger.recv(4096).startswith(b"HTTP/1.1 401 ")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200  # open, as upstream has it
        for _ in range(4):
            assert httpx.post(f"http://127.0.0.1:{port}/predict", timeout=5).status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        try:
            log = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:  # failed, but leaves no server running
            subprocess.run(["pkill", "-KILL", "-P", str(process.pid)])
            process.kill()
            raise
    # A stranger's requests are counted, not logged one line each: the pod log shows the credentials once
    assert log.count("Refused 1 request(s) without the server's API key (the last from 127.0.0.1).") == 1, log
    assert '" 401' not in log and '" 200' in log, log


def test_secret_store_file_fallback_is_private_and_forgets(tmp_path):
    import stat

    from SegmentationMachineLib.core.credentials import SecretStore

    store = SecretStore(tmp_path / "secrets", use_keychain=False)
    store.save("nninteractive", "s3cret")
    assert store.load("nninteractive") == "s3cret" and "readable only by you" in store.where
    assert stat.S_IMODE((tmp_path / "secrets" / "nninteractive").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    store.forget("nninteractive")
    assert store.load("nninteractive") is None


def test_a_server_of_another_protocol_version_is_one_sentence_naming_versions():
    """A fake server that grants a lease but answers capabilities in a shape this client does not know."""
    import json
    from http.server import BaseHTTPRequestHandler

    from loopback import LoopbackServer

    class OtherVersion(BaseHTTPRequestHandler):
        def _reply(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            self._reply({"lease_token": "t", "idle_timeout_seconds": 600, "liveness_timeout_seconds": 0})

        def do_GET(self):
            self._reply({"version": "3.0", "interactions": ["point"]})

        def log_message(self, *args):
            pass

    with LoopbackServer(OtherVersion) as fake, pytest.raises(InteractiveError) as error:
        InteractiveSession(fake.url, KEY).connect()
    assert "another nnInteractive protocol" in str(error.value) and "nninteractive-client 2.6" in str(error.value)
