"""A volume under a parent transform, as Slicer puts one there, and world positions read by Slicer's own API.

linear: a registration with a 20 degree gantry-tilt shear. grid: the acquisition transform Slicer 5.10's
DICOM module adds for a gantry tilt (DICOMScalarVolumePlugin.gridTransformFromCorners: a 2 x 2 x slices
grid in the volume's orientation, one displacement per slice), with a wobble no linear transform has.
"""

import numpy as np
import slicer
import vtk

from SegmentationMachineLib.core import arrays

SHAPE = (40, 48, 56)  # K, J, I
GRID = np.array([[-0.9, 0, 0, 20.0], [0, -1.1, 0, 30.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])  # mirrored, anisotropic
TILT = np.tan(np.radians(20))


def registration(scene, volume):
    """A 20 degree gantry-tilt shear (A grows with S), then a turn about S and a shift."""
    angle = np.radians(12)
    turn = np.array([[np.cos(angle), -np.sin(angle), 0, 5.0], [np.sin(angle), np.cos(angle), 0, -8.0],
                     [0, 0, 1, 3.0], [0, 0, 0, 1]])
    shear = np.eye(4)
    shear[1, 2] = TILT
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetMatrixTransformToParent(arrays.array_to_matrix(turn @ shear))
    return node


def acquisition(scene, volume):
    """Each slice k shifted along A by the tilt plus 3 mm x sin(k / 5)."""
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "acquisition")
    spacing, (slices, rows, columns) = volume.GetSpacing(), arrays.volume_array(volume).shape
    image = vtk.vtkImageData()
    image.SetOrigin(*volume.GetOrigin())
    image.SetDimensions(2, 2, slices)
    image.SetSpacing(spacing[0] * columns, spacing[1] * rows, spacing[2])
    image.AllocateScalars(vtk.VTK_DOUBLE, 3)
    transform = slicer.vtkOrientedGridTransform()
    directions = vtk.vtkMatrix4x4()
    volume.GetIJKToRASDirectionMatrix(directions)
    transform.SetGridDirectionMatrix(directions)
    transform.SetDisplacementGridData(image)
    node.SetAndObserveTransformToParent(transform)
    displacements = slicer.util.arrayFromGridTransform(node)
    for k in range(slices):
        displacements[k, :, :] = [0.0, k * spacing[2] * TILT + 3.0 * np.sin(k / 5), 0.0]
    slicer.util.arrayFromGridTransformModified(node)
    return node


TRANSFORMS = {"linear": registration, "grid": acquisition}


def transformed_volume(scene, kind: str):
    """A random CT-like volume of SHAPE on GRID under a transform of that kind."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "tilted")
    arrays.set_volume_array(volume, np.random.default_rng(2).normal(0, 100, SHAPE).astype(np.int16), GRID)
    transform = TRANSFORMS[kind](scene, volume)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert bool(transform.IsTransformToWorldLinear()) == (kind == "linear")
    return volume


def to_world(node, local_ras) -> np.ndarray:
    out = [0.0, 0.0, 0.0]
    node.TransformPointToWorld([float(v) for v in local_ras], out)
    return np.array(out)


def voxel_world(volume, kji) -> tuple:
    """Where voxel (k, j, i)'s centre is in world RAS: what a click on it in a slice view gives."""
    return tuple(to_world(volume, (arrays.ijk_to_ras(volume) @ [*kji[::-1], 1.0])[:3]))


def voxel_centres(image, value=None) -> np.ndarray:
    """(N, 3) RAS, in the image's own frame, of the centres of an oriented image's voxels that are set (or equal
    value)."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    extent = image.GetExtent()
    voxels = arrays.image_array(image)
    ijk = (np.argwhere(voxels > 0 if value is None else voxels == value) + [extent[4], extent[2], extent[0]])[:, ::-1]
    return (arrays.matrix_to_array(matrix) @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T


def segment_world(segmentation, segment_id) -> np.ndarray:
    """(N, 3) world RAS of the centres of the segment's voxels, from its labelmap (in the segmentation's RAS) and
    the segmentation node's transform."""
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    labelmap = segment.GetRepresentation("Binary labelmap")
    if labelmap is None or labelmap.GetPointData().GetScalars() is None:
        return np.zeros((0, 3))
    return np.array([to_world(segmentation, point) for point in voxel_centres(labelmap, segment.GetLabelValue())
                     ]).reshape(-1, 3)
