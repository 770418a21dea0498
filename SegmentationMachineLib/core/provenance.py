"""How a segment was made, kept with it as a segment tag (saved in .seg.nrrd files): a DICOM SEG states it."""

MADE_BY_TAG = "SegmentationMachine.MadeBy"
PRESET = "preset"  # threshold and morphology on the CPU (segment.masks), no user input
NNINTERACTIVE = "nnInteractive"  # the AI model, from the user's prompts


def mark_segment(segmentation_node, segment_id: str, made_by: str):
    segmentation_node.GetSegmentation().GetSegment(segment_id).SetTag(MADE_BY_TAG, made_by)


def made_by(segment) -> str:
    """PRESET, NNINTERACTIVE, or "" for a segment made otherwise (by hand, in another program)."""
    from vtkmodules.vtkCommonCore import reference  # here: segwriter imports this module without VTK

    value = reference("")
    return value.get() if segment.GetTag(MADE_BY_TAG, value) else ""
