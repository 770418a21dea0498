"""A broken or malicious nnInteractive server ends every session in one sentence: never a crash, a traceback,
a hang or unbounded memory.

The hostile server is stdlib http.server on loopback speaking the upstream protocol, with one fault per URL
(the first path segment names it). The session runs in a subprocess, so a fault that crashes the process
(SIGSEGV in VTK or numpy) fails the test instead of killing pytest.
"""

import json
import subprocess
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import blosc2
import numpy as np
import pytest
from nnInteractive.inference.remote._protocol import META_HEADER
from nnInteractive.inference.remote.serialization import pack_array

from loopback import LoopbackServer
from SegmentationMachineLib.prompts.session import InteractiveError, InteractiveSession

REPO = Path(__file__).resolve().parents[1]
SHAPE = (20, 24, 28)  # K, J, I of the client's volume
BOX = [[8, 11], [10, 13], [12, 15]]  # where the honest answer puts 27 voxels
READ_TIMEOUT_S = 2.0
DRIP_EVERY_S = 0.5  # well inside httpx's per-read time-out: only a deadline on the whole answer ends it

CAPABILITIES = {
    "supported_interactions": {"points": True, "bbox2d": True, "bbox3d": False, "scribble": True, "lasso": True},
    "channel_mapping": {"bbox": [2, 3], "lasso": [2, 3], "point": [4, 5], "scribble": [6, 7]},
    "num_interaction_channels": 8, "supports_initial_label": True, "supports_zero_shot_label_refinement": False,
    "preferred_scribble_thickness": [2, 2, 2], "interaction_decay": 0.9, "inference_session_version": "2.6.0",
    "license": "Apache-2.0", "supports_undo": True, "do_autozoom": False,
}


def packed_header(dtype_name: str, shape, payload: bytes) -> bytes:
    """The upstream wire format with whatever dtype name and shape the server chooses to claim."""
    name = dtype_name.encode()
    header = b"NNIA" + bytes([1, 1, len(shape), len(name)]) + name + np.array(shape, "<i8").tobytes()
    chunk = blosc2.compress2(payload, typesize=1)
    return header + np.uint32(1).tobytes() + np.array([len(payload), len(chunk)], "<u8").tobytes() + chunk


def answer(bbox, body: bytes, meta_text: str = None):
    return {META_HEADER: meta_text or json.dumps({"ran_prediction": True, "bbox": bbox})}, body


GARBAGE_FRAME = packed_header("uint8", (3, 3, 3), bytes(27))[:57] + b"\xff" * 40  # a blosc2 frame of noise
ONES = pack_array(np.ones((3, 3, 3), np.uint8), filters=[blosc2.Filter.NOFILTER])
WHOLE = [[0, SHAPE[0]], [0, SHAPE[1]], [0, SHAPE[2]]]

# Fault -> the answer to the point prompt, and the sentence's telling part.
BAD_ANSWERS = {
    "box-negative": (answer([[-5, -2], [10, 13], [12, 15]], ONES), "is reversed, empty or outside the 20x24x28 volume"),
    "box-reversed": (answer([[11, 8], [10, 13], [12, 15]], ONES), "is reversed, empty or outside"),
    "box-outside": (answer([[18, 21], [10, 13], [12, 15]], ONES), "is reversed, empty or outside"),
    "box-huge": (answer([[0, 2 ** 62], [10, 13], [12, 15]], ONES), "is reversed, empty or outside"),
    "box-floats": (answer([[8.5, 11], [10, 13], [12, 15]], ONES), "is not 3 pairs of integers"),
    "box-two-axes": (answer([[8, 11], [10, 13]], ONES), "is not 3 pairs of integers"),
    "box-text": (answer("everything", ONES), "is not 3 pairs of integers"),
    # Pointers made of the server's bytes: the upstream client dies with SIGSEGV on this one.
    "diff-object": (answer(BOX, packed_header("object", (3, 3, 3), b"A" * 27 * 8)), "of type object, not plain"),
    "diff-structured": (answer(BOX, packed_header("u1,O", (3, 3, 3), bytes(27 * 9))), "not plain numbers"),
    "diff-wrong-shape": (answer(BOX, pack_array(np.ones((4, 4, 4), np.uint8))), "have shape (4, 4, 4), not"),
    "diff-negative-dims": (answer(BOX, packed_header("uint8", (-3, -3, 3), b"")), "have shape (-3, -3, 3)"),
    "diff-larger-than-buffer": (answer(WHOLE, packed_header("float64", SHAPE, b"")), "larger than the segment"),
    "diff-garbage": (answer(BOX, GARBAGE_FRAME), "cannot be unpacked (chunk size mismatch"),
    "diff-missing": (answer(BOX, b""), "not a packed array"),
    "meta-not-json": (answer(BOX, ONES, "{nope"), "header is not JSON"),
    "meta-a-list": (answer(BOX, ONES, "[1, 2]"), "header is not a JSON object"),
}


class Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.do_POST()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        _, fault, endpoint = self.path.split("/", 2)
        try:
            self.reply(fault, endpoint)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            self.close_connection = True

    def reply(self, fault, endpoint):
        honest = {"claim": {"lease_token": "t", "idle_timeout_seconds": 600, "liveness_timeout_seconds": 0},
                  "capabilities": CAPABILITIES, "set_image": {"original_image_shape": [1, *SHAPE]}}
        if endpoint == "claim" and fault == "claim-html":
            return self.send(200, {"Content-Type": "text/html"}, b"<html>Sign in to the hotel Wi-Fi</html>")
        if endpoint == "claim" and fault == "claim-a-list":
            return self.send(200, {}, b"[]")
        if endpoint == "capabilities" and fault.startswith("caps-"):
            broken = {"caps-interactions-text": {"supported_interactions": "all"},
                      "caps-huge-thickness": {"preferred_scribble_thickness": [1e9, 1, 1]}}[fault]
            return self.send(200, {}, json.dumps({**CAPABILITIES, **broken}).encode())
        if endpoint == "set_image" and fault == "upload-html":
            return self.send(200, {}, b"<html>502 Bad Gateway</html>")
        if endpoint == "add_point_interaction":
            return self.prediction(fault)
        body = honest.get(endpoint, {})
        return self.send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def prediction(self, fault):
        if fault == "honest":
            return self.send(200, *answer(BOX, ONES))
        if fault in BAD_ANSWERS:
            return self.send(200, *BAD_ANSWERS[fault][0])
        if fault == "drip-body":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.send_header(META_HEADER, json.dumps({"ran_prediction": True, "bbox": BOX}))
            self.end_headers()
            return self.drip(b"N" * 100000)
        if fault == "drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            return self.drip(b"X-Padding: " + b"a" * 10000)
        if fault == "huge":  # 4 GiB announced, sent as fast as the client reads
            self.send_response(200)
            self.send_header("Content-Length", str(4 << 30))
            self.send_header(META_HEADER, json.dumps({"ran_prediction": True, "bbox": BOX}))
            self.end_headers()
            block = bytes(1 << 20)
            for _ in range(4 << 10):
                self.wfile.write(block)
            return None
        if fault == "gzip-bomb":
            return self.send(200, {"Content-Encoding": "gzip", **answer(BOX, b"")[0]}, GZIP_BOMB)
        raise AssertionError(f"unknown fault {fault}")

    def send(self, code, headers, body: bytes):
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def drip(self, data: bytes):
        for byte in data:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(DRIP_EVERY_S)


def _gzip_bomb(megabytes: int) -> bytes:
    """megabytes of zeros, gzip-compressed to about a thousandth of that."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    return b"".join([packer.compress(block) for _ in range(megabytes)] + [packer.flush()])


GZIP_BOMB = _gzip_bomb(200)


@pytest.fixture(scope="module")
def hostile():
    with LoopbackServer(Hostile) as server:
        yield server.url


CLIENT = """
import json, resource, sys, time
import numpy as np
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.core.scene import create_headless_scene
from SegmentationMachineLib.prompts.promptfile import Prompt
from SegmentationMachineLib.prompts.session import InteractiveSession, SegmentTarget, headless_editor

