"""Read segmentations from files: Slicer's .seg.nrrd, DICOM SEG, or a labelmap (NIfTI/NRRD) with optional label names."""

import json
from pathlib import Path

import numpy as np

from ..core import arrays
from ..core.errors import InputError
from ..core.scene import SceneContext
from ..dicom.volumes import load_volume_file
from .dicomseg import is_dicom_seg, load_dicom_seg

# More distinct values than any atlas has labels (TotalSegmentator: 117): an image's intensities, not labels.
MAX_LABELS = 1000


def read_label_names(path) -> dict:
    """{label value: name} from a JSON object such as TotalSegmentator's labels_total.json."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # UTF-8, also with Notepad's BOM
        return {int(value): str(name) for value, name in data.items()}
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"{path} is not a JSON object of label value to name ({error}): fix the file.") from None


def load_segmentation(ctx: SceneContext, path, label_names: dict = None, reference_volume=None):
    """A segmentation node from path (.seg.nrrd, DICOM SEG or a labelmap); labelmap segments are named
    from label_names where given."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is not a file: give a .seg.nrrd segmentation, a DICOM SEG or a labelmap "
                         "(NIfTI or NRRD).")
    if is_dicom_seg(path):
        return load_dicom_seg(ctx, path, reference_volume)
    if path.name.lower().endswith(".seg.nrrd"):
        node = ctx.segmentations_logic.LoadSegmentationFromFile(str(path), False)
        if node is None:
            raise InputError(f"{path} could not be read as a Slicer segmentation: check that the file is complete.")
    else:
        labelmap = load_volume_file(ctx, path, labelmap=True).node
        _check_labels(path, arrays.volume_array(labelmap))
        # Slicer colours segments from the labelmap's default colour table (GenericColors), a file Slicer's core
        # (the CLI) lacks: without it each segment would get a random colour, another on every export. Slicer's
        # built-in Labels table is always there (its colour names are not anatomy: the segments keep their names).
        display = labelmap.GetDisplayNode()
        has_table = display is not None and display.GetColorNode() is not None
        fixed_colors = None if has_table else ctx.scene.GetNodeByID("vtkMRMLColorTableNodeLabels")
        node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", labelmap.GetName())
        node.CreateDefaultDisplayNodes()
        if not ctx.segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, node):
            raise InputError(f"{path} could not be imported as a labelmap: it must hold whole-number labels.")
        ctx.scene.RemoveNode(labelmap)
        segmentation = node.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            name = (label_names or {}).get(segment.GetLabelValue())
            if name:
                segment.SetName(name)
            if fixed_colors is not None:
                color = [0.0] * 4
                count = fixed_colors.GetNumberOfColors() - 1  # 1 to 256; 0 is the background
                fixed_colors.GetColor(1 + (segment.GetLabelValue() - 1) % count, color)
                segment.SetColor(*color[:3])
    if reference_volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    return node


def _check_labels(path: Path, voxels: np.ndarray):
    """A scan given where a labelmap belongs would become a mesh per intensity: junk, after minutes."""
    values = np.unique(voxels)
    whole = np.issubdtype(values.dtype, np.integer) or bool(np.all(np.mod(values, 1) == 0))
    if values.size and (values[0] < 0 or values.size > MAX_LABELS or not whole):
        raise InputError(f"{path} looks like a scan, not a labelmap ({values.size} different values from "
                         f"{values[0]:g} to {values[-1]:g}, where labels are a few whole numbers from 0): give a "
                         "segmentation, or model the scan with `segmentation-machine model`.")
