"""AI prompts on a 1000-slice volume through a proxy that behaves like RunPod's (Cloudflare in front).

The proxy, written here, stands between the client and the real upstream nnInteractive server on
CPU: it answers 413 to a body over its cap, 524 to a request not answered within its time
limit (counted from the request's first byte, the upload included) and 502 with an HTML page while
the server is down (restarting), optionally reading bodies at a slow uplink's rate. Everything is
scaled down (a 64x64x1000 volume, caps in kB, limits in seconds) so the test stays fast; the
session's region logic is the one a 512x512x1000 CT meets.
"""

import time

import numpy as np
import pytest

pytest.importorskip("torch")  # the server's model: only in .venv (scripts/test.sh, step 2)
pytest.importorskip("nnInteractive")

from cloudflare import CloudflareLike  # noqa: E402
from nninteractive_model import write_model_folder  # noqa: E402
from nninteractive_server import Server  # noqa: E402
from SegmentationMachineLib.core import arrays  # noqa: E402
from SegmentationMachineLib.prompts.promptfile import Prompt  # noqa: E402
from SegmentationMachineLib.prompts.region import Limits, RegionTooLarge  # noqa: E402
from SegmentationMachineLib.prompts.session import (  # noqa: E402
    headless_editor, InteractiveError, InteractiveSession, SegmentTarget)

KEY = "proxy-test-key-0123"
SHAPE = (1000, 64, 64)  # K, J, I
CAP = 400_000  # the proxy's body cap, scaled down from ~100 MB
MATRIX = np.array([[-0.8, 0, 0, 20.0], [0, -0.8, 0, 10.0], [0, 0, 1.0, -400.0], [0, 0, 0, 1]])  # LPS-like, mirrored


def ras(kji) -> tuple:
    k, j, i = kji
    return tuple((MATRIX @ [i, j, k, 1.0])[:3])


def limits(**changes) -> Limits:
    """The defaults scaled to the test: the test model's patch is 64 voxels, the volume 64 wide."""
    return Limits(**{"request_bytes": CAP, "context": 16, "edge": 4, "body_margin": 4, **changes})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(write_model_folder(tmp_path_factory.mktemp("nni") / "model"), KEY).start()
    yield running
    running.stop()


@pytest.fixture
def proxies(server):
    made = []

    def proxy(**options) -> CloudflareLike:  # RunPod's cap and time limit, scaled down
        made.append(CloudflareLike(server.port, **{"cap": CAP, "limit_s": 10.0, **options}))
        return made[-1]

    yield proxy
    for proxy in made:
        proxy.close()


@pytest.fixture
def scene_parts(ctx):
    """A 1000-slice CT-like volume: air (-1000 HU) around an elliptic body on every slice, with noise."""
    rng = np.random.default_rng(3)
    j, i = np.mgrid[0:SHAPE[1], 0:SHAPE[2]]
    body = ((j - 30) / 14) ** 2 + ((i - 32) / 18) ** 2 <= 1
    image = np.where(body, 40, -1000) + rng.normal(0, 20, SHAPE)
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "long")
    arrays.set_volume_array(volume, image.astype(np.int16), MATRIX)
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("", "target")
    return volume, SegmentTarget(segmentation, target, headless_editor(ctx.scene, ctx.app_logic, segmentation, volume))


def open_session(proxy, scene_parts, **options) -> InteractiveSession:
    volume, target = scene_parts
    session = InteractiveSession(proxy.url, KEY, **options)
    session.connect()
    session.set_volume(volume)
    session.select_segment(target)
    return session


def mask_of(session) -> np.ndarray:
    return session._segment_mask(session._target.segment_id)


def centred_on(mask: np.ndarray, kji) -> bool:
    """A ball of the test model: mask holds kji, and the voxels near it are centred on it."""
    k = kji[0]
    near = np.argwhere(mask[max(0, k - 6):k + 7]) + [max(0, k - 6), 0, 0]
    near = near[np.abs(near - kji).max(axis=1) <= 6]
    return bool(mask[tuple(kji)]) and np.allclose(near.mean(axis=0), kji, atol=0.01)


def test_a_1000_slice_volume_through_the_proxy_sends_a_region_that_follows_the_prompts(server, proxies, scene_parts):
    proxy = proxies()
    said = []
    points = server.count("Added new point interaction")
    session = open_session(proxy, scene_parts, status=said.append, limits=limits())
    (k0, j0, i0), (k1, j1, i1) = session._region
    assert min(j0, i0) > 0 and max(j1, i1) < 64  # air cut away around the body...
    assert 100 < k1 - k0 < 700 and k0 < 500 < k1  # ...and as many middle slices as one request carries
    assert session.region_note == f"slices {k0 + 1}-{k1} of 1000 on the server"

    session.add(Prompt("point", True, ras=ras((500, 30, 32))))
    assert centred_on(mask_of(session), (500, 30, 32)) and 20 <= mask_of(session).sum() <= 60
    session.add(Prompt("point", True, ras=ras((950, 28, 30))))  # far outside the region: it moves there
    assert session._region[0, 0] <= 950 - 16 and session._region[1, 0] >= 950 + 16
    session.add(Prompt("point", True, ras=ras((952, 2, 3))))  # in the air beside the body: the region grows
    assert tuple(session._region[0, 1:]) == (0, 0)
    session.add(Prompt("point", True, ras=ras((520, 36, 40))))  # back: the segment there was kept and re-seeded
    mask = mask_of(session)
    for spot in ((500, 30, 32), (950, 28, 30), (952, 2, 3), (520, 36, 40)):
        assert centred_on(mask, spot), spot
    assert mask.sum() <= 4 * 60 and not mask[:400].any() and not mask[600:900].any()

    uploads = proxy.uploads()
    assert len(uploads) == 4 and all(status == 200 and length <= CAP for length, status in uploads)
    assert all(status == 200 for *_, status in proxy.seen) and said == []  # no 413, no 524, nothing to say
    assert server.count("Added new point interaction") == points + 4  # each prompt sent exactly once
    session.undo()
    session.undo()
    assert not mask_of(session)[952, 2, 3] and mask_of(session)[950, 28, 30]
    session.close()


