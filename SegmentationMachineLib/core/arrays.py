"""NumPy views of MRML volume data and geometry, for code that must not touch Slicer's globals."""

import numpy as np
import slicer
import vtk
from vtkmodules.util import numpy_support

def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_array(matrix)


def image_array(image: vtk.vtkImageData) -> np.ndarray:
    """The image's voxels as a K, J, I array sharing memory with the image."""
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(dims[2], dims[1], dims[0])


def volume_array(volume_node) -> np.ndarray:
    return image_array(volume_node.GetImageData())


def image_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """A new vtkImageData (origin 0, spacing 1) holding a copy of a K, J, I array."""
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    return image


def labelmap_from_array(mask: np.ndarray, ijk_to_ras_matrix: np.ndarray, start=(0, 0, 0)):
    """A binary labelmap of a K, J, I bool or uint8 array whose first voxel is at K, J, I index start of the
    grid ijk_to_ras_matrix describes. It shares the array's memory (no copy: on the main thread a whole-volume
    copy costs a tick of 100 ms), so the array must not change afterwards."""
    voxels = np.ascontiguousarray(mask).view(np.uint8) if mask.dtype == bool else np.ascontiguousarray(mask, np.uint8)
    labelmap = slicer.vtkOrientedImageData()
    k, j, i = (int(n) for n in start)
    labelmap.SetExtent(i, i + voxels.shape[2] - 1, j, j + voxels.shape[1] - 1, k, k + voxels.shape[0] - 1)
    labelmap.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.ravel(), deep=False))  # keeps voxels alive
    labelmap.SetImageToWorldMatrix(array_to_matrix(ijk_to_ras_matrix))
    return labelmap


def set_volume_array(volume_node, array: np.ndarray, ijk_to_ras_matrix: np.ndarray):
    """Replaces a volume node's voxels and geometry."""
    volume_node.SetAndObserveImageData(image_from_array(array))
    volume_node.SetIJKToRASMatrix(array_to_matrix(ijk_to_ras_matrix))


def spacing_of(matrix: np.ndarray) -> np.ndarray:
    """Voxel size along I, J, K of an IJK-to-RAS matrix."""
    return np.linalg.norm(matrix[:3, :3], axis=0)
