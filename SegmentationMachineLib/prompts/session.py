"""AI prompt tools: an nnInteractive session over the upstream client (nninteractive-client 2.6).

The volume is sent once in its native dtype (the client compresses it) and again only when its
voxels change. Prompts in RAS are mapped to the voxel grid; each result (the changed box the
server returns) is written into the selected segment through Slicer's Segment Editor logic, so
masking and overwrite settings hold and other segments are respected. Undo and redo are kept
here, many levels deep. A lost session (reaped, server restarted, connection dropped) is
resumed without the user: claim, upload, seed the current mask, repeat the prompt.
"""

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


@dataclass
class Capabilities:
    prompt_types: tuple
    undo: bool
    server_version: str
    licence: str
    scribble_thickness: tuple


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
    _buffer: np.ndarray = None
    _target: SegmentTarget = None
    _done: list = field(default_factory=list)
    _undone: list = field(default_factory=list)

    # -- connection ----------------------------------------------------------------------------
    def connect(self) -> Capabilities:
        self._client = self._claim()
        client = self._client
        names = {"points": "point", "bbox2d": "box", "bbox3d": "box", "scribble": "scribble", "lasso": "lasso"}
        self.capabilities = Capabilities(
            prompt_types=tuple(dict.fromkeys(names[k] for k, on in client.supported_interactions.items()
                                             if on and k in names)),
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
        if code in (404, 405, 422):
            return InteractiveError(f"The server at {self.url} does not understand this client "
                                    f"(HTTP {code}; client nninteractive-client {_client_version()}, server "
                                    f"{self.capabilities.server_version if self.capabilities else 'unknown'}): "
                                    "run server and client of the same version.")
        detail = error.response.text[:200]
        return InteractiveError(f"The nnInteractive server answered HTTP {code} ({detail}): "
                                "try the prompt again, or reset the segment.")

    def _call(self, action):
        """Runs action(client); resumes a lost session once and repeats the action."""
        upstream, httpx = _upstream()
        try:
            try:
                return action(self._client)
            except (upstream.SessionExpiredError, httpx.TransportError):
                self.status("The server session was lost; reconnecting and restoring the segment.")
                self._resume()
                return action(self._client)
        except httpx.HTTPStatusError as error:
            raise self._http_error(error) from None

    def _resume(self):
        try:
            self._client.close()
        except Exception:  # the old lease is gone anyway
            pass
        self._client = self._claim()
        if self._image is not None:
            self._client.set_image(self._image)
        if self._buffer is not None:
            _seed(self._client, self._buffer, self._buffer.copy())

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- volume and segment --------------------------------------------------------------------
    def set_volume(self, volume_node):
        """Sends the volume unless these exact voxels were sent already."""
        self.stage_volume(volume_node)()

    def select_segment(self, target: SegmentTarget):
        """Starts a new interaction on target, seeded with the segment's current mask."""
        self.stage_segment(target)()

    def stage_volume(self, volume_node):
        """Main thread: takes the voxels; returns the upload, which may run on a worker thread."""
        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime())
        if key == self._volume_key:
            return lambda: None
        self._volume_key = key
        self._matrix = arrays.ijk_to_ras(volume_node)
        self._image = arrays.volume_array(volume_node)[np.newaxis].copy()  # (1, K, J, I), native dtype
        restage = self.stage_segment(self._target) if self._target is not None else (lambda: None)
        return lambda: (self._call(lambda client: client.set_image(self._image)), restage())

    def stage_segment(self, target: SegmentTarget):
        """Main thread: reads the segment; returns the server's re-seeding, which may run on a worker thread."""
        self._target = target
        segmentation = target.segmentation_node.GetSegmentation()
        if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
            segmentation.CreateRepresentation(BINARY_LABELMAP)
        self._buffer = self._segment_mask(target.segment_id).astype(np.uint8)
        return self._reseed_call()

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

    def prepare(self, prompt: Prompt) -> "PendingPrompt":
        """Main thread: maps the prompt to voxels. Its run() touches no scene and may go to a worker thread."""
        if self._target is None or self._image is None:
            raise InteractiveError("Choose a source volume and a segment before prompting.")
        return PendingPrompt(self, prompt, self._prompt_call(prompt), time.perf_counter())

    def finish(self, pending: "PendingPrompt", box) -> PromptTiming:
        """Main thread, after run(): writes the changed box into the segment."""
        if box:
            self._write(pending.prompt, tuple(slice(int(lo), int(hi)) for lo, hi in box))
        total = time.perf_counter() - pending.started
        return PromptTiming(total, pending.server_s, total - pending.server_s)

    def _prompt_call(self, prompt: Prompt):
        shape, matrix, include = self._image.shape[1:], self._matrix, prompt.include
        if prompt.kind == "point":
            voxel = geometry.point_voxel(matrix, shape, prompt.ras)
            return lambda client: client.add_point_interaction(voxel, include_interaction=include)
        if prompt.kind == "box":
            box = geometry.box_voxels(matrix, shape, prompt.ras_min, prompt.ras_max)
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
        before = self._segment_mask(segment_id, box)
        self._modify(box, self._buffer[box].astype(bool), bypass_masking=False)
        after = self._segment_mask(segment_id, box)
        self._buffer[box] = after  # what the editor's masking actually allowed
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
        if step.segment_id != self._target.segment_id:
            self._target = SegmentTarget(self._target.segmentation_node, step.segment_id, self._target.editor_logic)
            self._buffer = self._segment_mask(step.segment_id).astype(np.uint8)
        self._modify(step.box, mask, bypass_masking=True)
        self._buffer[step.box] = mask
        self._reseed()

    def reset(self):
        """Clears the selected segment and the server's interactions (undoable)."""
        box = tuple(slice(0, n) for n in self._buffer.shape)
        before = self._buffer.astype(bool)
        self._modify(box, np.zeros_like(before), bypass_masking=True)
        self._buffer[:] = 0
        self._done.append(_Step(self._target.segment_id, Prompt("reset"), box, before, np.zeros_like(before)))
        self._undone.clear()
        self._reseed()

    def _reseed(self):
        """The server's undo is one level deep: after ours, it restarts from the segment as it is now."""
        self._reseed_call()()

    def _reseed_call(self):
        buffer, seed = self._buffer, self._buffer.copy()  # taken now, on the main thread
        return lambda: self._call(lambda client: _seed(client, buffer, seed))

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
    call: object
    started: float
    server_s: float = 0.0

    def run(self):
        """The server round trip (resuming a lost session on the way); returns the changed box."""
        started = time.perf_counter()
        try:
            return self.session._call(self.call)
        finally:
            self.server_s = time.perf_counter() - started


def _seed(client, buffer: np.ndarray, seed: np.ndarray):
    """The server restarts from our segment: results go to buffer, no interactions, seed as the mask."""
    client.set_target_buffer(buffer)
    client.reset_interactions()
    if seed.any():
        client.add_initial_seg_interaction(seed)


def _client_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nninteractive-client")
    except PackageNotFoundError:
        return "unknown"
