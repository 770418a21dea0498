"""CPU segmentation presets as segments: a preset's mask (masks.py) becomes a named, coloured segment."""

import numpy as np

from ..core import arrays
from ..core.provenance import mark_segment, mask_fingerprint, on_reference_grid, preset_of, PRESET
from ..core.scene import SceneContext, editing, on_the_grid_of
from .masks import PRESETS, get_preset, preset_mask


def spacing_kji(volume_node) -> np.ndarray:
    return arrays.spacing_of(arrays.ijk_to_ras(volume_node))[::-1]


def add_segment_from_mask(segmentation_node, mask: np.ndarray, ijk_to_ras: np.ndarray, name: str, color,
                          start=(0, 0, 0)) -> str:
    """Adds mask (K, J, I; its first voxel at index start of the grid ijk_to_ras describes) as a new
    segment; returns its id. The segment keeps a bool or uint8 mask's memory: do not change it afterwards."""
    labelmap = arrays.labelmap_from_array(mask, ijk_to_ras, start)
    return segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(labelmap, name, color)


def apply_preset(ctx: SceneContext, volume_node, preset_name: str, segmentation_node=None, progress=None):
    """Runs a preset on volume_node; adds its segment to segmentation_node (a new one if None)."""
    mask = preset_mask(preset_name, arrays.volume_array(volume_node), spacing_kji(volume_node), volume_node.GetName(),
                       progress, arrays.ijk_to_ras(volume_node))
    return add_preset_segment(ctx, volume_node, preset_name, mask, segmentation_node,
                              fingerprint=mask_fingerprint(mask))


def add_preset_segment(ctx: SceneContext, volume_node, preset_name: str, mask: np.ndarray, segmentation_node=None,
                       start=(0, 0, 0), fingerprint: str = None):
    """Main-thread half of apply_preset: the mask (cropped, its first voxel at index start) becomes a named,
    coloured segment, added as one change. fingerprint: the mask's mask_fingerprint, made off the main thread."""
    preset = get_preset(preset_name)
    new = segmentation_node is None
    if new:
        segmentation_node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()}_segmentation")
    with editing(ctx, segmentation_node):  # made and filled as one change
        if new:
            on_the_grid_of(volume_node, segmentation_node)
        grid = arrays.ijk_to_ras(volume_node)
        segment_id = add_segment_from_mask(segmentation_node, mask, grid, preset.segment_name, preset.color, start)
        # The mask's own checksum holds where it is what saving stores; elsewhere the segment's is made here.
        mark_segment(segmentation_node, segment_id, PRESET,
                     fingerprint if on_reference_grid(segmentation_node, grid) else None, preset.name)
        _see_through_where_enclosing(segmentation_node, segment_id)
    return segmentation_node


def _see_through_where_enclosing(segmentation_node, new_id: str):
    """A preset's segment that encloses the others (the body surface) takes its see-through 3D opacity once the
    segmentation holds another segment: when it is added beside others, or when a second one joins it. Later
    additions leave an opacity the user chose alone."""
    segmentation, display = segmentation_node.GetSegmentation(), segmentation_node.GetDisplayNode()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if display is None or len(ids) < 2:
        return
    for segment_id in ids if len(ids) == 2 else [new_id]:
        preset = PRESETS.get(preset_of(segmentation_node, segment_id))
        if preset and preset.opacity_3d_with_others < 1.0:
            display.SetSegmentOpacity3D(segment_id, preset.opacity_3d_with_others)
