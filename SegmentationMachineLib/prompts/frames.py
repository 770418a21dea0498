"""The coordinate frames between a prompt and the segment it changes, through Slicer's own transform API.

Slicer's views and markups give world RAS. A volume's voxels lie in its own RAS, under its parent
transform: a registration, or the acquisition transform Slicer 5.10's DICOM module puts on a series
of irregular geometry such as a gantry tilt (a grid transform: non-linear, not hardened by default).
A segment's voxels lie in its segmentation's RAS, under that node's parent transform, which may be
the volume's (as our presets make it) or none (as the Segment Editor leaves a new segmentation).
The session works on the volume's voxels, so prompts are mapped from world into the volume's RAS,
and results from the volume's grid into the segmentation's.
"""

import numpy as np
import slicer
import vtk

from ..core import arrays

MARGIN_VOXELS = 1  # around where a resampled image lands: nearest-neighbour rounding at its edge
LATTICE = 5  # points per axis sampled to find where a box lands under a non-linear transform


def world_to_local(node):
    """A function mapping (N, 3) world RAS points into node's own RAS, one by one (exact under a non-linear
    transform too, which Slicer inverts iteratively); None when node has no parent transform."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return None
    from_world = vtk.vtkGeneralTransform()
    transform_node.GetTransformFromWorld(from_world)
    return lambda ras: np.array([from_world.TransformPoint(*map(float, point)) for point in ras])


def volume_in_segmentation(volume_node, segmentation_node, ijk_to_ras: np.ndarray):
    """How the volume's voxel grid lies in the segmentation's RAS: (IJK to segmentation RAS, None) where the
    volume-to-segmentation transform is linear (both under the same transform or none: ijk_to_ras itself; or a
    registration between them, as Slicer's reference geometry has it), else (ijk_to_ras, that non-linear
    transform), through which the grid must be resampled."""
    source, target = volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode()
    if source == target:
        return ijk_to_ras, None
    matrix = vtk.vtkMatrix4x4()
    if slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source, target, matrix):
        return arrays.matrix_to_array(matrix) @ ijk_to_ras, None
    between = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source, target, between)
    return ijk_to_ras, between


def inverse(transform):
    """transform's inverse in a form Slicer's resampling applies: it takes a vtkGeneralTransform with nothing
    concatenated, which is what GetInverse() returns, for the identity (vtkOrientedImageDataResample, 5.10)."""
    wrapped = vtk.vtkGeneralTransform()
    wrapped.Concatenate(transform.GetInverse())
    return wrapped


def landing_extent(image, extent, transform, grid: np.ndarray) -> list:
    """The extent (I0, I1, J0, J1, K0, K1) of the IJK-to-RAS grid that extent of image lands on through transform
    (from image's RAS to grid's; None: the same RAS), found by mapping a lattice over it (a non-linear transform may
    bow its faces between the corners) and widened by a margin."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    ijk = np.stack(np.meshgrid(*[np.linspace(lo, hi, LATTICE) for lo, hi in zip(extent[0::2], extent[1::2])]),
                   -1).reshape(-1, 3)
    ras = (arrays.matrix_to_array(matrix) @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    if transform is not None:
        ras = np.array([transform.TransformPoint(*map(float, point)) for point in ras])
    target = (np.linalg.inv(grid) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
    low = np.floor(target.min(axis=0)).astype(int) - MARGIN_VOXELS
    high = np.ceil(target.max(axis=0)).astype(int) + MARGIN_VOXELS
    return [int(v) for pair in zip(low, high) for v in pair]


def resample(image, grid: np.ndarray, transform, extent=None):
    """image (a vtkOrientedImageData) through transform (from its RAS to grid's; None: the same RAS) onto the
    IJK-to-RAS grid, nearest neighbour: within extent (I0, I1, J0, J1, K0, K1), by default where image lands."""
    extent = landing_extent(image, image.GetExtent(), transform, grid) if extent is None else extent
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(*extent)
    reference.SetImageToWorldMatrix(arrays.array_to_matrix(grid))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        image, reference, resampled, False, False, transform)
    return resampled


def reference_grid(segmentation_node, fallback: np.ndarray) -> np.ndarray:
    """The segmentation's reference geometry (IJK to its RAS), on which the Segment Editor keeps its masks and its
    copy of the source volume; fallback where it has none."""
    geometry = reference_geometry(segmentation_node)
    image = slicer.vtkOrientedImageData()
    if not geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image, False):
        return fallback
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return arrays.matrix_to_array(matrix)


def reference_geometry(segmentation_node) -> str:
    """The segmentation's reference geometry as Slicer stores it; "" where it has none."""
    return segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
