"""How a segment was made, kept with it as segment tags (saved in .seg.nrrd files): a DICOM SEG states it."""

import zlib

MADE_BY_TAG = "SegmentationMachine.MadeBy"
VOXELS_TAG = "SegmentationMachine.Voxels"  # a preset's voxels as it made them: a hand edit changes them
PRESET_NAME_TAG = "SegmentationMachine.Preset"  # which preset made it, for export reports
PRESET = "preset"  # threshold and morphology on the CPU (segment.masks), no user input
PRESET_EDITED = "preset, edited"  # a preset's segment changed since (Segment Editor, nnInteractive's undo...)
NNINTERACTIVE = "nnInteractive"  # the AI model, from the user's prompts


def mark_segment(segmentation_node, segment_id: str, made_by: str, fingerprint: str = None, preset: str = None):
    """fingerprint: a PRESET's mask_fingerprint, where the caller made it (off the main thread: it reads every voxel)
    on the segmentation's reference geometry; else it is computed here. preset: a PRESET's name."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    segment.SetTag(MADE_BY_TAG, made_by)
    if made_by == PRESET:
        segment.SetTag(VOXELS_TAG, fingerprint or _voxels_fingerprint(segmentation_node, segment_id))
        segment.SetTag(PRESET_NAME_TAG, preset or "")
    else:
        segment.RemoveTag(VOXELS_TAG)


def preset_of(segmentation_node, segment_id: str) -> str:
    """The name of the preset that made the segment (edited since or not), or ""."""
    return _tag(segmentation_node.GetSegmentation().GetSegment(segment_id), PRESET_NAME_TAG)


def made_by(segmentation_node, segment_id: str) -> str:
    """PRESET, PRESET_EDITED, NNINTERACTIVE, or "" for a segment made otherwise (by hand, in another program). A
    preset saved without its checksum (by an earlier version) cannot be shown unedited: PRESET_EDITED."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    made, voxels = _tag(segment, MADE_BY_TAG), _tag(segment, VOXELS_TAG)
    if made == PRESET and voxels != _voxels_fingerprint(segmentation_node, segment_id):
        return PRESET_EDITED
    return made


def mask_fingerprint(mask, start=(0, 0, 0)) -> str:
    """A checksum of a K, J, I mask's voxels and where they lie on its grid (its first voxel at index start)."""
    import numpy as np

    where = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if not all(len(w) for w in where):
        return "empty"
    crop = mask[tuple(slice(w[0], w[-1] + 1) for w in where)]
    first = [int(w[0]) + int(s) for w, s in zip(where, start)]
    return f"{zlib.crc32(np.packbits(crop).tobytes(), zlib.crc32(np.array(first + list(crop.shape)).tobytes())):08x}"


def on_reference_grid(segmentation_node, ijk_to_ras) -> bool:
    """Whether a mask on the grid ijk_to_ras lies on the segmentation's reference geometry, as saving stores it."""
    import numpy as np

    geometry = segmentation_node.GetSegmentation().GetConversionParameter("Reference image geometry")
    numbers = [float(n) for n in geometry.split(";") if n][:16] if geometry else []
    return len(numbers) == 16 and np.allclose(np.reshape(numbers, (4, 4)), ijk_to_ras, atol=1e-6)


def _tag(segment, name: str) -> str:
    from vtkmodules.vtkCommonCore import reference  # here: segwriter imports this module without VTK

    value = reference("")
    return value.get() if segment.GetTag(name, value) else ""


def _voxels_fingerprint(segmentation_node, segment_id: str) -> str:
    """mask_fingerprint of the segment on the segmentation's reference geometry, where saving puts it: the same after
    saving and loading (whatever the labelmap's grid, extent or label value), different after any edit."""
    import slicer

    from . import arrays

    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)  # this segment's voxels as 1
    if labelmap.GetPointData().GetScalars() is None:
        return "empty"
    geometry = segmentation_node.GetSegmentation().GetConversionParameter("Reference image geometry")
    if geometry:
        reference, resampled = slicer.vtkOrientedImageData(), slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, reference, False)
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, True)  # nearest neighbour, grown to hold it all, as saving does
        labelmap = resampled
    extent = labelmap.GetExtent()
    return mask_fingerprint(arrays.image_array(labelmap) > 0, (extent[4], extent[2], extent[0]))
