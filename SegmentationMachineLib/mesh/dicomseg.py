"""DICOM SEG from the scene: a segmentation as one DICOM Segmentation object that references its source series.

read_seg_input (main thread: MRML belongs to it) copies the segments, on the grid of the volume they were made
on, and the source series' file names out of the scene; write_seg (any thread) reads the series' headers
(match_sources) and has segwriter write them with highdicom. highdicom needs pydicom 3, and Slicer 5.10 bundles
pydicom 2.4, which an install must not replace: where highdicom does not import here, the writer runs as a child
process with pydicom 3 and highdicom from a private folder (installed once, after asking, by the module's
packages.ensureSeg) first on its path.
The SEG lives beside the mesh writers because the one-click export (export.py) writes it.
"""

import importlib
import logging
import os
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import slicer
import vtk
from pydicom.misc import is_dicom

from ..core import arrays, child
from ..core.errors import ExportError, install_extra
from ..core.files import replace_when_free
from ..core.grids import RAS_TO_LPS
from ..core.provenance import made_by
from . import segwriter
from .segwriter import SegInput, source_dataset

SEG_FILE = "segmentation.dcm"
# A slice is its source image, as read, where it starts within this of the image's position: Slicer's DICOM
# module adds an acquisition transform where slice corners differ by more (cornerEpsilon, DICOMScalarVolumePlugin).
SAME_POSITION_MM = 1e-3
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# What the SEG writer needs beyond what Slicer 5.10 bundles (numpy 2.0.2, Pillow, packaging and
# typing-extensions, highdicom's other requirements): pure Python, so one folder serves any Slicer and the CLI.
# highdicom's pyjpegls only encodes JPEG-LS, which a SEG written here never uses.
SEG_PINS = ("pydicom==3.0.2", "highdicom==0.28.2")
CHILD_TIMEOUT_S = 1800  # thousands of frames take a minute or two; half an hour means the child hangs

log = logging.getLogger("segmentation-machine")


def seg_packages_folder() -> Path:
    """The private folder of SEG_PINS, beside our other state rather than in Slicer's settings folder: the
    packages are pure Python, so every Slicer and the CLI share it. One per pin set: new pins install anew."""
    return Path.home() / ".segmentation-machine" / "seg-packages" / "_".join(p.replace("==", "-") for p in SEG_PINS)


def install_seg_packages(pip_install, folder=None) -> Path:
    """Fills the private folder with SEG_PINS, whole or not at all, through pip_install(args): Slicer's
    pip_install (slicer/util.py), which runs `PythonSlicer -m pip install ARGS`. --target puts them only there
    and --no-deps adds nothing else, so the application's own packages (Slicer's pydicom 2.4) stay as they are."""
    folder = Path(folder or seg_packages_folder())
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".installing-", dir=folder.parent) as scratch:
        target = Path(scratch) / "packages"
        pip_install(["--target", str(target), "--no-deps", "--only-binary=:all:", *SEG_PINS])
        try:
            replace_when_free(target, folder, os.rename)
        except OSError:
            if not folder.is_dir():  # else a parallel install finished first
                raise
    return folder


def _highdicom_imports() -> bool:
    try:
        importlib.import_module("highdicom")
    except Exception:  # ImportError; an old highdicom beside pydicom 2.4 fails in other ways too
        return False
    return True


def _writer_packages():
    """None where highdicom writes in this process, else the private folder; the sentence where neither."""
    if _highdicom_imports():
        return None
    folder = seg_packages_folder()
    if folder.is_dir():
        return folder
    raise ExportError(f"DICOM SEG export needs highdicom and the pydicom 3 it needs: {install_extra('hospital')} (in "
                      "3D Slicer, the export installs both once, after asking, into a folder of their own).")


def seg_packages_missing() -> bool:
    """True where a SEG can be written neither here nor in the child: the private folder is to be installed."""
    try:
        _writer_packages()
    except ExportError:
        return True
    return False


def reference_volume(segmentation_node):
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    return segmentation_node.GetNodeReference(role)


