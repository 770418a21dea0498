"""A volume under a parent transform, as Slicer puts one there, and world positions read by Slicer's own API.

linear: a registration with a 20 degree gantry-tilt shear. grid: the acquisition transform Slicer 5.10's
DICOM module adds for a gantry tilt (DICOMScalarVolumePlugin.gridTransformFromCorners: a 2 x 2 x slices
grid in the volume's orientation, one displacement per slice), with a wobble no linear transform has.

tilted_series and load_as_dicom_module: a real series whose slices are sheared unevenly, read by Slicer's own
reader and put under the acquisition transform as the DICOM module does. (An evenly sheared series needs none:
Slicer 5.10's reader keeps the shear in the volume's IJK to RAS, ForceOrthogonalDirection off.)
"""

import numpy as np
import pydicom
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


def slice_grid(scene, volume, displacements: np.ndarray, name: str = "acquisition"):
    """The volume under a grid transform as DICOMScalarVolumePlugin.gridTransformFromCorners makes it: nodes at the
    corners of each slice ((slices, 2, 2, 3) RAS displacements, row then column), in the volume's orientation."""
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    columns, rows, slices = volume.GetImageData().GetDimensions()
    spacing = volume.GetSpacing()
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
    slicer.util.arrayFromGridTransform(node)[:] = displacements
    slicer.util.arrayFromGridTransformModified(node)
    return node


def acquisition(scene, volume):
    """Each slice k shifted along A by the tilt plus 3 mm x sin(k / 5)."""
    slices, spacing = volume.GetImageData().GetDimensions()[2], volume.GetSpacing()
    shifts = [k * spacing[2] * TILT + 3.0 * np.sin(k / 5) for k in range(slices)]
    return slice_grid(scene, volume, np.array([[[[0.0, shift, 0.0]] * 2] * 2 for shift in shifts]))


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


def tilted_series(source_files, folder, shifts_mm) -> list:
    """Copies of a real series' files in folder, slice k (in order along the slice normal) moved by shifts_mm[k]
    along its image's columns: a gantry tilt whose slices are sheared by those amounts. The copies' paths, in
    that order."""
    headers = [pydicom.dcmread(path) for path in source_files]
    normal = np.cross(*np.reshape(np.asarray(headers[0].ImageOrientationPatient, float), (2, 3)))
    headers.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))
    paths = []
    for k, (header, shift) in enumerate(zip(headers, shifts_mm)):
        columns = np.asarray(header.ImageOrientationPatient[3:], float)
        header.ImagePositionPatient = [round(float(v), 6) for v in np.asarray(header.ImagePositionPatient, float)
                                       + shift * columns]
        paths.append(folder / f"tilted{k:03d}.dcm")
        header.save_as(paths[-1])
    return paths


def _corners_from_headers(volume, files) -> np.ndarray:
    """DICOMScalarVolumePlugin.AcquisitionModeling.sliceCornersFromDICOM: (slices, 2, 2, 3) RAS from each file's
    position, orientation and spacing (the files in the volume's slice order, as DICOM.instanceUIDs lists them)."""
    columns, rows, _ = volume.GetImageData().GetDimensions()
    corners = []
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        position = np.asarray(header.ImagePositionPatient, float) * [-1, -1, 1]
        row, column = np.reshape(np.asarray(header.ImageOrientationPatient, float), (2, 3)) * [-1, -1, 1]
        spacing = np.asarray(header.PixelSpacing, float)
        corners.append([[position + c * columns * spacing[1] * row + r * rows * spacing[0] * column
                         for c in range(2)] for r in range(2)])
    return np.array(corners)


def _corners_of_grid(volume) -> np.ndarray:
    """sliceCornersFromIJKToRAS: the same corners, from the volume's regular grid."""
    columns, rows, slices = volume.GetImageData().GetDimensions()
    matrix = arrays.ijk_to_ras(volume)
    return np.array([[[(matrix @ [c * columns, r * rows, k, 1.0])[:3] for c in range(2)] for r in range(2)]
                     for k in range(slices)])


def load_as_dicom_module(ctx, files, name: str = "tilted CT"):
    """files (one series) as Slicer 5.10's DICOM module loads them: Slicer's reader (vtkITK, as AddArchetypeVolume
    and the plugin's series reader use it), no storage node, DICOM.instanceUIDs, and the acquisition transform
    (createAcquisitionTransform: a grid transform from the grid's slice corners to the files', not hardened) where
    they differ by more than its cornerEpsilon, checked as the plugin checks it."""
    from slicer_standins import as_dicom_module_loads

    names = vtk.vtkStringArray()
    for path in files:
        names.InsertNextValue(str(path))
    read = ctx.volumes_logic.AddArchetypeVolume(str(files[0]), "read", 0, names)
    volume = as_dicom_module_loads(ctx, read, files, name)
    ctx.scene.RemoveNode(read)
    uids = volume.GetAttribute("DICOM.instanceUIDs").split()
    by_uid = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path for path in files}
    target, source = _corners_from_headers(volume, [by_uid[uid] for uid in uids]), _corners_of_grid(volume)
    if np.abs(target - source).max() > 1e-3:
        node = slice_grid(ctx.scene, volume, target - source, f"{name} acquisition transform")
        volume.SetAndObserveTransformNodeID(node.GetID())
        fixed = np.array([to_world(volume, corner) for corner in source.reshape(-1, 3)]).reshape(source.shape)
        assert np.allclose(fixed, target), "Acquisition transform didn't fix slice corners!"
    return volume
