"""The model pipeline one series goes through: volume → segments (presets, prompts) → printable meshes."""

import logging
import math
import time

from .core.errors import UserError
from .core.memory import said_when_out_of_memory
from .core.scene import SceneContext, new_segmentation
from .mesh.export import ExportOptions, ExportResult, export_segmentation
from .prompts.promptfile import PromptFileError
from .prompts.session import InteractiveSession, SegmentTarget, headless_editor
from .segment.masks import preset_parameters
from .segment.presets import apply_preset

log = logging.getLogger("segmentation-machine.steps")  # kept in the CLI's --log file


def segment_with_prompts(ctx: SceneContext, volume_node, segments, session: InteractiveSession,
                         echo=lambda line: None):
    """Replays prompt-file segments through the server; returns the new segmentation node.
    Every prompt is checked against the volume and the server's model before anything is sent."""
    upload = session.stage_volume(volume_node)
    _check_prompts(session, segments)
    echo("Sending the scan to the server...")  # a minute of 65 MB on a hospital's 10 Mbit/s uplink
    started = time.perf_counter()
    upload()
    echo(f"Sent {session.region_note} in {time.perf_counter() - started:.1f} s")
    node = new_segmentation(volume_node, f"{volume_node.GetName()}_segmentation")
    editor = headless_editor(ctx.scene, ctx.app_logic, node, volume_node)
    for segment in segments:
        segment_id = node.GetSegmentation().AddEmptySegment("", segment.name)
        session.select_segment(SegmentTarget(node, segment_id, editor))
        for number, prompt in enumerate(segment.prompts, 1):
            timing = session.add(prompt)
            sign = "include" if prompt.include else "exclude"
            nothing = "" if timing.changed else " (changed nothing; kept for the prompts that follow)"
            echo(f"{segment.name}: prompt {number}/{len(segment.prompts)} ({prompt.kind}, {sign}) in {timing}{nothing}")
    return node


def _check_prompts(session: InteractiveSession, segments):
    """A prompt outside the image, or of a kind the server's model refuses: one sentence naming the entry."""
    for index, segment in enumerate(segments):
        for number, prompt in enumerate(segment.prompts):
            try:
                session.check(prompt)
            except UserError as error:
                reason = str(error)
                raise PromptFileError(f"segments[{index}].prompts[{number}] ({prompt.kind}): "
                                      f"{reason[:1].lower()}{reason[1:]}") from None


def model_volume(ctx: SceneContext, volume_node, presets, out_dir, options: ExportOptions,
                 progress=None, echo=lambda line: None, segmentation=None, provenance: dict = None,
                 preset_progress=None) -> ExportResult:
    """Runs each preset into the segmentation of volume_node (a new one if None) and exports it under out_dir.

    provenance: the report's input and command (export.py); the presets run are added to it.
    Every step is logged at INFO (the CLI's --log file keeps them); running out of memory is one sentence."""
    with said_when_out_of_memory(math.prod(volume_node.GetImageData().GetDimensions())):
        for name in presets:
            started = time.perf_counter()
            segmentation = apply_preset(ctx, volume_node, name, segmentation, progress=preset_progress)
            log.info("Preset '%s' on '%s' in %.1f s.", name, volume_node.GetName(), time.perf_counter() - started)
            echo(f"Segmented with preset '{name}'")
        started = time.perf_counter()
        result = export_segmentation(segmentation, out_dir, options, progress=progress,
                                     provenance={**(provenance or {}), "presets": [
                                         {"name": name, "parameters": preset_parameters(name)} for name in presets]})
        for mesh in result.report["meshes"]:
            log.info("Mesh '%s': %d triangles, %s mL (voxels %s mL).", mesh["name"], mesh["triangles"],
                     mesh["volume_ml"], mesh["voxel_volume_ml"])
        log.info("Wrote %s in %s in %.1f s.", ", ".join(p.name for p in result.files), result.folder,
                 time.perf_counter() - started)
        return result