def source_files(volume_node, dicom_database=None) -> list:
    """The DICOM files the volume was read from. An archetype storage node keeps their list; a volume that
    Slicer's DICOM module loaded (its default GDCM series reader) has no storage node, only the attribute
    DICOM.instanceUIDs, which Slicer's DICOM database (ctkDICOMDatabase) turns back into files."""
    if volume_node is None:
        return []
    files = [name for name in _present(volume_node, storage_names(volume_node)) if is_dicom(name)]
    if files:
        return files
    files = database_files(volume_node, dicom_database)
    if not all(files):
        return []  # a SEG refers to every slice
    return files if all(map(is_dicom, _present(volume_node, files))) else []


def storage_names(volume_node) -> list:
    """The files the volume's storage node read it from (an archetype's list, or its one file); reads none."""
    storage = volume_node.GetStorageNode()
    names = ([storage.GetNthFileName(i) for i in range(storage.GetNumberOfFileNames())] or [storage.GetFileName()]
             if storage else [])
    return [name for name in names if name]


def database_files(volume_node, dicom_database) -> list:
    """For a volume Slicer's DICOM module loaded: its instances' files in Slicer's DICOM database ('' where one is
    missing); [] without the database or the attribute."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    return [dicom_database.fileForInstance(uid) for uid in uids] if dicom_database is not None else []


def _present(volume_node, files: list) -> list:
    """files, where every one is still there: a SEG refers to its series' files and copies their headers."""
    gone = [name for name in files if not Path(name).is_file()]
    if gone:
        raise ExportError(f"{len(gone)} of the {len(files)} DICOM files '{volume_node.GetName()}' was loaded from are "
                          f"gone from {Path(gone[0]).parent} (moved or removed since; an inbox removes a zip's unpacked "
                          "copy once the zip has left it): load the series again from where it is now to make a SEG; "
                          "STL, OBJ, 3MF and glTF need none.")
    return files


def check_seg_export(segmentation_node, dicom_database=None) -> list:
    """Main thread: the source series' files (absolute paths); raises the user's sentence before any work where no
    SEG can be written. dicom_database: Slicer's, where volumes may come from its DICOM module (source_files).
    Only the first file's header is read here (an anonymiser blanks every file alike): match_sources reads them
    all off the main thread, where they take a third of a second per 300 files."""
    _writer_packages()
    files = source_files(reference_volume(segmentation_node), dicom_database)
    if not files:
        raise ExportError(f"DICOM SEG needs the DICOM series '{segmentation_node.GetName()}' was made on, and it "
                          "was not made on one: segment a loaded DICOM series to make a SEG (in the CLI: `model DICOM_FOLDER`, "
                          "or `export LABELS --volume DICOM_FOLDER`); "
                          "STL, OBJ, 3MF and glTF need none.")
    source_dataset(files[0])
    # Once each: a storage node given relative names keeps each file twice, relative and absolute.
    return list(dict.fromkeys(str(Path(name).absolute()) for name in files))


def match_sources(seg: SegInput) -> SegInput:
    """Any thread, once (write_seg does it where the caller has not): reads the source files' headers, with this
    process's pydicom (the user's sentence where a SEG cannot refer to them), and where each slice is its file's
    image as read puts the files in slice order, source_frames set."""
    if seg.slice_starts is None:
        return seg
    images = [_image_geometry(source_dataset(name)) for name in seg.source_files]
    by_slice = _images_by_slice(seg.pixels.shape[:3], seg.ijk_to_ras, seg.slice_starts, seg.source_files, images)
    return replace(seg, source_files=by_slice or seg.source_files, source_frames=bool(by_slice), slice_starts=None)


