"""AI prompt tools: an nnInteractive session over the upstream client (nninteractive-client 2.6).

The volume is sent once in its native dtype (the client compresses it) and again only when its
voxels change. Prompts in RAS are mapped to the voxel grid; each result (the changed box the
server returns) is written into the selected segment through Slicer's Segment Editor logic, so
masking and overwrite settings hold and other segments are respected. Undo and redo are kept
here, many levels deep; the server learns of undo, redo and hand edits (Segment Editor paint
or erase) before the next prompt, which re-seeds it with the segment as it is. Only what the
server's model takes is sent (its capabilities are read at connect). A lost session (lease gone,
server restarted, connection refused) is resumed without the user: claim, upload, seed the
current mask, repeat the prompt. A slow answer is waited for and never repeated: a large
structure can take many seconds, and a read time-out says so instead of reconnecting.
"""

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk

from ..core import arrays
from ..core.errors import UserError
from ..core.scene import BINARY_LABELMAP
from . import geometry
from .promptfile import Prompt

MAX_UNDO = 50
RETRY_AFTER_S = 10  # what the server asks for when full; its client does not pass the header on


class InteractiveError(UserError):
    """The nnInteractive server cannot be used (unreachable, key rejected, full, incompatible)."""


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

    def __str__(self):
        return f"{self.total_s * 1000:.0f} ms ({self.server_s * 1000:.0f} ms server + network)"


@dataclass
class _Step:
    segment_id: str
    prompt: Prompt
    box: tuple  # slices in K, J, I
    before: np.ndarray
    after: np.ndarray


@dataclass
class SegmentTarget:
    segmentation_node: object
    segment_id: str
    editor_logic: object  # vtkSlicerSegmentEditorLogic with its node set to this segmentation


def headless_editor(scene, app_logic, segmentation_node, volume_node):
    """A Segment Editor logic and node outside Slicer's GUI (the module passes Slicer's own)."""
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor_node.SetAndObserveSegmentationNode(segmentation_node)
    editor_node.SetAndObserveSourceVolumeNode(volume_node)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetSegmentEditorNode(editor_node)
    return logic


def _upstream():
    """(the upstream client module, httpx); imported on first use: the base install runs without them."""
    try:
        import httpx
        from nnInteractive.inference.remote import remote_session
    except ImportError:
        raise InteractiveError("The nnInteractive client is not installed: install it with "
                               "pip install 'segmentation-machine[ai]' (the module offers to do it).") from None
    return remote_session, httpx


