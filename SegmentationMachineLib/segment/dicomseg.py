"""Read a DICOM SEG into a segmentation node: a named, coloured segment per SEG segment, in place in space.

pydicom only (Slicer bundles it), so any SEG reads in Slicer and the CLI alike: each frame is put
on a voxel grid from its own position, orientation and pixel spacing, so omitted empty frames and
frames in any order land where they belong.
"""

from pathlib import Path

import numpy as np
import pydicom
from pydicom.misc import is_dicom

from ..core.errors import InputError
from ..core.grids import RAS_TO_LPS
from ..core.scene import SceneContext
from ..mesh.dicomseg import SEGMENTATION_STORAGE
from ..mesh.segwriter import dicom_lab_to_rgb
from .presets import add_segment_from_mask

DEFAULT_COLOR = (0.5, 0.68, 0.5)  # Slicer's colour for a segment without one


def is_dicom_seg(path) -> bool:
    path = Path(path)
    if not path.is_file() or not is_dicom(str(path)):
        return False
    return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"]).get(
        "SOPClassUID") == SEGMENTATION_STORAGE


def _frame_item(dataset, frame, name: str):
    """The functional group item `name` of a frame: its own, else the shared one."""
    for groups in (dataset.PerFrameFunctionalGroupsSequence[frame], dataset.SharedFunctionalGroupsSequence[0]):
        if name in groups:
            return groups[name][0]
    raise InputError(f"The DICOM SEG lacks {name} for frame {frame + 1}: it cannot be placed in space.")


def _frames(dataset, path) -> np.ndarray:
    """(frames, rows, columns) booleans; fractional frames are in where at least half."""
    kind = dataset.get("SegmentationType", "BINARY")
    if kind not in ("BINARY", "FRACTIONAL"):
        raise InputError(f"{path} is a DICOM SEG of type {kind}, which is not read yet: export it as BINARY.")
    pixels = dataset.pixel_array.reshape(int(dataset.get("NumberOfFrames", 1)), dataset.Rows, dataset.Columns)
    if kind == "FRACTIONAL":
        return pixels >= dataset.MaximumFractionalValue / 2
    return pixels > 0


def _on_steps(distances: np.ndarray, step: float) -> bool:
    """Whether every frame lies a whole number of steps from the lowest (to 1% of a step)."""
    offsets = (distances - distances.min()) / step
    return bool(np.abs(offsets - np.rint(offsets)).max() <= 0.01)


def _grid(dataset, frame_count: int):
    """IJK→LPS of the voxel grid holding every frame, and each frame's slice index on it. The slice step is the
    declared SpacingBetweenSlices where the frames' distances are whole multiples of it (empty frames are left
    out, so the nearest two frames may be slices apart); a grid sheared evenly from slice to slice (a gantry tilt)
    is one grid too."""
    orientation = np.array(_frame_item(dataset, 0, "PlaneOrientationSequence").ImageOrientationPatient, float)
    measures = _frame_item(dataset, 0, "PixelMeasuresSequence")
    row_spacing, column_spacing = map(float, measures.PixelSpacing)
    along_row, along_column = orientation[:3], orientation[3:]
    normal = np.cross(along_row, along_column)
    positions = np.array([_frame_item(dataset, f, "PlanePositionSequence").ImagePositionPatient
                          for f in range(frame_count)], float)
    distances = positions @ normal
    gaps = np.diff(np.unique(np.round(distances, 3)))
    declared = float(measures.get("SpacingBetweenSlices") or 0)
    step = float(gaps.min()) if len(gaps) else float(declared or measures.get("SliceThickness") or 1.0)
    if declared > 0 and _on_steps(distances, declared):  # as dcmqi (Slicer's reader) spaces them
        step = declared
    origin = positions[np.argmin(distances)]
    slice_index = np.rint((distances - distances.min()) / step).astype(int)
    in_plane = positions - origin - np.outer(distances - distances.min(), normal)
    shear = in_plane.T @ slice_index / max(slice_index @ slice_index, 1)  # the shift from one slice to the next
    if np.abs(in_plane - np.outer(slice_index, shear)).max() > 0.01 * min(row_spacing, column_spacing) or not \
            _on_steps(distances, step):
        raise InputError("The DICOM SEG's frames do not lie on one evenly spaced grid: it cannot be read here.")
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, 0] = along_row * column_spacing
    ijk_to_lps[:3, 1] = along_column * row_spacing
    ijk_to_lps[:3, 2] = normal * step + shear
    ijk_to_lps[:3, 3] = origin
    return ijk_to_lps, slice_index


def load_dicom_seg(ctx: SceneContext, path, reference_volume=None):
    """A segmentation node holding every segment of the DICOM SEG at path (empty ones too)."""
    path = Path(path)
    try:
        dataset = pydicom.dcmread(str(path))
        frames = _frames(dataset, path)
    except InputError:
        raise
    except Exception as error:  # pydicom raises many kinds for a damaged file
        raise InputError(f"{path} could not be read as a DICOM SEG ({error}): check that the file is complete.") from None
    ijk_to_lps, slice_index = _grid(dataset, len(frames))
    ijk_to_ras = RAS_TO_LPS @ ijk_to_lps
    numbers = np.array([_frame_item(dataset, f, "SegmentIdentificationSequence").ReferencedSegmentNumber
                        for f in range(len(frames))])
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", path.name.split(".")[0])
    node.CreateDefaultDisplayNodes()
    for segment in dataset.SegmentSequence:
        name = str(segment.get("SegmentLabel") or f"Segment {segment.SegmentNumber}")
        lab = segment.get("RecommendedDisplayCIELabValue")
        color = dicom_lab_to_rgb(lab) if lab else DEFAULT_COLOR
        mine = numbers == segment.SegmentNumber
        if not frames[mine].any():
            node.GetSegmentation().AddEmptySegment("", name, color)
            continue
        mask = np.zeros((slice_index.max() + 1, dataset.Rows, dataset.Columns), bool)
        for frame in np.flatnonzero(mine):
            mask[slice_index[frame]] |= frames[frame]
        add_segment_from_mask(node, mask, ijk_to_ras, name, color)
    if reference_volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    return node