def test_a_proxy_that_refuses_the_upload_gets_a_smaller_region_not_an_error(server, proxies, scene_parts):
    proxy = proxies(cap=150_000)  # a cap below what the client assumes
    said = []
    session = open_session(proxy, scene_parts, status=said.append, limits=limits())
    assert [status for _, status in proxy.uploads()][-1] == 200 and 413 in [s for _, s in proxy.uploads()]
    assert said and all(s.startswith("The upload (") and s.endswith("too large for one request: sending a smaller "
                                                                      "region.") for s in said)
    session.add(Prompt("point", True, ras=ras((500, 30, 32))))
    assert centred_on(mask_of(session), (500, 30, 32))
    session.close()


def test_a_later_region_the_proxy_refuses_is_sent_smaller_without_asking(server, proxies, scene_parts):
    """A prompt far from the region sent moves it; a proxy that refuses that upload (its limit tightened, the uplink
    slowed) ended `model --prompts` with 'prompt again' where nobody can: the prompt is sent on a smaller region."""
    proxy = proxies()
    said = []
    session = open_session(proxy, scene_parts, status=said.append, limits=limits())
    proxy.cap = int(proxy.uploads()[0][0] * 0.6)
    session.add(Prompt("point", True, ras=ras((950, 28, 30))))
    assert centred_on(mask_of(session), (950, 28, 30))
    assert [status for _, status in proxy.uploads()][1:] == [413, 200] and len(said) == 1
    session.close()


def test_a_slow_uplink_past_the_proxys_time_limit_gets_a_smaller_region(server, proxies, scene_parts):
    proxy = proxies(limit_s=1.5, uplink_bytes_per_s=200_000)  # the 100 s limit and a home uplink, scaled down
    session = open_session(proxy, scene_parts, limits=limits(uplink_bytes_per_s=2e6))  # assumes 10x the uplink
    statuses = [status for _, status in proxy.uploads()]
    assert 524 in statuses and statuses[-1] == 200
    assert proxy.uploads()[-1][0] <= 200_000 * 1.5
    session.add(Prompt("point", True, ras=ras((500, 30, 32))))
    assert centred_on(mask_of(session), (500, 30, 32))
    session.close()


def test_the_assumed_uplink_bounds_the_upload_to_the_time_allowed(server, proxies, scene_parts):
    proxy = proxies(limit_s=3.0, uplink_bytes_per_s=200_000)
    started = time.monotonic()
    session = open_session(proxy, scene_parts, limits=limits(uplink_bytes_per_s=200_000, request_s=1.0))
    assert [status for _, status in proxy.uploads()] == [200] and proxy.uploads()[0][0] <= 200_000
    assert time.monotonic() - started < 3.0
    session.close()


def test_a_volume_whose_least_region_cannot_fit_is_one_sentence_and_nothing_is_sent(server, proxies, scene_parts):
    proxy = proxies()
    with pytest.raises(RegionTooLarge) as error:
        open_session(proxy, scene_parts, limits=limits(request_bytes=20_000))
    assert str(error.value).startswith("The region a prompt needs (33x33x33 voxels, about ")
    assert str(error.value).endswith("is more than one upload may carry (20 kB: the proxy's limit, or 30 s at "
                                     "20 Mbit/s): crop or resample the volume, or reach the server without the proxy "
                                     "(an SSH tunnel to it, or its address on your own network).")
    assert proxy.uploads() == []


def test_a_server_restarting_behind_the_proxy_is_a_sentence_without_html_and_the_next_prompt_resumes(server, proxies,
                                                                                                      scene_parts):
    proxy = proxies()
    session = open_session(proxy, scene_parts, limits=limits())
    session.add(Prompt("point", True, ras=ras((500, 30, 32))))
    server.stop()
    try:
        for status in (502, 503):  # RunPod's proxy answers 502 while nothing listens; Cloudflare may say 503
            proxy.down_status = status
            with pytest.raises(InteractiveError) as error:
                session.add(Prompt("point", True, ras=ras((520, 36, 40))))
            assert str(error.value) == (
                f"The nnInteractive server at {proxy.url} is starting, restarting or unreachable through the proxy in "
                f"front of it (HTTP {status}); the segment is left as it was: wait a minute and try again.")
            assert (proxy.seen[-1][3], mask_of(session)[520, 36, 40]) == (status, False)
            with pytest.raises(InteractiveError) as error:  # connecting then: not "the server is full", waiting
                open_session(proxy, scene_parts, limits=limits(), max_wait_s=0)
            assert str(error.value) == (
                f"The nnInteractive server at {proxy.url} is starting, restarting or unreachable through the proxy in "
                f"front of it (HTTP {status}); the segment is left as it was: wait a minute and try again.")
    finally:
        server.start()
    session.add(Prompt("point", True, ras=ras((520, 36, 40))))  # a new lease, the region and the segment sent again
    assert centred_on(mask_of(session), (500, 30, 32)) and centred_on(mask_of(session), (520, 36, 40))
    session.close()
