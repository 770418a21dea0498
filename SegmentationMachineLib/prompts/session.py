"""AI prompt tools: an nnInteractive session over the upstream client (nninteractive-client 2.6).

The server gets a region of the volume (region.py: the body's box, as many slices as one request
through RunPod's proxy may carry), in its native dtype (the client compresses it), copied and sent
off the main thread; a new region goes only when a prompt falls outside it or the voxels change.
Prompts in world RAS are mapped through the volume's parent transform to its voxel grid, then to the
region; each result (the changed box the server returns) is pasted at the region's place in the
selected segment through Slicer's Segment Editor logic, so masking and overwrite settings hold and
other segments are respected, and it lands on the volume's voxels in world whatever transforms the
volume and the segmentation are under (frames.py). A result the server cut at a face of the region
(it reaches one that cuts the volume) is not written: the prompt runs again, from the segment as it
was, on a region that holds more of it (at most MAX_RERUNS times, each within one request); where
none fits, or the larger one fails (a GPU out of memory), the cut result is written and the status
line says so. A prompt that changes nothing (an exclude click on background) is still kept by the server and shapes
later results: it is a step of its own, shown, saved and undone like the others. Undo and redo are kept here
(history.py), many levels deep; the server learns of undo, redo and hand
edits (Segment Editor paint or erase) before the next prompt, which re-seeds it with the segment as it
is. Only what the server's model takes is sent (its capabilities are read at connect). A lost session
(lease gone, server restarted, connection refused) is resumed without the user: claim, upload, seed
the current mask, repeat the prompt. A slow answer is waited for and never repeated: a large structure
can take many seconds, and a read time-out says so instead of reconnecting. No reply is trusted
(remote.py): a broken or hostile server ends in one sentence (errors.py), never in a crash.
"""

import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import slicer
import vtk

from ..core import arrays
from ..core.addresses import is_loopback
from ..core.errors import install_extra
from ..core.files import printable
from ..core.grids import bounding_box
from ..core.provenance import NNINTERACTIVE, mark_segment
from ..core.scene import BINARY_LABELMAP, forward_render_pauses
from . import errors, frames, geometry
from .errors import InteractiveError, NoSession
from .history import MAX_UNDO_BYTES, Step, UndoHistory
from .promptfile import Prompt
from .region import covers, cut_faces, Limits, Planner, RegionTooLarge, slices

RETRY_AFTER_S = 10  # what the server asks for when full; its client does not pass the header on
MAX_SCRIBBLE_THICKNESS = 20  # voxels; what a server prefers beyond that is not a scribble (and costs memory)
SMALLER_REGION_TRIES = 3  # uploads or prompts a proxy refuses as too large are tried on ever smaller regions
MAX_RERUNS = 3  # a prompt whose result the region cut runs again on a larger region at most this often


# Our prompt kinds -> the server's interaction names (supported_interactions in /capabilities).
INTERACTIONS = {"point": ("points",), "box": ("bbox2d", "bbox3d"), "scribble": ("scribble",), "lasso": ("lasso",)}


@dataclass
class Capabilities:
    interactions: frozenset  # the server's names the model takes: points, bbox2d, bbox3d, scribble, lasso
    initial_mask: bool  # the server can start from an existing segment
    undo: bool
    server_version: str
    licence: str
    scribble_thickness: tuple

    @property
    def prompt_types(self) -> tuple:
        return tuple(kind for kind, names in INTERACTIONS.items() if self.interactions.intersection(names))

    @property
    def box_3d(self) -> bool:
        return "bbox3d" in self.interactions

    def describe(self) -> str:
        """The prompt kinds as the user reads them, e.g. 'point, box (on one slice), scribble, lasso'."""
        return ", ".join("box (on one slice)" if kind == "box" and not self.box_3d else kind
                         for kind in self.prompt_types)


@dataclass
class PromptTiming:
    total_s: float
    server_s: float  # upstream client call: network, server, (de)compression
    client_s: float  # ours: mapping the prompt and writing the segment
    warning: str = ""  # a sentence about the result, for the status line: cut by the region sent
    changed: bool = True  # False: the server changed no voxel (the prompt still counts: it shapes later results)

    def __str__(self):
        return f"{self.total_s * 1000:.0f} ms ({self.server_s * 1000:.0f} ms server + network)"


@dataclass
class SegmentTarget:
    segmentation_node: object
    segment_id: str
    editor_logic: object  # vtkSlicerSegmentEditorLogic with its node set to this segmentation

    def exists(self) -> bool:
        """The segment is still there: not deleted, its segmentation not removed from the scene."""
        node = self.segmentation_node
        return node.GetScene() is not None and node.GetSegmentation().GetSegment(self.segment_id) is not None

    def same(self, other: "SegmentTarget") -> bool:
        return other is not None and (other.segmentation_node, other.segment_id) == (self.segmentation_node,
                                                                                     self.segment_id)


def headless_editor(scene, app_logic, segmentation_node, volume_node):
    """A Segment Editor logic and node outside Slicer's GUI (the module passes Slicer's own)."""
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor_node.SetAndObserveSegmentationNode(segmentation_node)
    editor_node.SetAndObserveSourceVolumeNode(volume_node)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetSegmentEditorNode(editor_node)
    forward_render_pauses(logic, app_logic)
    return logic