@dataclass
class InteractiveSession:
    url: str
    api_key: str
    status: object = lambda message: None  # one sentence for the panel/CLI while waiting or resuming
    sleep: object = time.sleep
    max_wait_s: float = 300.0
    read_timeout_s: float = 120.0
    capabilities: Capabilities = None
    _client: object = None
    _volume_key: tuple = None
    _image: np.ndarray = None
    _matrix: np.ndarray = None
    _buffer: np.ndarray = None  # the segment as we last wrote it or seeded the server with (K, J, I)
    _mirror: np.ndarray = None  # the upstream client's target buffer: where the server's answers land
    _written: int = None  # the segment's modified time after our last write; another means a hand edit
    _in_sync: bool = False  # the server's state is _buffer plus the prompts since it was seeded
    _cancelled: "PendingPrompt" = None  # its thread may still write a late answer into _mirror
    _target: SegmentTarget = None
    _done: list = field(default_factory=list)
    _undone: list = field(default_factory=list)

    # -- connection ----------------------------------------------------------------------------
    def connect(self) -> Capabilities:
        self._client = self._claim()
        client = self._client
        self.capabilities = Capabilities(
            interactions=frozenset(name for name, on in client.supported_interactions.items() if on),
            initial_mask=bool(client.supports_initial_label),
            undo=bool(client.supports_undo),
            server_version=str(client.INFERENCE_SESSION_VERSION),
            licence=str(client.license or "unknown"),
            scribble_thickness=tuple(client.preferred_scribble_thickness or (1, 1, 1)),
        )
        return self.capabilities

    def _claim(self):
        upstream, httpx = _upstream()
        waited = 0.0
        while True:
            try:
                return upstream.nnInteractiveRemoteInferenceSession(self.url, api_key=self.api_key,
                                                                   read_timeout=self.read_timeout_s)
            except upstream.ServerAtCapacityError:
                if waited >= self.max_wait_s:
                    raise InteractiveError(f"The nnInteractive server at {self.url} is still full after "
                                           f"{waited:.0f} s: try again later or start your own GPU pod.") from None
                self.status(f"The server is full (all its sessions are in use); trying again in {RETRY_AFTER_S} s.")
                self.sleep(RETRY_AFTER_S)
                waited += RETRY_AFTER_S
            except httpx.HTTPStatusError as error:
                raise self._http_error(error) from None
            except httpx.TransportError as error:
                raise InteractiveError(f"Cannot reach the nnInteractive server at {self.url} "
                                       f"({type(error).__name__}): check the URL and that the server is running.") from None
            except KeyError as error:  # a reply without the fields this client version expects
                raise InteractiveError(f"The server at {self.url} speaks another nnInteractive protocol (missing "
                                       f"{error}); this client is nninteractive-client {_client_version()}: "
                                       "run server and client of the same version.") from None

    def _http_error(self, error) -> InteractiveError:
        code = error.response.status_code
        if code == 401:
            return InteractiveError(f"The nnInteractive server at {self.url} rejected the API key: "
                                    "enter the key the server was started with.")
        if code == 524:  # Cloudflare in front of RunPod's proxy ends a request after 100 s
            return InteractiveError(f"The proxy in front of {self.url} gave up waiting for the prediction (HTTP 524, "
                                    "after about 100 s); the segment is left as it was: try a smaller prompt, "
                                    "or reach the server without the proxy.")
        if code in (404, 405, 422):
            return InteractiveError(f"The server at {self.url} does not understand this client "
                                    f"(HTTP {code}; client nninteractive-client {_client_version()}, server "
                                    f"{self.capabilities.server_version if self.capabilities else 'unknown'}): "
                                    "run server and client of the same version.")
        detail = error.response.text[:200]
        return InteractiveError(f"The nnInteractive server answered HTTP {code} ({detail}): "
                                "try the prompt again, or reset the segment.")

    def _call(self, action, abandoned=lambda: False):
        """Runs action(client). Only a lost session (lease gone: reaped or server restarted; connection
        refused) is resumed, once, and the action repeated. A time-out or a broken connection is never
        repeated: the server may still be working on it, or have done it."""
        upstream, httpx = _upstream()
        try:
            try:
                return action(self._client)
            except (upstream.SessionExpiredError, httpx.ConnectError):
                if abandoned():  # a cancelled prompt's thread leaves the session alone
                    raise
                self.status("The server session was lost; reconnecting and restoring the segment.")
                self._resume()
                return action(self._client)
        except httpx.HTTPStatusError as error:
            raise self._http_error(error) from None
        except httpx.ReadTimeout:
            raise InteractiveError(f"The nnInteractive server has not answered within {self.read_timeout_s:g} s "
                                   "(a large structure can take that long); the segment is left as it was: "
                                   "prompt again to continue.") from None
        except httpx.TransportError as error:
            raise InteractiveError(f"The connection to the nnInteractive server at {self.url} failed during the "
                                   f"request ({type(error).__name__}); the segment is left as it was: "
                                   "prompt again to continue.") from None

    def _resume(self):
        try:
            self._client.close()
        except Exception:  # the old lease is gone anyway
            pass
        self._client = self._claim()
        if self._image is not None:
            self._client.set_image(self._image)
        if self._buffer is not None:
            self._seed(self._client, self._buffer.astype(np.uint8))

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- volume and segment --------------------------------------------------------------------
    def set_volume(self, volume_node):
        """Sends the volume unless these exact voxels were sent already."""
        self.stage_volume(volume_node)()

    def select_segment(self, target: SegmentTarget):
        """Main thread: prompts go into target from now on; the next one seeds the server with its mask."""
        self._target = target
        segmentation = target.segmentation_node.GetSegmentation()
        if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
            segmentation.CreateRepresentation(BINARY_LABELMAP)
        self._buffer = self._segment_mask(target.segment_id)
        self._written = self._modified_time()
        self._in_sync = False

    def stage_volume(self, volume_node):
        """Main thread: takes the voxels; returns the upload, which may run on a worker thread."""
        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime())
        if key == self._volume_key:
            return lambda: None
        self._volume_key = key
        self._matrix = arrays.ijk_to_ras(volume_node)
        self._image = arrays.volume_array(volume_node)[np.newaxis].copy()  # (1, K, J, I), native dtype
        self._mirror = np.zeros(self._image.shape[1:], np.uint8)
        if self._target is not None:
            self.select_segment(self._target)  # read again on the new grid
        return lambda: self._call(lambda client: client.set_image(self._image))

    def _modified_time(self):
        """VTK's modified time of the segment's labelmap: any write to its voxels changes it."""
        segment = self._target.segmentation_node.GetSegmentation().GetSegment(self._target.segment_id)
        labelmap = segment.GetRepresentation(BINARY_LABELMAP)
        return None if labelmap is None else labelmap.GetMTime()

    def _segment_mask(self, segment_id, box: tuple = None) -> np.ndarray:
        """The segment in the volume's K, J, I grid (only box, when given)."""
        shape = self._image.shape[1:]
        box = box or tuple(slice(0, n) for n in shape)
        segment = self._target.segmentation_node.GetSegmentation().GetSegment(segment_id)
        labelmap = segment.GetRepresentation(BINARY_LABELMAP)
        out = np.zeros(tuple(b.stop - b.start for b in box), bool)
        if labelmap is None or labelmap.GetPointData().GetScalars() is None:
            return out
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        if not np.allclose(arrays.matrix_to_array(matrix), self._matrix, atol=1e-6):
            return self._resampled_mask(labelmap, segment.GetLabelValue())[box]
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

    def _resampled_mask(self, labelmap, label_value: int) -> np.ndarray:
        """A segment stored on another grid, resampled onto the volume's (nearest neighbour)."""
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(0, self._image.shape[3] - 1, 0, self._image.shape[2] - 1, 0, self._image.shape[1] - 1)
        reference.SetImageToWorldMatrix(arrays.array_to_matrix(self._matrix))
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled)
        return arrays.image_array(resampled) == label_value

    # -- prompts ---------------------------------------------------------------------------
    def add(self, prompt: Prompt) -> PromptTiming:
        """Runs one prompt and writes its result into the selected segment."""
        pending = self.prepare(prompt)
        return self.finish(pending, pending.run())

    def check(self, prompt: Prompt):
        """Raises the sentence the user sees if prompt cannot be sent: outside the image, or of a kind the
        server's model does not take. Nothing is sent."""
        self._prompt_call(prompt)

    def prepare(self, prompt: Prompt) -> "PendingPrompt":
        """Main thread: maps the prompt to voxels and notices hand edits. Its run() touches no scene and may
        go to a worker thread."""
        if self._target is None or self._image is None:
            raise InteractiveError("Choose a source volume and a segment before prompting.")
        call = self._prompt_call(prompt)
        seed = self._seed_call()
        self._in_sync = False  # until its answer is written: a prompt cancelled or failed leaves it unknown
        return PendingPrompt(self, prompt, seed, call, time.perf_counter())

    def finish(self, pending: "PendingPrompt", box) -> PromptTiming:
        """Main thread, after run(): writes the changed box into the segment."""
        if box:
            self._write(pending.prompt, tuple(slice(int(lo), int(hi)) for lo, hi in box))
        self._in_sync = True
        total = time.perf_counter() - pending.started
        return PromptTiming(total, pending.server_s, total - pending.server_s)

    def _seed_call(self):
        """None when the server's state matches the segment; otherwise (segment painted or erased by hand,
        undone, or the server's state unknown) the call that restarts the server from the segment as it is.
        The model then forgets earlier prompts, so this happens only when needed."""
        if self._in_sync and self._modified_time() == self._written:
            return None
        current = self._segment_mask(self._target.segment_id)
        self._written = self._modified_time()
        if self._in_sync and np.array_equal(current, self._buffer):  # another segment of a shared labelmap
            return None
        self._buffer = current
        seed = current.astype(np.uint8)
        return lambda client: self._seed(client, seed)

    def _seed(self, client, seed: np.ndarray):
        """The server restarts from seed: no interactions, seed as the mask, answers into our mirror."""
        if self._cancelled:  # its late answer lands before the seed, not in the next prompt's answer
            self._cancelled.finished.wait()  # costs nothing: the server finishes that prediction first anyway
            self._cancelled = None
        client.set_target_buffer(self._mirror)
        client.reset_interactions()
        if seed.any() and self.capabilities.initial_mask:
            client.add_initial_seg_interaction(seed)

    def _require(self, interactions, what: str, advice: str):
        """The server answers HTTP 400 to what its model does not take: refused here, in one sentence."""
        if not self.capabilities.interactions.intersection(interactions):
            raise InteractiveError(f"{what}, which this server's model does not take; {advice}.")

    def _prompt_call(self, prompt: Prompt):
        shape, matrix, include = self._image.shape[1:], self._matrix, prompt.include
        others = ", ".join(k for k in self.capabilities.prompt_types if k != prompt.kind)
        self._require(INTERACTIONS[prompt.kind], f"A {prompt.kind}", f"use another kind of prompt ({others})")
        if prompt.kind == "point":
            voxel = geometry.point_voxel(matrix, shape, prompt.ras)
            return lambda client: client.add_point_interaction(voxel, include_interaction=include)
        if prompt.kind == "box":
            box = geometry.box_voxels(matrix, shape, prompt.ras_min, prompt.ras_max)
            if all(hi - lo > 1 for lo, hi in box):  # one voxel thick on any axis makes it a 2D box to the server
                self._require({"bbox3d"}, "A 3D box", "draw the box on one slice")
            return lambda client: client.add_bbox_interaction(box, include_interaction=include)
        # Scribbles and lassos travel as crops with their box, not as whole-volume masks.
        if prompt.kind == "scribble":
            mask, box = geometry.scribble_mask(matrix, shape, prompt.ras_points, self.capabilities.scribble_thickness)
            return lambda client: client.add_scribble_interaction(mask.astype(np.uint8), include_interaction=include,
                                                                  interaction_bbox=box)
        mask, box = geometry.lasso_mask(matrix, shape, prompt.ras_points)
        return lambda client: client.add_lasso_interaction(mask.astype(np.uint8), include_interaction=include,
                                                           interaction_bbox=box)

    def _write(self, prompt: Prompt, box: tuple):
        segment_id = self._target.segment_id
        untouched = self._modified_time() == self._written  # else a hand edit made meanwhile: the next prompt sees it
        before = self._segment_mask(segment_id, box)
        self._modify(box, self._mirror[box].astype(bool), bypass_masking=False)
        after = self._segment_mask(segment_id, box)
        self._buffer[box] = after  # what the editor's masking actually allowed
        if untouched:
            self._written = self._modified_time()
        self._done.append(_Step(segment_id, prompt, box, before, after))
        del self._done[:-MAX_UNDO]
        self._undone.clear()

    def _modify(self, box, mask: np.ndarray, bypass_masking: bool):
        """Sets the selected segment to mask inside box through the Segment Editor logic."""
        extent = [box[2].start, box[2].stop - 1, box[1].start, box[1].stop - 1, box[0].start, box[0].stop - 1]
        modifier = slicer.vtkOrientedImageData()
        modifier.ShallowCopy(arrays.image_from_array(mask.astype(np.uint8)))
        modifier.SetExtent(*extent)
        modifier.SetImageToWorldMatrix(arrays.array_to_matrix(self._matrix))
        logic = self._target.editor_logic
        editor = logic.GetSegmentEditorNode()
        editor.SetSelectedSegmentID(self._target.segment_id)
        masked = (editor.GetMaskMode() != self._target.segmentation_node.EditAllowedEverywhere
                  or editor.GetSourceVolumeIntensityMask())
        if masked and not bypass_masking:
            logic.UpdateMaskLabelmap()  # other segments may have changed; costs a pass over the volume
        logic.ModifySegmentByLabelmap(self._target.segmentation_node, self._target.segment_id, modifier,
                                      logic.ModificationModeSet, extent, False, bypass_masking)

    # -- undo / redo -------------------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return bool(self._done)

    @property
    def can_redo(self) -> bool:
        return bool(self._undone)

    def undo(self):
        if self._done:
            step = self._done.pop()
            self._restore(step, step.before)
            self._undone.append(step)

    def redo(self):
        if self._undone:
            step = self._undone.pop()
            self._restore(step, step.after)
            self._done.append(step)

    def _restore(self, step: _Step, mask: np.ndarray):
        """Local and instant: the server's undo is one level deep, so the next prompt re-seeds it instead."""
        if step.segment_id != self._target.segment_id:
            self.select_segment(SegmentTarget(self._target.segmentation_node, step.segment_id,
                                              self._target.editor_logic))
        self._modify(step.box, mask, bypass_masking=True)
        self._buffer[step.box] = mask
        self._written = self._modified_time()
        self._in_sync = False

    def reset(self):
        """Clears the selected segment (undoable); the next prompt starts the server from the empty segment."""
        box = tuple(slice(0, n) for n in self._buffer.shape)
        before = self._segment_mask(self._target.segment_id)
        self._done.append(_Step(self._target.segment_id, Prompt("reset"), box, before, np.zeros_like(before)))
        self._undone.clear()
        self._restore(self._done[-1], self._done[-1].after)

    def prompts_of(self, segment_id: str) -> list:
        """The prompts that made the segment as it stands (undone ones left out), for prompt files."""
        prompts = []
        for step in self._done:
            if step.segment_id == segment_id:
                prompts = [] if step.prompt.kind == "reset" else prompts + [step.prompt]
        return prompts


@dataclass
class PendingPrompt:
    session: InteractiveSession
    prompt: Prompt
    seed: object  # None, or the call that first restarts the server from the segment
    call: object
    started: float
    server_s: float = 0.0
    cancelled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    def run(self):
        """The server round trip (resuming a lost session on the way); returns the changed box."""
        started = time.perf_counter()
        abandoned = lambda: self.cancelled
        try:
            if self.seed:
                self.session._call(self.seed, abandoned)
            return None if self.cancelled else self.session._call(self.call, abandoned)
        finally:
            self.server_s = time.perf_counter() - started
            self.finished.set()

    def cancel(self):
        """Main thread: stop waiting. The answer, whenever it comes, is not written (finish() is not called);
        the session's next prompt re-seeds the server with the segment as it is."""
        self.cancelled = True
        self.session._cancelled = self


def _client_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nninteractive-client")
    except PackageNotFoundError:
        return "unknown"
