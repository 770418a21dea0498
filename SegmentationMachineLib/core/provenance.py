"""How a segment was made, kept with it as segment tags (saved in .seg.nrrd files): a DICOM SEG states it."""

import zlib

MADE_BY_TAG = "SegmentationMachine.MadeBy"
VOXELS_TAG = "SegmentationMachine.Voxels"  # a preset's voxels as it made them: a hand edit changes them
PRESET = "preset"  # threshold and morphology on the CPU (segment.masks), no user input
PRESET_EDITED = "preset, edited"  # a preset's segment changed since (Segment Editor, nnInteractive's undo...)
NNINTERACTIVE = "nnInteractive"  # the AI model, from the user's prompts


def mark_segment(segmentation_node, segment_id: str, made_by: str):
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    segment.SetTag(MADE_BY_TAG, made_by)
    if made_by == PRESET:
        segment.SetTag(VOXELS_TAG, _voxels_fingerprint(segment))
    else:
        segment.RemoveTag(VOXELS_TAG)


def made_by(segment) -> str:
    """PRESET, PRESET_EDITED, NNINTERACTIVE, or "" for a segment made otherwise (by hand, in another program)."""
    made, voxels = _tag(segment, MADE_BY_TAG), _tag(segment, VOXELS_TAG)
    if made == PRESET and voxels != _voxels_fingerprint(segment):
        return PRESET_EDITED
    return made


def _tag(segment, name: str) -> str:
    from vtkmodules.vtkCommonCore import reference  # here: segwriter imports this module without VTK

    value = reference("")
    return value.get() if segment.GetTag(name, value) else ""


def _voxels_fingerprint(segment) -> str:
    """A checksum of the segment's voxels and where they lie on its labelmap's grid: the same after saving and
    loading (whatever the shared labelmap's extent or label value), different after any voxel changed."""
    import numpy as np

    from . import arrays
    from .scene import BINARY_LABELMAP

    labelmap = segment.GetRepresentation(BINARY_LABELMAP)
    if labelmap is None or labelmap.GetPointData().GetScalars() is None:
        return "empty"
    voxels = arrays.image_array(labelmap) == segment.GetLabelValue()
    if not voxels.any():
        return "empty"
    where = [np.flatnonzero(voxels.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    crop = voxels[tuple(slice(w[0], w[-1] + 1) for w in where)]
    extent = labelmap.GetExtent()
    start = [int(w[0]) + extent[2 * (2 - axis)] for axis, w in enumerate(where)]  # K, J, I on the grid
    checksum = zlib.crc32(np.packbits(crop).tobytes(), zlib.crc32(np.array(start + list(crop.shape)).tobytes()))
    return f"{checksum:08x}"