def _upstream():
    """(the upstream client module, our guarded client, httpx); imported on first use: the base install runs
    without them."""
    try:
        import blosc2
        import httpx
        from nnInteractive.inference.remote import remote_session

        from . import remote
    except ImportError:
        raise InteractiveError(f"The nnInteractive client is not installed: {install_extra('ai')} (in Slicer, the "
                               "module offers to install it).") from None
    # The client compresses the volume with blosc2, which keeps the GIL by default: inside Slicer that held
    # the main thread for 0.8 s during an upload (benchmarks/slicer_threads.py); released, 0.06 s.
    blosc2.set_releasegil(True)
    return remote_session, remote, httpx


@dataclass
class InteractiveSession:
    url: str
    api_key: str
    status: object = lambda message: None  # one sentence for the panel/CLI while waiting or resuming
    sleep: object = time.sleep
    max_wait_s: float = 300.0
    read_timeout_s: float = 120.0
    capabilities: Capabilities = None
    limits: Limits = field(default_factory=Limits)
    _client: object = None
    _volume_key: tuple = None
    _volume_node: object = None  # read on the main thread only: its parent transform places prompts and results
    _source: np.ndarray = None  # the volume's voxels (K, J, I), a view of Slicer's: copied on the worker
    _shape: tuple = None
    _planner: Planner = None
    _region: np.ndarray = None  # the box of the volume the server has (or is being sent)
    _sent: bool = False  # the server has _region's voxels
    _image: np.ndarray = None  # (1, K, J, I) of the region
    _matrix: np.ndarray = None
    _buffer: np.ndarray = None  # the segment in the region as we last wrote it or seeded the server with
    _mirror: np.ndarray = None  # the upstream client's target buffer: where the server's answers land
    _written: int = None  # the segment's modified time after our last write; another means a hand edit
    _in_sync: bool = False  # the server's state is _buffer plus the prompts since it was seeded
    _cancelled: "PendingPrompt" = None  # its thread may still write a late answer into _mirror
    _target: SegmentTarget = None
    _history: UndoHistory = field(default_factory=UndoHistory)
    # The server keeps one level of undo that restores its interaction channels exactly, so the model keeps
    # its memory of earlier prompts; deeper steps, redo and hand edits re-seed it (the model forgets them).
    _server_can_undo: bool = False  # the server's undo holds the last prompt, whose result the segment shows
    _undo_on_server: bool = False  # that prompt was undone here: the server follows before the next prompt
    _generation: int = 0  # sessions claimed: an undo meant for a lost session is not sent to its successor
    max_undo_bytes: int = MAX_UNDO_BYTES

    # -- connection ----------------------------------------------------------------------------
    def connect(self) -> Capabilities:
        self._check_url()
        self._client = self._claim()
        self.capabilities = self._capabilities(self._client)
        return self.capabilities

    def _check_url(self):
        url = urlsplit(self.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise InteractiveError(f"{printable(self.url)[:200]} is not a server address: "
                                   "give one like https://host:port.")
        if url.scheme == "http" and not is_loopback(url.hostname):
            self.status(f"Warning: {url.hostname} is reached over plain http://, so the API key and the image "
                        "travel unencrypted: use its https:// address (a pod's proxy URL) or an SSH tunnel.")

    def _capabilities(self, client) -> Capabilities:
        """What the server's model takes, read from its reply as far as this client can trust it."""
        try:
            interactions = frozenset(name for name, on in dict(client.supported_interactions).items() if on is True)
            thickness = tuple(float(t) for t in client.preferred_scribble_thickness or (1, 1, 1))
        except (TypeError, ValueError) as error:
            raise errors.bad_reply(self, error) from None
        if len(thickness) != 3 or not all(0 < t <= MAX_SCRIBBLE_THICKNESS for t in thickness):
            raise errors.bad_reply(self, f"a scribble thickness of {thickness} voxels")
        return Capabilities(
            interactions=interactions,
            initial_mask=client.supports_initial_label is True,
            undo=bool(client.supports_undo),
            server_version=printable(client.INFERENCE_SESSION_VERSION)[:40],
            licence=printable(client.license or "unknown")[:80],
            scribble_thickness=thickness,
        )

    def _claim(self, resuming: bool = False):
        upstream, remote, httpx = _upstream()
        waited = 0.0
        while True:
            try:
                with errors.sentences(self, errors.RESUME if resuming else errors.CONNECT):
                    return remote.GuardedSession(self.url, self.api_key, self.read_timeout_s, self.limits.request_bytes)
            except upstream.ServerAtCapacityError:  # the server said it is full: wait for a free session
                if waited >= self.max_wait_s:
                    raise InteractiveError(f"The nnInteractive server at {self.url} is still full after "
                                           f"{waited:.0f} s: try again later or start your own GPU pod.") from None
                self.status(f"The server is full (all its sessions are in use); trying again in {RETRY_AFTER_S} s.")
                self.sleep(RETRY_AFTER_S)
                waited += RETRY_AFTER_S

    def _call(self, action, abandoned=lambda: False):
        """Runs action(client). Only a lost session (lease gone: reaped or server restarted; connection
        refused) is resumed, once, and the action repeated. A time-out or a broken connection is never
        repeated: the server may still be working on it, or have done it."""
        upstream, remote, httpx = _upstream()
        with errors.sentences(self, errors.REQUEST):
            try:
                if self._client is None:  # the last resume failed (the server was away): resume now
                    raise NoSession
                return action(self._client)
            except (upstream.SessionExpiredError, httpx.ConnectError, NoSession):
                if abandoned():  # a cancelled prompt's thread leaves the session alone
                    raise
                self.status("The server session was lost; reconnecting and restoring the segment.")
                self._resume()
                return action(self._client)

    def _resume(self):
        lost, self._client = self._client, None
        _close_quietly(lost)  # its lease is gone anyway
        client = self._claim(resuming=True)
        self._generation += 1
        try:
            self.capabilities = self._capabilities(client)  # a restarted server may run with other flags (--no-undo)
            if self._image is not None:
                client.set_image(self._image)
                self._image_client = client
            if self._buffer is not None and self._buffer.shape == self._image.shape[1:]:  # else a new region: seeded next
                self._seed(client, self._buffer.astype(np.uint8))
        except BaseException:
            _close_quietly(client)  # else upstream's client goes on heartbeating its lease
            raise
        self._client = client

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- volume and segment --------------------------------------------------------------------
    def set_volume(self, volume_node):
        """Sends the volume unless these exact voxels were sent already."""
        self.stage_volume(volume_node)()

    def select_segment(self, target: SegmentTarget):
        """Main thread: prompts go into target from now on; the next one seeds the server with its mask. A
        segmentation with no grid of its own gets the volume's, as the Segment Editor gives it; one with its own
        keeps it, and prompts on another series' grid are written on it."""
        self._target = target
        if self._volume_node is not None and not frames.reference_geometry(target.segmentation_node):
            target.segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(self._volume_node)
        segmentation = target.segmentation_node.GetSegmentation()
        if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
            segmentation.CreateRepresentation(BINARY_LABELMAP)
        self._buffer = None  # read at the next prompt, which seeds the server (only the region: cheap)
        self._written = self._modified_time()
        self._in_sync = False

    def stage_volume(self, volume_node):
        """Main thread, instant: keeps a view of the voxels; returns the upload (choosing the first region,
        copying it, sending it), which may run on a worker thread: it touches numpy arrays only. The view holds
        Slicer's scalar array, so VTK allocates new scalars rather than resizing these under the copy. Another
        volume, or new voxels, clears the undo history: its steps' boxes are on the grid they were made on."""
        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime())
        if key == self._volume_key:
            return lambda: None
        self._volume_key, self._volume_node = key, volume_node
        self._history.clear()
        self._matrix = arrays.ijk_to_ras(volume_node)
        self._source = arrays.volume_array(volume_node)
        self._shape = self._source.shape
        self._planner = self._region = self._image = None
        self._sent, self._image_client = False, None  # _image_client: the client whose session holds _image
        if self._target is not None:
            self.select_segment(self._target)  # read again on the new grid
        return self._send_first_region

    def _send_first_region(self):
        """Worker: the body's box, as many slices as one request carries; smaller when refused as too large."""
        upstream, remote, httpx = _upstream()
        self._planner = Planner(self._source, self.limits, remote.pack_image)
        for _ in range(SMALLER_REGION_TRIES):
            if self._send_region(self._planner.first()):
                return
        raise InteractiveError(f"The proxy in front of {self.url} refused three ever smaller uploads of this volume "
                               "(too large or too slow for it): reach the server without the proxy (an SSH tunnel "
                               "to it, or its address on your own network).")

    def _send_region(self, region) -> bool:
        """Worker: copies region out of the volume and sends it. False when it was refused as too large for one
        request (our cap, or the proxy's 413 or 524): the planner then knows to choose a smaller one."""
        self._image = np.ascontiguousarray(self._source[slices(region)])[np.newaxis]
        self._region, self._sent, self._image_client = region, False, None
        self._mirror = np.zeros(self._image.shape[1:], np.uint8)
        refused = self._call(self._upload)
        if refused:
            self.status(f"The upload ({refused / 1e6:.1f} MB) was too large for one request: sending a smaller "
                        "region.")
            return False
        self._planner.learn(self._image.size, self._client.last_sent)
        self._sent = True
        return True

    def _upload(self, client) -> int:
        """The region's voxels to the server; 0, or the bytes of a body refused as too large or too slow."""
        upstream, remote, httpx = _upstream()
        if client is self._image_client:  # the resume of a lost session has just sent it
            return 0
        try:
            client.set_image(self._image)
            self._image_client = client
            return 0
        except remote.RequestTooLarge as error:  # our estimate of the packed size was short
            self._planner.learn(self._image.size, error.size)
            return error.size
        except httpx.HTTPStatusError as error:
            if error.response.status_code not in (413, 524):  # Cloudflare: body over its cap / over 100 s
                raise
            self._planner.refused(client.last_sent)
            return client.last_sent

    @property
    def region_note(self) -> str:
        """Where the server's region lies, for the status line, e.g. 'slices 301-620 of 1000 on the server'."""
        if self._region is None:
            return "no image on the server"
        (k0, j0, i0), (k1, j1, i1) = self._region
        return f"slices {k0 + 1}-{k1} of {self._shape[0]} on the server"

    def _modified_time(self):
        """VTK's modified time of the segment's labelmap: any write to its voxels changes it."""
        segment = self._target.segmentation_node.GetSegmentation().GetSegment(self._target.segment_id)
        labelmap = None if segment is None else segment.GetRepresentation(BINARY_LABELMAP)  # None: deleted
        return None if labelmap is None else labelmap.GetMTime()

    def _grid(self):
        """(the volume's IJK to the segmentation's RAS, None), or (its own IJK to RAS, the non-linear transform
        from its RAS to the segmentation's); read at each use, as the user may move either node meanwhile."""
        return frames.volume_in_segmentation(self._volume_node, self._target.segmentation_node, self._matrix)

    def _segment_mask(self, segment_id, box: tuple = None) -> np.ndarray:
        """The segment in the volume's K, J, I grid (only box, when given)."""
        box = box or tuple(slice(0, n) for n in self._shape)
        segment = self._target.segmentation_node.GetSegmentation().GetSegment(segment_id)
        labelmap = segment.GetRepresentation(BINARY_LABELMAP)
        out = np.zeros(tuple(b.stop - b.start for b in box), bool)
        if labelmap is None or labelmap.GetPointData().GetScalars() is None:
            return out
        grid, between = self._grid()
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        if between is not None or not np.allclose(arrays.matrix_to_array(matrix), grid, atol=1e-6):
            return self._resampled_mask(labelmap, segment.GetLabelValue(), box, grid, between, out)
        # Same grid (the usual case): read the box straight from Slicer's shared labelmap.
        extent = labelmap.GetExtent()
        starts = (extent[4], extent[2], extent[0])
        stops = (extent[5] + 1, extent[3] + 1, extent[1] + 1)
        low = [max(b.start, s) for b, s in zip(box, starts)]
        high = [min(b.stop, e) for b, e in zip(box, stops)]
        if any(lo >= hi for lo, hi in zip(low, high)):
            return out
        values = arrays.image_array(labelmap)
        source = tuple(slice(lo - s, hi - s) for lo, hi, s in zip(low, high, starts))
        target = tuple(slice(lo - b.start, hi - b.start) for lo, hi, b in zip(low, high, box))
        out[target] = values[source] == segment.GetLabelValue()
        return out

    @staticmethod
    def _resampled_mask(labelmap, label_value: int, box: tuple, grid, between, out: np.ndarray) -> np.ndarray:
        """A segment stored on another grid, or across a non-linear transform, resampled into out (box of the
        volume's grid), nearest neighbour: only where its voxels land, as through a non-linear transform a whole
        512 x 512 x 300 volume takes seconds."""
        occupied = [0, -1, 0, -1, 0, -1]
        if not slicer.vtkOrientedImageDataResample.CalculateEffectiveExtent(labelmap, occupied):
            return out  # no voxel of any segment in its layer
        to_volume = None if between is None else frames.inverse(between)
        landed = frames.landing_extent(labelmap, occupied, to_volume, grid)
        low = np.maximum([b.start for b in box], landed[4::-2])  # K, J, I
        high = np.minimum([b.stop for b in box], np.add(landed[5::-2], 1))
        if (low >= high).any():
            return out
        resampled = frames.resample(labelmap, grid, to_volume, [v for lo, hi in zip(low[::-1], high[::-1])
                                                                for v in (int(lo), int(hi) - 1)])
        out[tuple(slice(lo - b.start, hi - b.start) for lo, hi, b in zip(low, high, box))] = \
            arrays.image_array(resampled) == label_value
        return out

    # -- prompts ---------------------------------------------------------------------------
    def add(self, prompt: Prompt) -> PromptTiming:
        """Runs one prompt (again on a larger region while the region cuts its result) and writes its result into
        the selected segment."""
        for tries_left in reversed(range(SMALLER_REGION_TRIES)):
            pending = self.prepare(prompt)
            try:
                box = pending.run()
                break
            except RegionRefused:  # the planner halved its budget: a smaller region, without a person to ask
                if not tries_left:
                    raise
        timing = self.finish(pending, box)
        while pending.again is not None:
            pending = pending.again
            try:
                box = pending.run()
            except InteractiveError as error:
                return self.keep_cut(pending, str(error))
            timing = self.finish(pending, box)
        return timing

    def check(self, prompt: Prompt):
        """Raises the sentence the user sees if prompt cannot be sent: outside the image, or of a kind the
        server's model does not take. Nothing is sent."""
        self._prompt_call(prompt)

    def prepare(self, prompt: Prompt) -> "PendingPrompt":
        """Main thread: maps the prompt to voxels and notices hand edits. Its run() touches no scene and may
        go to a worker thread."""
        self._check_target()
        footprint, place = self._prompt_call(prompt)
        region, note = None, ""
        if not (self._sent and covers(self._region, footprint, self._shape, self.limits.edge)):
            region = self._planner.toward(self._region, footprint)  # grown, or moved where growing does not fit
            note = f"sending slices {region[0, 0] + 1}-{region[1, 0]} first (the prompt is outside the region sent)"
        return self._pending(prompt, footprint, place, region, note)

    def _check_target(self):
        if self._target is None or self._planner is None:
            raise InteractiveError("Choose a source volume and a segment before prompting.")
        if not self._target.exists():
            raise InteractiveError("The segment chosen for AI prompts was deleted: choose or add another segment.")

    def _pending(self, prompt: Prompt, footprint, place, region, note: str, started: float = None,
                 **more) -> "PendingPrompt":
        """The prompt, placed in region (a new one to send first) or else in the region the server has."""
        if region is not None:
            self._in_sync = False
        seed = self._seed_call(self._region if region is None else region)
        self._in_sync = False  # until its answer is written: a prompt cancelled or failed leaves it unknown
        origin = (self._region if region is None else region)[0]
        return PendingPrompt(self, prompt, seed, place(origin), started or time.perf_counter(), region=region,
                             note=note, footprint=footprint, place=place, **more)

    def finish(self, pending: "PendingPrompt", box) -> PromptTiming:
        """Main thread, after run(): writes the changed box into the segment; or, where the result reaches a face of
        the region that cuts the volume and a larger region fits, writes nothing and sets pending.again, the same
        prompt on that region: run it and finish it in turn."""
        warning, changed, synced = "", bool(box), True
        self._still_there()
        if not changed:  # no box: the server keeps the prompt all the same; recorded as one that changed nothing
            self._remember(Step.nothing(self._target, self._recorded(pending.prompt), pending.footprint[0]))
        else:
            box = np.array(box).T  # (2, 3) in the region's voxels
            cut = cut_faces(self._region, self._shape, box, self._mirror[slices(box)], self._buffer[slices(box)])
            if cut.any():
                pending.again, warning = self._again(pending, box, cut)
            if pending.again is not None:  # kept in case the larger region fails
                pending.again.cut = (self._in_volume(slices(box)), self._mirror[slices(box)].astype(bool))
            else:
                synced, changed = self._write(pending.prompt, slices(box))
        if pending.again is None:
            self._in_sync = synced
            self._server_can_undo = self.capabilities.undo  # its one level holds this prompt, changed or not
        if warning:
            self.status(warning)
        total = time.perf_counter() - pending.started
        return PromptTiming(total, pending.server_s, total - pending.server_s, warning, changed)

    def keep_cut(self, pending: "PendingPrompt", problem: str) -> PromptTiming:
        """Main thread, after pending (a prompt run again on a larger region) failed with problem: writes the result
        the earlier region cut, which would otherwise be lost with the seconds it took, and says why it may be cut."""
        self._still_there()
        self._paste(pending.prompt, *pending.cut)
        self._in_sync = False  # the server's state is unknown: the next prompt re-seeds it
        cause = problem.replace("; the segment is left as it was", "").rstrip(".")  # it is not: the first result is in
        warning = (f"The result reaches the edge of the part of the scan sent and may be cut off there, as running the "
                   f"prompt on a larger part failed: {cause[:1].lower()}{cause[1:]}; place a prompt on the structure "
                   "beyond that edge to continue it.")
        self.status(warning)
        total = time.perf_counter() - pending.started
        return PromptTiming(total, pending.server_s, total - pending.server_s, warning)

    def _still_there(self):
        """Before writing a result: the segment may have been deleted while the prompt ran."""
        if not self._target.exists():
            self._in_sync = False
            raise InteractiveError("The segment was deleted while the prompt ran; nothing was written: choose or add "
                                   "another segment.")

    def _again(self, pending: "PendingPrompt", box: np.ndarray, cut: np.ndarray) -> tuple:
        """(the prompt again, on a region holding its result and reaching past the cut faces, None), or (None, the
        sentence saying the result may be cut) where no such region fits or the prompt ran again often enough."""
        found = bounding_box(self._mirror[slices(box)] > 0)
        result = np.array([[s.start for s in found], [s.stop for s in found]]) + box[0] + self._region[0]
        why = f"the prompt ran on larger parts {MAX_RERUNS} times already"
        if pending.reruns < MAX_RERUNS:
            try:
                region = self._planner.beyond(result, pending.footprint, cut)
                note = (f"its result reaches the edge of the part of the scan sent: sending slices "
                        f"{region[0, 0] + 1}-{region[1, 0]} and repeating the prompt")
                return self._pending(pending.prompt, pending.footprint, pending.place, region, note,
                                     started=pending.started, server_s=pending.server_s,
                                     reruns=pending.reruns + 1), ""
            except RegionTooLarge:
                why = "a part that holds more of it does not fit in one upload"
        return None, (f"The result reaches the edge of the part of the scan sent ({self.region_note}) and may be cut "
                      f"off there: {why}; place a prompt on the structure beyond that edge to continue it.")

    def _seed_call(self, region):
        """None when the server's state matches the segment; the server's own undo when the last prompt was
        undone here; otherwise (segment painted or erased by hand, undone deeper, or the server's state
        unknown) the call that restarts the server from the segment as it is. The model then forgets earlier
        prompts, so this happens only when needed."""
        undo, self._undo_on_server = self._undo_on_server, False
        if not (self._in_sync and self._modified_time() == self._written):
            current = self._segment_mask(self._target.segment_id, slices(region))
            self._written = self._modified_time()
            if not (self._in_sync and np.array_equal(current, self._buffer)):  # else another segment of a shared labelmap
                self._buffer = current
                seed = current.astype(np.uint8)
                return lambda client: self._seed(client, seed)
        if undo:
            generation = self._generation
            return lambda client: self._server_undo(client, generation)
        return None

    def _server_undo(self, client, generation: int):
        """The server's own undo; where it has nothing to undo (it answers False: restarted, or run with --no-undo),
        it starts from the segment as undone here instead."""
        if generation == self._generation and not client.undo():  # else a resumed session was seeded already
            self._seed(client, self._buffer.astype(np.uint8))

    def _after_cancelled(self):
        """Worker: waits for a cancelled prompt's thread (a late answer, a region upload) before changing what the
        server has. Costs nothing: the server finishes that prediction first anyway."""
        cancelled, self._cancelled = self._cancelled, None
        if cancelled is not None:
            cancelled.finished.wait()

    def _seed(self, client, seed: np.ndarray):
        """The server restarts from seed: no interactions, seed as the mask, answers into our mirror."""
        self._after_cancelled()
        client.set_target_buffer(self._mirror)
        client.reset_interactions()
        self._server_can_undo = False
        if not seed.any():
            return
        if self.capabilities.initial_mask:
            client.add_initial_seg_interaction(seed)
        else:
            self.status("This server's model cannot start from the segment's voxels: around the prompt its result "
                        "replaces them (Undo brings them back); prompt into a new segment to keep them apart.")

    def _require(self, interactions, what: str, advice: str):
        """The server answers HTTP 400 to what its model does not take: refused here, in one sentence."""
        if not self.capabilities.interactions.intersection(interactions):
            raise InteractiveError(f"{what}, which this server's model does not take; {advice}.")

    def _prompt_call(self, prompt: Prompt):
        """(the prompt's voxel box in the volume, call(origin): its client call in the voxels of a region that
        starts at origin)."""
        shape, matrix, include = self._shape, self._matrix, prompt.include
        to_local = frames.world_to_local(self._volume_node)  # the views' world RAS -> the volume's own
        others = ", ".join(k for k in self.capabilities.prompt_types if k != prompt.kind)
        self._require(INTERACTIONS[prompt.kind], f"A {prompt.kind}", f"use another kind of prompt ({others})")
        if prompt.kind == "point":
            voxel = np.array(geometry.point_voxel(matrix, shape, prompt.ras, to_local))
            return np.array([voxel, voxel + 1]), lambda origin: lambda client: client.add_point_interaction(
                tuple(int(v) for v in voxel - origin), include_interaction=include)
        if prompt.kind == "box":
            box = np.array(geometry.box_voxels(matrix, shape, prompt.ras_min, prompt.ras_max, to_local)).T
            if (box[1] - box[0] > 1).all():  # one voxel thick on any axis makes it a 2D box to the server
                self._require({"bbox3d"}, "A 3D box", "draw the box on one slice")
            return box, lambda origin: lambda client: client.add_bbox_interaction(
                (box - origin).T.tolist(), include_interaction=include)
        # Scribbles and lassos travel as crops with their box, not as whole-volume masks.
        if prompt.kind == "scribble":
            mask, box = geometry.scribble_mask(matrix, shape, prompt.ras_points, self.capabilities.scribble_thickness,
                                             to_local)
            add = "add_scribble_interaction"
        else:
            mask, box = geometry.lasso_mask(matrix, shape, prompt.ras_points, to_local)
            add = "add_lasso_interaction"
        box = np.array(box).T
        return box, lambda origin: lambda client: getattr(client, add)(
            mask.astype(np.uint8), include_interaction=include, interaction_bbox=(box - origin).T.tolist())

    def _write(self, prompt: Prompt, local: tuple) -> tuple:
        """Pastes the server's changed box (in the region) at its place in the segment. A hand edit made while the
        prompt ran stays: then only the voxels the server changed are written. (in sync, changed): in sync when the
        segment holds the server's state there; not (the next prompt re-seeds the server) after such an edit or where
        the Segment Editor's masking kept voxels out. Changed: a voxel of the segment changed (the server answers with
        the whole box it predicted, also where nothing changed in it)."""
        result, box = self._mirror[local].astype(bool), self._in_volume(local)
        edited = self._modified_time() != self._written
        if edited:
            result = np.where(result != self._buffer[local], result, self._segment_mask(self._target.segment_id, box))
        self._buffer[local], changed = self._paste(prompt, box, result)
        return not edited and np.array_equal(self._buffer[local], self._mirror[local].astype(bool)), changed

    def _in_volume(self, local: tuple) -> tuple:
        """A box of the region's voxels as the volume's."""
        return tuple(slice(b.start + int(o), b.stop + int(o)) for b, o in zip(local, self._region[0]))

    def _paste(self, prompt: Prompt, box: tuple, mask: np.ndarray) -> tuple:
        """Sets the segment to mask in box (the volume's voxels), as one undoable step; returns (what the editor's
        masking actually allowed, whether any voxel changed). A step that changed nothing keeps no masks: the
        server's box can be a large structure's whole refined region, and clicks that change nothing would push real
        steps out of the undo history's memory."""
        segment_id = self._target.segment_id
        untouched = self._modified_time() == self._written  # else a hand edit made meanwhile: the next prompt sees it
        before = self._segment_mask(segment_id, box)
        others = self._others(box, mask & ~before)
        self._modify(box, mask, bypass_masking=False, before=before)
        after = self._segment_mask(segment_id, box)
        taken = {other: had & ~self._segment_mask(other, box) for other, had in others.items()}
        mark_segment(self._target.segmentation_node, segment_id, NNINTERACTIVE)  # its DICOM SEG says AI made it
        if untouched:
            self._written = self._modified_time()
        taken = {other: voxels for other, voxels in taken.items() if voxels.any()}
        changed = bool(taken) or not np.array_equal(before, after)
        self._remember(Step(self._target, self._recorded(prompt), box, before, after, taken) if changed
                       else Step.nothing(self._target, self._recorded(prompt), [b.start for b in box]))
        return after, changed

    def _recorded(self, prompt: Prompt) -> Prompt:
        """The prompt as its step keeps it: in the volume's own frame, for prompt files the CLI replays on the series as
        loaded, untransformed."""
        return prompt.mapped(frames.world_to_local(self._volume_node))

    def _others(self, box: tuple, added: np.ndarray) -> dict:
        """{segment ID: its voxels in box that are in added} of the other segments that adding added may overwrite
        (the Segment Editor's overwrite setting), for undo to give them back."""
        editor = self._target.editor_logic.GetSegmentEditorNode()
        if not added.any() or editor.GetOverwriteMode() == editor.OverwriteNone:
            return {}
        crop = bounding_box(added)  # read only there: a segmentation may hold a hundred segments
        inner = tuple(slice(b.start + c.start, b.start + c.stop) for b, c in zip(box, crop))
        segmentation, others = self._target.segmentation_node.GetSegmentation(), {}
        for other in (segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())):
            had = self._segment_mask(other, inner) & added[crop]
            if other != self._target.segment_id and had.any():
                others[other] = np.zeros_like(added)
                others[other][crop] = had
        return others

    def _remember(self, step: Step):
        warning = self._history.remember(step, self.max_undo_bytes)
        if warning:
            self.status(warning)

    def _modify(self, box, mask: np.ndarray, bypass_masking: bool, before: np.ndarray = None, segment_id: str = None):
        """Sets the selected segment, or segment_id of its segmentation (before: its voxels in box, if read already),
        to mask inside box through the Segment Editor logic: erases what mask drops, then adds what it holds. (The
        logic's Set mode replaces the whole segment, whatever extent it is given: a result pasted that way erased
        every earlier one outside its box.) Each change is resampled onto the segmentation's reference grid, where
        the Segment Editor keeps its masks, unless the volume's grid is that grid: Slicer writes a labelmap of
        another grid by resampling the segmentation's whole shared labelmap onto it, so a prompt on a coarser
        series coarsened every segment."""
        segment_id = segment_id or self._target.segment_id
        before = self._segment_mask(segment_id, box) if before is None else before
        segmentation, grid, between = self._target.segmentation_node, *self._grid()
        reference = frames.reference_grid(segmentation, grid if between is None else self._matrix)
        resampled = between is not None or not np.allclose(reference, grid, atol=1e-6)
        logic = self._target.editor_logic
        if not bypass_masking:  # the masks are made around the selected segment
            logic.GetSegmentEditorNode().SetSelectedSegmentID(segment_id)
        # Each masked call makes the edit mask from the other segments itself (a pass over the volume).
        changes = ((logic.ModificationModeRemove, before & ~mask), (logic.ModificationModeAdd, mask & ~before))
        for mode, voxels in changes:
            if voxels.any():
                crop = bounding_box(voxels)  # only where it changes: less to resample, less to mask
                start = [b.start + c.start for b, c in zip(box, crop)]
                modifier = arrays.labelmap_from_array(voxels[crop], grid, start)
                if resampled:
                    modifier = frames.resample(modifier, reference, between)
                logic.ModifySegmentByLabelmap(segmentation, segment_id, modifier, mode,
                                              modifier.GetExtent(), False, bypass_masking)

    # -- undo / redo -------------------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return self._history.can_undo

    @property
    def can_redo(self) -> bool:
        return self._history.can_redo

    def undo(self):
        self._history.undo(self._undo_step)

    def _undo_step(self, step: Step):
        # One step back from the server's state: its own undo, sent before the next prompt.
        follow = (step.target.same(self._target) and self._in_sync and self._server_can_undo
                  and self._modified_time() == self._written)
        self._restore(step, undo=True, in_sync=follow)
        self._undo_on_server, self._server_can_undo = follow, False

    def redo(self):
        self._history.redo(self._redo_step)

    def _redo_step(self, step: Step):
        # Redoing an undo the server has not been told of yet: the server is still where it was.
        follow = self._undo_on_server and self._in_sync and self._modified_time() == self._written
        self._restore(step, undo=False, in_sync=follow)
        self._undo_on_server, self._server_can_undo = False, follow

    def _restore(self, step: Step, undo: bool, in_sync: bool = False):
        """Local and instant: the server follows at the next prompt (its undo, or a re-seed). Only the voxels the
        step changed are set back (or again): hand edits elsewhere in its box stay; voxels it took from other
        segments go back to them (or are taken again). Prompts still go into the segment chosen, unless it is
        gone."""
        chosen, self._target = self._target, step.target
        try:
            restored = None if step.empty else self._set_back(step, undo)  # a prompt that changed nothing: as it is
        finally:
            self._target = chosen
        if chosen is None or not chosen.exists():
            self.select_segment(step.target)
            return
        if in_sync and restored is not None:  # the server's state: its part inside the region
            box = np.array([[b.start for b in step.box], [b.stop for b in step.box]])
            inside = np.array([np.maximum(box[0], self._region[0]), np.minimum(box[1], self._region[1])])
            if (inside[0] < inside[1]).all():
                self._buffer[slices(inside - self._region[0])] = restored[slices(inside - box[0])]
        self._written = self._modified_time()
        self._in_sync = in_sync

    def _set_back(self, step: Step, undo: bool) -> np.ndarray:
        """Sets back (or again) the voxels step changed in its segment and took from others; returns its box's mask."""
        current = self._segment_mask(step.segment_id, step.box)
        restored = np.where(step.before != step.after, step.before if undo else step.after, current)
        self._modify(step.box, restored, bypass_masking=True, before=current)
        for other, taken in step.taken.items():
            if self._target.segmentation_node.GetSegmentation().GetSegment(other) is not None:
                had = self._segment_mask(other, step.box)
                self._modify(step.box, had | taken if undo else had & ~taken, True, before=had, segment_id=other)
        return restored

    def reset(self):
        """Clears the selected segment (undoable); the next prompt starts the server from the empty segment."""
        self._check_target()
        box = tuple(slice(0, n) for n in self._shape)
        before = self._segment_mask(self._target.segment_id)
        step = Step(self._target, Prompt("reset"), box, before, np.zeros_like(before))
        self._remember(step)
        self._restore(step, undo=False)
        self._undo_on_server = self._server_can_undo = False

    def prompts_of(self, segment_id: str, segmentation_node=None) -> list:
        """The prompts that made the segment (of segmentation_node, where given) as it stands (undone ones left out),
        for prompt files: in the volume's own RAS, as mapped when each was made."""
        prompts = []
        for step in self._history.record:  # those that changed nothing too: the server kept them
            if step.segment_id == segment_id and segmentation_node in (None, step.target.segmentation_node):
                prompts = [] if step.prompt.kind == "reset" else prompts + [step.prompt]
        return prompts

    def prompts_shown(self) -> tuple:
        """(the volume node, the prompts that made the segment chosen as it stands, in its own RAS): what the views
        show of them (panels/prompttrail.py); none for a segment deleted meanwhile."""
        if self._target is None or not self._target.exists():
            return self._volume_node, []
        return self._volume_node, self.prompts_of(self._target.segment_id, self._target.segmentation_node)