base, read_timeout, shape, faults = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
ctx = create_headless_scene()
volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
arrays.set_volume_array(volume, np.zeros(shape, np.int16), np.eye(4))
for fault in faults:
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", fault)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("", "target")
    session = InteractiveSession(base + "/" + fault, "key", read_timeout_s=read_timeout)
    started, error, voxels = time.monotonic(), None, None
    try:
        session.connect()
        session.set_volume(volume)
        session.select_segment(SegmentTarget(segmentation, target, headless_editor(ctx.scene, ctx.app_logic,
                                                                                   segmentation, volume)))
        session.add(Prompt("point", True, ras=(13.0, 11.0, 9.0)))  # voxel (9, 11, 13) on the identity grid
    except UserError as failure:
        error = str(failure)
    if session._target is not None:
        voxels = int(session._segment_mask(target).sum())
    session.close()
    print(json.dumps({"fault": fault, "error": error, "voxels": voxels, "seconds": time.monotonic() - started,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
"""


def run_client(url: str, faults) -> dict:
    """{fault: outcome} from a client process that prompts once per fault; a crash fails the test."""
    result = subprocess.run([sys.executable, "-c", CLIENT, url, str(READ_TIMEOUT_S), json.dumps(SHAPE), *faults],
                            capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL)
    outcomes = {o["fault"]: o for o in map(json.loads, result.stdout.splitlines())}
    assert result.returncode == 0, (f"the client died (exit {result.returncode}) after {list(outcomes)}: "
                                    f"{result.stderr[-2000:]}")
    assert "Traceback" not in result.stderr, result.stderr
    return outcomes


def test_every_malformed_prediction_is_one_sentence_and_nothing_is_written(hostile):
    outcomes = run_client(hostile, ["honest", *BAD_ANSWERS])
    assert outcomes["honest"]["error"] is None and outcomes["honest"]["voxels"] == 27  # the fake speaks the protocol
    for fault, (_, telling) in BAD_ANSWERS.items():
        error = outcomes[fault]["error"]
        assert error.startswith(f"The server at {hostile}/{fault} sent a reply this client cannot read ("), fault
        assert telling in error and "\n" not in error, (fault, error)
        assert outcomes[fault]["voxels"] == 0, fault


def test_a_drip_a_flood_and_a_compression_bomb_end_within_the_deadline_in_bounded_memory(hostile):
    outcomes = run_client(hostile, ["honest", "drip-body", "drip-headers", "huge", "gzip-bomb"])
    baseline = outcomes["honest"]["peak_mb"]
    for fault in ("drip-body", "drip-headers"):
        assert outcomes[fault]["error"].startswith(f"The nnInteractive server has not answered within "
                                                   f"{READ_TIMEOUT_S:g} s"), outcomes[fault]
        assert outcomes[fault]["seconds"] < READ_TIMEOUT_S + 3 * DRIP_EVERY_S + 2  # not the drip's 14 hours
    assert outcomes["huge"]["error"] == (f"The server at {hostile}/huge sent an answer larger than 1.1 MB (no answer "
                                         "for this volume can be that large); the segment is left as it was: check "
                                         "that the address is your nnInteractive server.")
    assert outcomes["gzip-bomb"]["error"].startswith(f"The server at {hostile}/gzip-bomb sent a gzip-compressed "
                                                     "answer, which this client did not ask for;")
    assert max(o["peak_mb"] for o in outcomes.values()) < baseline + 50  # neither 4 GiB nor 200 MB was held
    assert all(o["voxels"] == 0 for f, o in outcomes.items() if f != "honest")


def test_replies_that_are_not_the_protocol_at_connect_and_upload_are_one_sentence(hostile):
    outcomes = run_client(hostile, ["claim-html", "claim-a-list", "caps-interactions-text", "caps-huge-thickness",
                                    "upload-html"])
    for fault, telling in {"claim-html": "(JSONDecodeError: Expecting value", "claim-a-list": "(TypeError: ",
                           "caps-interactions-text": "(ValueError: ",
                           "caps-huge-thickness": "(a scribble thickness of (1000000000.0, 1.0, 1.0) voxels)",
                           "upload-html": "(JSONDecodeError: "}.items():
        error = outcomes[fault]["error"]
        assert error.startswith(f"The server at {hostile}/{fault} sent a reply this client cannot read {telling}"), \
            error


def test_plain_http_to_another_computer_is_warned_of_and_a_non_url_refused():
    said = []
    with pytest.raises(InteractiveError, match="Cannot reach the nnInteractive server at http://gpu.invalid:8000"):
        InteractiveSession("http://gpu.invalid:8000", "key", status=said.append).connect()
    assert said == ["Warning: gpu.invalid is reached over plain http://, so the API key and the image travel "
                    "unencrypted: use its https:// address (a pod's proxy URL) or an SSH tunnel."]
    for loopback in ("http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1", "https://gpu.invalid:1"):
        with pytest.raises(InteractiveError, match="Cannot reach"):
            InteractiveSession(loopback, "key", status=said.append).connect()
    assert len(said) == 1
    with pytest.raises(InteractiveError, match=r"^gpu\.example:8000 is not a server address: give one like "
                                               r"https://host:port\.$"):
        InteractiveSession("gpu.example:8000", "key").connect()
