"""The model pipeline one series goes through: volume → preset segments → printable meshes."""

from .export import ExportOptions, ExportResult, export_segmentation
from .presets import apply_preset
from .scene import SceneContext


def model_volume(ctx: SceneContext, volume_node, presets, out_dir, options: ExportOptions,
                 progress=None, echo=lambda line: None) -> ExportResult:
    """Runs each preset into one segmentation of volume_node and exports it under out_dir."""
    segmentation = None
    for name in presets:
        segmentation = apply_preset(ctx, volume_node, name, segmentation)
        echo(f"Segmented with preset '{name}'")
    return export_segmentation(segmentation, out_dir, options, progress=progress)