@dataclass
class PendingPrompt:
    session: InteractiveSession
    prompt: Prompt
    seed: object  # None, or the call that first restarts the server from the segment
    call: object
    started: float
    region: np.ndarray = None  # a new region, sent first
    note: str = ""  # what the wait is about, beyond the prediction
    footprint: np.ndarray = None  # the prompt's voxel box in the volume
    place: object = None  # origin -> the prompt's client call in a region starting there
    reruns: int = 0  # times the prompt ran before on regions that cut its result
    again: "PendingPrompt" = None  # set by finish(): the prompt to run next, on a larger region
    cut: tuple = None  # (box in the volume, mask): the result an earlier region cut, kept if this run fails
    server_s: float = 0.0  # in run(), of this try and the earlier ones
    cancelled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    def run(self):
        """The server round trip (resuming a lost session on the way); returns the changed box."""
        started = time.perf_counter()
        abandoned = lambda: self.cancelled
        try:
            if self.session._cancelled is not self:
                self.session._after_cancelled()
            if self.region is not None and not self.session._send_region(self.region):
                raise RegionRefused("The new region was larger than one request may carry; the segment is left as "
                                    "it was: prompt again (the next region is chosen smaller).")
            if self.seed:
                self.session._call(self.seed, abandoned)
            return None if self.cancelled else self.session._call(self.call, abandoned)
        finally:
            self.server_s += time.perf_counter() - started
            self.finished.set()

    def cancel(self):
        """Main thread: stop waiting. The answer, whenever it comes, is not written (finish() is not called);
        the session's next prompt re-seeds the server with the segment as it is."""
        self.cancelled = True
        self.session._cancelled = self


class RegionRefused(InteractiveError):
    """The proxy refused a prompt's new region as too large or too slow; the planner chooses a smaller one next."""


def _close_quietly(client):
    try:
        if client is not None:
            client.close()
    except Exception:  # a server that is away cannot release a lease; its reaper will
        pass

