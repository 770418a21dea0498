"""A synthetic CT written as a real DICOM series: the main job's default input and the tests' known truth.

Body of soft tissue under a layer of fat, a spine of vertebrae (cortical shell, cancellous core,
discs between), two femur-like shafts with marrow, bowel gas, scanner noise, and the -3024 HU
padding that CT scanners write outside their circular field of view.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PADDING_HU = -3024
RESCALE_INTERCEPT = -1024


@dataclass
class Phantom:
    hu: np.ndarray  # K, J, I (slice, row, column), int16 HU
    bone: np.ndarray  # K, J, I bool: every voxel of bone (cortical + cancellous + marrow cavity)
    body: np.ndarray  # K, J, I bool: everything inside the skin
    pixel_spacing: float  # mm, rows and columns
    slice_spacing: float  # mm


def make_phantom(shape=(72, 128, 128), pixel_spacing=1.5, slice_spacing=2.0, seed=0) -> Phantom:
    slices, rows, cols = shape
    z = (np.arange(slices) - (slices - 1) / 2) * slice_spacing
    y = (np.arange(rows) - (rows - 1) / 2) * pixel_spacing  # LPS: +y is posterior
    x = (np.arange(cols) - (cols - 1) / 2) * pixel_spacing
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")

    hu = np.full(shape, -1000.0)
    body = (xx / 85) ** 2 + (yy / 65) ** 2 <= 1
    hu[body] = -100  # subcutaneous fat
    hu[(xx / 77) ** 2 + (yy / 57) ** 2 <= 1] = 40  # soft tissue
    hu[((xx + 25) ** 2 + (yy + 20) ** 2 + (zz - 10) ** 2) <= 12 ** 2] = -900  # bowel gas

    bone = np.zeros(shape, bool)
    # Spine: vertebral bodies 20 mm tall with 4 mm discs, centred 30 mm posterior.
    spine_r = np.hypot(xx, yy - 30)
    in_vertebra = ((zz - z[0]) % 24) < 20
    vertebra = (spine_r <= 16) & in_vertebra
    hu[(spine_r <= 16) & ~in_vertebra] = 80  # discs
    hu[vertebra] = 900  # cortical shell
    hu[vertebra & (spine_r <= 13.5) & (((zz - z[0]) % 24) > 2) & (((zz - z[0]) % 24) < 18)] = 220  # cancellous
    bone |= vertebra
    # Femur-like shafts: cortical tube around fatty marrow.
    for side in (-1, 1):
        shaft_r = np.hypot(xx - side * 50, yy + 5)
        hu[shaft_r <= 12] = 1200
        hu[shaft_r <= 7] = -50
        bone |= shaft_r <= 12

    rng = np.random.default_rng(seed)
    hu += rng.normal(0, 15, shape)
    hu[np.hypot(xx, yy) > min(rows, cols) / 2 * pixel_spacing] = PADDING_HU  # outside the field of view
    return Phantom(hu=np.rint(hu).astype(np.int16), bone=bone, body=body,
                   pixel_spacing=pixel_spacing, slice_spacing=slice_spacing)


def write_ct_series(folder, hu: np.ndarray, pixel_spacing: float, positions, description: str,
                    orientation=(1, 0, 0, 0, 1, 0), series_uid: str = None, file_names=None) -> list:
    """Writes one uncompressed DICOM CT file per K slice of hu at the given LPS positions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=["SegmentationMachine phantom study"])
    series_uid = series_uid or generate_uid(entropy_srcs=["SegmentationMachine phantom", description])
    files = []
    for index, (plane, position) in enumerate(zip(hu, positions)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(index)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.Manufacturer = "SegmentationMachine"
        ds.PatientName = "Phantom^CT"
        ds.PatientID = "SM-PHANTOM"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame of reference"])  # type 1 in a CT
        ds.SeriesNumber = 1
        ds.SeriesDescription = description
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{float(v):.4f}" for v in position]
        ds.ImageOrientationPatient = [str(v) for v in orientation]
        ds.PixelSpacing = [str(pixel_spacing), str(pixel_spacing)]
        ds.SliceThickness = str(pixel_spacing)
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = (plane.astype(np.int32) - RESCALE_INTERCEPT).astype("<i2").tobytes()
        name = file_names[index] if file_names else f"slice{index + 1:04d}.dcm"
        path = folder / name
        _write_file(path, ds)
        files.append(path)
    return files


def _write_file(path, ds):
    """A DICOM file with preamble and file meta, on pydicom 3 and on Slicer 5.10's pydicom 2.4."""
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:
        pydicom.dcmwrite(path, ds, write_like_original=False)


def write_phantom(folder, phantom: Phantom = None) -> Phantom:
    """Writes the phantom as an axial CT series into folder; returns it (its masks are the truth)."""
    phantom = phantom or make_phantom()
    slices = phantom.hu.shape[0]
    rows, cols = phantom.hu.shape[1:]
    corner = np.array([-(cols - 1) / 2 * phantom.pixel_spacing, -(rows - 1) / 2 * phantom.pixel_spacing])
    positions = [(corner[0], corner[1], (k - (slices - 1) / 2) * phantom.slice_spacing) for k in range(slices)]
    write_ct_series(folder, phantom.hu, phantom.pixel_spacing, positions, "SegmentationMachine CT phantom")
    return phantom
