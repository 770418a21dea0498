"""The model pipeline one series goes through: volume → segments (presets, prompts) → printable meshes."""

from .core.errors import UserError
from .core.scene import SceneContext
from .mesh.export import ExportOptions, ExportResult, export_segmentation
from .prompts.promptfile import PromptFileError
from .prompts.session import InteractiveSession, SegmentTarget, headless_editor
from .segment.presets import apply_preset


def segment_with_prompts(ctx: SceneContext, volume_node, segments, session: InteractiveSession,
                         echo=lambda line: None):
    """Replays prompt-file segments through the server; returns the new segmentation node.
    Every prompt is checked against the volume and the server's model before anything is sent."""
    upload = session.stage_volume(volume_node)
    _check_prompts(session, segments)
    upload()
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()}_segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    editor = headless_editor(ctx.scene, ctx.app_logic, node, volume_node)
    for segment in segments:
        segment_id = node.GetSegmentation().AddEmptySegment("", segment.name)
        session.select_segment(SegmentTarget(node, segment_id, editor))
        for number, prompt in enumerate(segment.prompts, 1):
            timing = session.add(prompt)
            sign = "include" if prompt.include else "exclude"
            echo(f"{segment.name}: prompt {number}/{len(segment.prompts)} ({prompt.kind}, {sign}) in {timing}")
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
                 progress=None, echo=lambda line: None, segmentation=None) -> ExportResult:
    """Runs each preset into the segmentation of volume_node (a new one if None) and exports it under out_dir."""
    for name in presets:
        segmentation = apply_preset(ctx, volume_node, name, segmentation)
        echo(f"Segmented with preset '{name}'")
    return export_segmentation(segmentation, out_dir, options, progress=progress)