def _slice_starts(volume_node) -> np.ndarray:
    """(K, 3) LPS: where each slice of the volume's grid starts, through its acquisition transform where it has
    one: Slicer's DICOM module puts the regular grid of a series with irregular geometry (a gantry tilt whose
    slices are not evenly sheared, uneven spacing) under a non-linear transform that moves each slice onto its
    image. A linear parent (a registration) is the user's: the series' own coordinates are the grid's."""
    ijk_to_ras = arrays.ijk_to_ras(volume_node)
    slices = volume_node.GetImageData().GetDimensions()[2]
    starts = (ijk_to_ras @ np.c_[np.zeros((slices, 2)), np.arange(slices), np.ones(slices)].T)[:3].T
    transform_node = volume_node.GetParentTransformNode()
    if transform_node is not None and not transform_node.IsLinear():
        to_parent = transform_node.GetTransformToParent()
        starts = np.array([to_parent.TransformPoint(*map(float, start)) for start in starts])
    return starts * RAS_TO_LPS.diagonal()[:3]


def _image_geometry(header) -> tuple:
    """((rows, columns), orientation, pixel spacing, position) of a source image, as plain tuples: 300 whole headers
    kept alive made the garbage collector hold the GIL for a fifth of a second at a time."""
    return ((header.get("Rows"), header.get("Columns")),
            *(_numbers(header.get(keyword)) for keyword in ("ImageOrientationPatient", "PixelSpacing",
                                                            "ImagePositionPatient")))


def _numbers(value) -> tuple:
    """A multi-valued attribute's numbers; () where it is missing or malformed (one value where several belong):
    the SEG's frames then lie on the volume's grid."""
    try:
        return tuple(map(float, value)) if value is not None else ()
    except (TypeError, ValueError):
        return ()


def _images_by_slice(shape, ijk_to_ras, slice_starts, files: list, images: list) -> list:
    """The source files in the volume's slice order where each slice is its file's image as read, same rows,
    columns, orientation and spacing, starting where the image does: the SEG's frames are then the images
    themselves, at their own positions. [] where the volume is not the series as read (uneven spacing resampled,
    an acquisition transform hardened, another grid): the SEG's frames lie on the volume's grid.
    shape: the volume's (K, J, I); slice_starts: _slice_starts; images: _image_geometry of each file."""
    if len(files) != shape[0]:
        return []
    ijk_to_lps = RAS_TO_LPS @ ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :2], axis=0)
    orientation = np.concatenate([ijk_to_lps[:3, 0] / spacing[0], ijk_to_lps[:3, 1] / spacing[1]])
    positions = []
    for size, image_orientation, pixel_spacing, position in images:
        if not (size == tuple(shape[1:]) and len(image_orientation) == 6 and len(pixel_spacing) == 2
                and np.allclose(image_orientation, orientation, atol=1e-4)
                and np.allclose(pixel_spacing, spacing[::-1], rtol=1e-4) and len(position) == 3):
            return []
        positions.append(position)
    distances = np.linalg.norm(slice_starts[:, None] - np.array(positions)[None], axis=2)
    nearest = distances.argmin(axis=1)
    if not (distances.min(axis=1) <= SAME_POSITION_MM).all() or len(set(nearest)) != len(files):
        return []
    return [files[index] for index in nearest]


def _segment_on_grid(segmentation_node, segment_id, reference: "slicer.vtkOrientedImageData") -> np.ndarray:
    """The segment's voxels (K, J, I, bool) resampled onto the reference volume's grid, voxel for voxel of its series
    whatever transforms the two nodes are under (a registration, Slicer's gantry-tilt acquisition transform)."""
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap, False)  # in the segmentation's own frame, not world
    to_volume = vtk.vtkGeneralTransform()  # nothing concatenated (the usual: the same transform) is the identity
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        segmentation_node.GetParentTransformNode(), reference_volume(segmentation_node).GetParentTransformNode(),
        to_volume)
    on_grid = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, on_grid, False, False, to_volume)  # exactly the series' extent: not padded
    # The labelmap is the whole layer the segment shares with others (the Segment Editor puts segments that do not
    # overlap in one): only its own label value is the segment.
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    mask = arrays.image_array(on_grid) == segment.GetLabelValue()  # resampled by nearest neighbour: values kept
    if not mask.any() and labelmap.GetPointData().GetScalars() and \
            (arrays.image_array(labelmap) == segment.GetLabelValue()).any():
        raise ExportError(f"Segment '{segment.GetName()}' lies "
                          f"outside the DICOM series '{reference_volume(segmentation_node).GetName()}' that the SEG "
                          "would refer to: the two do not overlap in space. Give the series the segmentation was made "
                          "on (in the CLI: `export LABELS --volume DICOM_FOLDER`).")
    return mask


def _reference_grid(volume_node) -> "slicer.vtkOrientedImageData":
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volume_node.GetImageData().GetExtent())
    reference.SetImageToWorldMatrix(arrays.array_to_matrix(arrays.ijk_to_ras(volume_node)))
    reference.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    return reference


def _seg_pixels(segmentation_node, segment_ids, reference) -> np.ndarray:
    """Segment numbers (K, J, I) where segments do not overlap; else one mask per segment (K, J, I, n)."""
    labels = np.zeros(arrays.image_array(reference).shape, np.uint16)
    for number, segment_id in enumerate(segment_ids, 1):
        mask = _segment_on_grid(segmentation_node, segment_id, reference)
        if labels[mask].any():  # overlapping segments (bone inside skin): the larger form, one mask each
            return np.stack([_segment_on_grid(segmentation_node, i, reference) for i in segment_ids], axis=-1)
        labels[mask] = number
    return labels


def read_seg_input(segmentation_node, segment_ids, dicom_database=None, files=None) -> SegInput:
    """Main thread (MRML belongs to it): the given segments on the source series' grid, its files (check_seg_export's,
    where the caller has them), and where its slices lie (match_sources matches the files to them)."""
    files = files or check_seg_export(segmentation_node, dicom_database)
    volume = reference_volume(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    return SegInput(files, arrays.ijk_to_ras(volume),
                    _seg_pixels(segmentation_node, segment_ids, _reference_grid(volume)),
                    [(segmentation.GetSegment(i).GetName(), segmentation.GetSegment(i).GetColor())
                     for i in segment_ids],
                    segmentation_node.GetName(), made_by=tuple(made_by(segmentation_node, i) for i in segment_ids),
                    slice_starts=_slice_starts(volume))


def write_seg(path, seg: SegInput, packages=None):
    """Any thread: writes the segments as one DICOM SEG at path, segment numbers in their order; in this
    process where highdicom imports, else in a child with the private folder. packages: a folder of pydicom 3
    and highdicom for the child, which then writes even where highdicom imports here."""
    seg = match_sources(seg)
    packages = packages or _writer_packages()
    if packages is None:
        segwriter.write(path, seg)
    else:
        _write_in_child(path, seg, Path(packages))


def _write_in_child(path, seg: SegInput, packages: Path):
    with tempfile.TemporaryDirectory(prefix="sm-seg-") as folder:  # private (0700): the voxels are patient data
        segwriter.save_input(folder, seg)
        try:
            done = child.run_module(segwriter.__name__, [folder, Path(path).absolute()], CHILD_TIMEOUT_S,
                                    first_paths=[packages])
        except subprocess.TimeoutExpired:
            raise ExportError(f"Writing the DICOM SEG took more than {CHILD_TIMEOUT_S // 60} minutes and was "
                              "stopped: export fewer segments at a time.") from None
        except OSError as error:
            raise ExportError(f"The DICOM SEG writer could not start ({error.strerror}): export STL, OBJ, 3MF or "
                              "glTF instead.") from None
    last_line = child.last_line(done.stderr)
    if done.returncode == child.USER_ERROR_EXIT:
        raise ExportError(last_line)
    if done.returncode != 0:
        log.error("The DICOM SEG writer's process (packages from %s) ended with exit code %s:\n%s",
                  packages, done.returncode, done.stderr)
        # Not its traceback's last line: highdicom's and pydicom's words quote the header value they refuse (a
        # patient's name), and this sentence reaches watch's status.json and its journal.
        raise ExportError(f"Writing the DICOM SEG failed (exit code {done.returncode}; the log has the details): "
                          f"export STL, OBJ, 3MF or glTF instead, or delete {packages} so that the next SEG export "
                          "installs its packages again.")
