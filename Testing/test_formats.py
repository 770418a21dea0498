"""Hospital formats: DICOM SEG (read back with highdicom, voxel for voxel in space), glTF (Khronos
glTF-Validator), 3MF (the 3MF Consortium's lib3mf), and DICOM SEG read by `segmentation-machine export`."""

import json
import os
import re
import shutil
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import vtk
from vtkmodules.util import numpy_support

from conftest import DATA, JPEG2000_SERIES, UNCOMPRESSED_SERIES
from slicer_standins import DicomDatabase, as_dicom_module_loads
from SegmentationMachineLib.cli.main import main
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import ExportError
from SegmentationMachineLib.core.provenance import NNINTERACTIVE, mark_segment
from SegmentationMachineLib.dicom.volumes import load_input, load_volume_file
from SegmentationMachineLib.mesh.export import ExportOptions, export_segmentation, prepare_export, write_export
from SegmentationMachineLib.mesh.segwriter import dicom_lab_to_rgb, rgb_to_dicom_lab, segment_codes
from SegmentationMachineLib.panels.export import ExportPanel
from SegmentationMachineLib.segment.dicomseg import load_dicom_seg
from SegmentationMachineLib.segment.presets import add_segment_from_mask, apply_preset
from SegmentationMachineLib.segment.segmentations import load_segmentation

REPO = Path(__file__).resolve().parents[1]
DCMQI = DATA / "dcmqi"
VALIDATOR = REPO / "build" / "tools" / "node_modules" / "gltf-validator"  # scripts/test.sh installs it
needs_highdicom = pytest.mark.skipif(
    __import__("importlib").util.find_spec("highdicom") is None,
    reason="highdicom is not installed (it needs pydicom 3; Slicer 5.10's pins have 2.4): "
           "pip install -e '.[hospital]'")


def grid_voxels(ras: np.ndarray, volume) -> set:
    """RAS voxel centres as (i, j, k) on the volume's grid; each must land on a voxel centre."""
    ijk = (np.linalg.inv(arrays.ijk_to_ras(volume)) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
    assert np.abs(ijk - np.rint(ijk)).max(initial=0) < 1e-3
    return set(map(tuple, np.rint(ijk).astype(int)))


def mask_voxels(mask, ijk_to_ras, volume) -> set:
    k, j, i = np.nonzero(mask)
    return grid_voxels((ijk_to_ras @ np.c_[i, j, k, np.ones(len(i))].T)[:3].T, volume)


def segment_voxels(segmentation_node, index, volume) -> set:
    segment = segmentation_node.GetSegmentation().GetNthSegment(index)
    labelmap = segment.GetRepresentation("Binary labelmap")
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    shift = np.eye(4)
    shift[:3, 3] = labelmap.GetExtent()[0::2]  # array index 0 is the extent's minimum
    return mask_voxels(arrays.image_array(labelmap) == segment.GetLabelValue(),
                       arrays.matrix_to_array(matrix) @ shift, volume)


def highdicom_voxels(seg, volume) -> dict:
    """{segment label: voxels}, placed by highdicom's own reading of the SEG's geometry."""
    voxels = {}
    for description in seg.SegmentSequence:
        read = seg.get_volume(segment_numbers=[description.SegmentNumber], combine_segments=True)
        s, r, c = np.nonzero(read.array)  # highdicom's affine maps (slice, row, column) to LPS
        lps = (read.affine @ np.c_[s, r, c, np.ones(len(s))].T)[:3].T
        voxels[description.SegmentLabel] = grid_voxels(lps * [-1, -1, 1], volume)
    return voxels


def dcmqi_segmentation(ctx):
    """The three dcmqi label masks of ct-3slice as one segmentation on that DICOM series."""
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "dcmqi labels")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, color in (("Liver", (0.87, 0.51, 0.4)), ("spine", (0.95, 0.84, 0.57)), ("Heart", (0.8, 0.2, 0.2))):
        labelmap = load_volume_file(ctx, DCMQI / f"{name.lower()}_seg.nrrd", labelmap=True).node
        add_segment_from_mask(node, arrays.volume_array(labelmap) > 0, arrays.ijk_to_ras(labelmap), name, color)
    return volume, node


@needs_highdicom
def test_seg_holds_every_segment_voxel_for_voxel_in_space_and_refers_to_its_series(ctx, shared_data, tmp_path):
    import highdicom
    import pydicom

    volume, node = dcmqi_segmentation(ctx)
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("seg", "stl")))
    seg = highdicom.seg.segread(result.folder / "segmentation.dcm")
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))]
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID and seg.Modality == "SEG"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        d.SOPInstanceUID for d in source}
    descriptions = {d.SegmentLabel: d for d in seg.SegmentSequence}
    assert list(descriptions) == ["Liver", "spine", "Heart"]
    assert descriptions["Liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert descriptions["Heart"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "80891009"
    assert descriptions["spine"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # tissue
    assert descriptions["spine"].SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
    for index, name in enumerate(descriptions):
        color = dicom_lab_to_rgb(descriptions[name].RecommendedDisplayCIELabValue)
        assert np.allclose(color, node.GetSegmentation().GetNthSegment(index).GetColor(), atol=1 / 255)
    read_back = highdicom_voxels(seg, volume)
    for index, name in enumerate(descriptions):
        expected = segment_voxels(node, index, volume)
        assert expected and read_back[name] == expected, name


@needs_highdicom
def test_segments_sharing_one_labelmap_layer_keep_only_their_own_voxels(ctx, shared_data, tmp_path):
    """The Segment Editor keeps segments that do not overlap in one shared layer: each segment was written as the
    whole layer, every segment's frames holding all three organs."""
    import highdicom

    volume, node = dcmqi_segmentation(ctx)
    node.GetSegmentation().CollapseBinaryLabelmaps(False)  # as Slicer shares layers: where segments do not overlap
    assert node.GetSegmentation().GetNumberOfLayers() < 3
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("seg",)))
    read_back = highdicom_voxels(highdicom.seg.segread(result.folder / "segmentation.dcm"), volume)
    for index, name in enumerate(["Liver", "spine", "Heart"]):
        assert read_back[name] == segment_voxels(node, index, volume), name


@needs_highdicom
def test_seg_says_how_each_segment_was_made_also_from_a_saved_segmentation(ctx, shared_data, tmp_path):
    """A preset is automatic morphology on the CPU, not AI, and semi-automatic once edited by hand; nnInteractive's
    segments are AI, semi-automatic; a segment we did not make is manual. The content creator (type 2) is there,
    empty: nobody is named."""
    import pydicom

    volume, node = dcmqi_segmentation(ctx)  # Liver, spine, Heart: made elsewhere
    apply_preset(ctx, volume, "bone", node)
    apply_preset(ctx, volume, "skin", node)
    mark_segment(node, node.GetSegmentation().GetSegmentIdBySegmentName("Heart"), NNINTERACTIVE)  # as the session does
    skin = node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("Skin"))
    labelmap = skin.GetRepresentation("Binary labelmap")
    voxels = arrays.image_array(labelmap)
    voxels.flat[np.flatnonzero(voxels == skin.GetLabelValue())[0]] = 0  # one voxel erased, as by hand
    labelmap.Modified()
    result = export_segmentation(node, tmp_path / "out", ExportOptions(formats=("seg",), save_segmentation=True))
    saved = next(result.folder.glob("*.seg.nrrd"))
    assert main(["export", str(saved), "--volume", str(UNCOMPRESSED_SERIES), "--format", "seg", "--quiet",
                 "--out", str(tmp_path / "again")]) == 0
    preset = ("SegmentationMachine preset", "123104", "Morphological Operations")
    for path in (result.folder / "segmentation.dcm", next((tmp_path / "again").glob("*/segmentation.dcm"))):
        seg = pydicom.dcmread(path)
        assert "ContentCreatorName" in seg and not seg.ContentCreatorName
        made = {}
        for description in seg.SegmentSequence:
            algorithm = description.get("SegmentationAlgorithmIdentificationSequence", [None])[0]
            made[description.SegmentLabel] = (description.SegmentAlgorithmType, algorithm and (
                algorithm.AlgorithmName, algorithm.AlgorithmFamilyCodeSequence[0].CodeValue,
                algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning))
        assert made == {"Liver": ("MANUAL", None), "spine": ("MANUAL", None),
                        "Heart": ("SEMIAUTOMATIC", ("nnInteractive", "123110", "Artificial Intelligence")),
                        "Bone": ("AUTOMATIC", preset), "Skin": ("SEMIAUTOMATIC", preset)}


def test_a_preset_on_another_grid_than_its_segmentation_is_unedited_after_saving_and_loading(ctx, tmp_path):
    """Saving resamples every segment onto the segmentation's reference geometry: a preset made on a finer volume
    than the one the segmentation was made on is not 'edited' by that."""
    from SegmentationMachineLib.core.provenance import made_by, PRESET, PRESET_EDITED
    from SegmentationMachineLib.segment.presets import add_segment_from_mask

    coarse, fine = np.diag([2.0, 2.0, 2.0, 1.0]), np.eye(4)
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "coarse")
    arrays.set_volume_array(volume, np.zeros((20, 20, 20), np.int16), coarse)
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    drawn = np.zeros((20, 20, 20), bool)
    drawn[1:4, 1:4, 1:4] = True
    add_segment_from_mask(node, drawn, coarse, "Drawn", (1, 0, 0))
    bone = np.zeros((40, 40, 40), bool)
    bone[10:30, 12:28, 5:35] = True
    mark_segment(node, add_segment_from_mask(node, bone, fine, "Bone", (1, 1, 1)), PRESET)
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "saved.seg.nrrd"))
    assert storage.WriteData(node)
    loaded = ctx.segmentations_logic.LoadSegmentationFromFile(str(tmp_path / "saved.seg.nrrd"), False)
    bone_id = loaded.GetSegmentation().GetSegmentIdBySegmentName("Bone")
    assert made_by(loaded, bone_id) == PRESET
    labelmap = loaded.GetSegmentation().GetSegment(bone_id).GetRepresentation("Binary labelmap")
    voxels = arrays.image_array(labelmap)
    voxels.flat[np.flatnonzero(voxels == loaded.GetSegmentation().GetSegment(bone_id).GetLabelValue())[-1]] = 0
    labelmap.Modified()
    assert made_by(loaded, bone_id) == PRESET_EDITED


@needs_highdicom
def test_the_clis_liver_seg_and_dcmqis_liver_seg_hold_the_same_voxels(ctx, shared_data, tmp_path):
    import highdicom

    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    (tmp_path / "labels.json").write_text('{"1": "Liver"}')
    assert main(["export", str(DCMQI / "liver_seg.nrrd"), "--volume", str(UNCOMPRESSED_SERIES), "--labels",
                 str(tmp_path / "labels.json"), "--format", "seg", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    written = next((tmp_path / "out").glob("*/segmentation.dcm"))
    ours = highdicom_voxels(highdicom.seg.segread(written), volume)["Liver"]
    dcmqi = highdicom_voxels(highdicom.seg.segread(DCMQI / "liver.dcm"), volume)["Liver"]
    assert len(ours) > 100000 and ours == dcmqi


@needs_highdicom
def test_overlapping_segments_each_keep_their_voxels(ctx, shared_data, tmp_path):
    import highdicom

    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    node = apply_preset(ctx, volume, "bone")
    apply_preset(ctx, volume, "skin", node)  # the body, bone inside it
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("seg", "glb")))
    read_back = highdicom_voxels(highdicom.seg.segread(result.folder / "segmentation.dcm"), volume)
    bone, skin = (segment_voxels(node, i, volume) for i in (0, 1))
    assert bone & skin and read_back == {"Bone": bone, "Skin": skin}
    # and our own reader (what `export` uses) puts them back in the same place
    again = load_dicom_seg(ctx, result.folder / "segmentation.dcm")
    assert [segment_voxels(again, i, volume) for i in (0, 1)] == [bone, skin]


@needs_highdicom
def test_a_segment_on_slices_apart_reads_back_with_the_gap_between_them_empty(ctx, shared_data, tmp_path):
    """Empty frames are left out of a SEG, so its nearest frames may be slices apart: taking their distance for the
    slice spacing filled the gap and doubled the volume, silently, into the printed mesh."""
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    mask = np.zeros((3, 512, 512), bool)
    mask[[0, 2], 200:260, 200:260] = True
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "apart")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    add_segment_from_mask(node, mask, arrays.ijk_to_ras(volume), "Nodule", (0.9, 0.1, 0.1))
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("seg",)))
    again = load_dicom_seg(ctx, result.folder / "segmentation.dcm")
    assert segment_voxels(again, 0, volume) == mask_voxels(mask, arrays.ijk_to_ras(volume), volume)
    matrix = vtk.vtkMatrix4x4()
    again.GetSegmentation().GetNthSegment(0).GetRepresentation("Binary labelmap").GetImageToWorldMatrix(matrix)
    assert np.allclose(arrays.spacing_of(arrays.matrix_to_array(matrix)), arrays.spacing_of(arrays.ijk_to_ras(volume)))


@needs_highdicom
def test_seg_on_an_oblique_mirrored_anisotropic_grid_stays_in_place(ctx, shared_data, tmp_path):
    import highdicom

    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    angle = np.radians(30)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) @ \
        np.diag([1.5, -0.8, 2.5])  # J mirrored, every axis its own spacing
    matrix[:3, 3] = [12.0, -40.0, 7.0]
    volume.SetIJKToRASMatrix(arrays.array_to_matrix(matrix))
    mask = np.zeros((3, 512, 512), bool)
    mask[0:2, 100:140, 300:380] = True
    mask[2, 200:210, 10:20] = True
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "oblique")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    add_segment_from_mask(node, mask, matrix, "Tumour", (0.9, 0.1, 0.1))
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("seg",)))
    read_back = highdicom_voxels(highdicom.seg.segread(result.folder / "segmentation.dcm"), volume)
    assert read_back == {"Tumour": mask_voxels(mask, matrix, volume)}


@needs_highdicom
def test_seg_of_a_series_without_patient_attributes_is_written(tmp_path):
    """Anonymisers (and our phantom) drop type 2 patient/study attributes; the SEG still copies them, empty."""
    import highdicom

    assert main(["model", "--format", "seg", "--out", str(tmp_path), "--quiet"]) == 0
    seg = highdicom.seg.segread(next(tmp_path.glob("*/segmentation.dcm")))
    assert "PatientBirthDate" in seg and not seg.PatientBirthDate
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Bone"]


@needs_highdicom
@pytest.mark.parametrize("keyword, value", [
    ("PatientBirthDate", "00000000"), ("PatientBirthDate", "1901-01-01"), ("PatientBirthDate", "19010132"),
    ("PatientSex", "U"), ("StudyTime", "14:03:52"), ("StudyDate", "2024.03.01"),
])
def test_a_seg_of_a_series_with_a_value_highdicom_refuses_copies_it_as_it_is(shared_data, tmp_path, capfd, keyword,
                                                                             value):
    """Real headers hold these; highdicom's strict parse ended the export in a traceback naming the value, its
    meshes removed, and watch wrote the patient's birth date into status.json."""
    import highdicom
    import pydicom

    (tmp_path / "series").mkdir()
    for path in sorted(UNCOMPRESSED_SERIES.glob("*.dcm")):
        source = pydicom.dcmread(path)
        setattr(source, keyword, value)
        source.save_as(tmp_path / "series" / path.name)
    assert main(["export", str(DCMQI / "liver_seg.nrrd"), "--volume", str(tmp_path / "series"), "--format",
                 "stl,seg", "--out", str(tmp_path), "--quiet"]) == 0
    seg = highdicom.seg.segread(next(tmp_path.glob("*/segmentation.dcm")))
    assert seg[keyword].value == value and next(tmp_path.glob("*/*.stl"))
    assert value not in "".join(capfd.readouterr())


@needs_highdicom
@pytest.mark.parametrize("character_set, patient", [
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # Japanese: highdicom refused the set
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),  # Korean: likewise
    ("ISO_IR 126", "Διονυσιος^Νικος"),  # Greek
])
def test_a_seg_of_a_series_in_any_character_set_keeps_its_names_in_utf8(shared_data, tmp_path, character_set, patient):
    """A Japanese or Korean series' SEG ended in a traceback; a backslash in a segment's name made two labels."""
    import highdicom
    import pydicom

    for path in sorted(UNCOMPRESSED_SERIES.glob("*.dcm")):
        source = pydicom.dcmread(path)
        source.SpecificCharacterSet, source.PatientName = character_set, patient
        source.SeriesDescription = patient.split("=")[-1].split("^")[0]  # text the set holds
        (tmp_path / "series").mkdir(exist_ok=True)
        source.save_as(tmp_path / "series" / path.name)
    (tmp_path / "names.json").write_text(json.dumps({"1": "Rib L\\R\tcut"}), encoding="utf-8")
    assert main(["export", str(DCMQI / "liver_seg.nrrd"), "--volume", str(tmp_path / "series"), "--labels",
                 str(tmp_path / "names.json"), "--format", "seg", "--out", str(tmp_path), "--quiet"]) == 0
    seg = highdicom.seg.segread(next(tmp_path.glob("*/segmentation.dcm")))
    assert seg.SpecificCharacterSet == "ISO_IR 192" and str(seg.PatientName) == patient
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Rib L/R cut"]


@needs_highdicom
def test_a_seg_of_a_series_given_by_a_relative_path_puts_each_frame_on_its_own_image(shared_data, tmp_path,
                                                                                    monkeypatch):
    """Given a relative folder, Slicer's volume loader kept every file twice (relative and absolute): the SEG then
    referred to each image twice and put its frames on the wrong images, which Slicer (dcmqi) and PACS viewers
    show in the wrong slices, with nothing to warn."""
    import highdicom
    import pydicom

    monkeypatch.chdir(DATA)
    assert main(["model", "dcmqi/ct-3slice", "--preset", "bone", "--format", "seg", "--out", str(tmp_path),
                 "--quiet"]) == 0
    seg = highdicom.seg.segread(next(tmp_path.glob("*/segmentation.dcm")))
    position = {d.SOPInstanceUID: [float(v) for v in d.ImagePositionPatient]
                for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in UNCOMPRESSED_SERIES.glob("*.dcm"))}
    referenced = [i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(position)  # each image once
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == position[source]


@needs_highdicom
def test_seg_without_a_dicom_series_is_one_sentence_before_any_work(ctx, shared_data, tmp_path):
    on_nifti = load_segmentation(ctx, DATA / "totalsegmentator" / "example_seg.nii.gz")
    with pytest.raises(ExportError, match="DICOM SEG needs the DICOM series"):
        export_segmentation(on_nifti, tmp_path, ExportOptions(formats=("stl", "seg")))
    anonymised = apply_preset(ctx, load_input(ctx, JPEG2000_SERIES).node, "bone")  # blank study/series UIDs
    with pytest.raises(ExportError, match="has no StudyInstanceUID or SeriesInstanceUID"):
        prepare_export(anonymised, ExportOptions(formats=("stl", "seg")))  # at the click: its first file tells


@needs_highdicom
def test_a_seg_on_a_series_the_labels_do_not_overlap_is_refused_before_any_file(shared_data, tmp_path, capsys):
    """--volume naming another patient's series wrote a SEG of empty frames referring to that patient, exit 0."""
    labels = DATA / "totalsegmentator" / "example_seg_dicom.nii.gz"
    assert main(["export", str(labels), "--volume", str(UNCOMPRESSED_SERIES), "--format", "stl,seg",
                 "--out", str(tmp_path / "out")]) == 2
    assert "lies outside the DICOM series 'Series 2' that the SEG would refer to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_highdicom
def test_a_seg_export_reads_its_series_headers_off_the_main_thread(ctx, shared_data, tmp_path, monkeypatch):
    """prepare_export runs on Slicer's main thread, where reading a 300-slice series' headers took a third of a
    second, twice: it reads the first file's alone; write_export, on a worker, reads them all before any mesh."""
    import pydicom

    from SegmentationMachineLib.mesh import segwriter

    shutil.copytree(UNCOMPRESSED_SERIES, tmp_path / "series")
    segmentation = apply_preset(ctx, load_input(ctx, tmp_path / "series").node, "bone")
    files = sorted(str(path.absolute()) for path in (tmp_path / "series").glob("*.dcm"))
    read, dcmread = [], segwriter.pydicom.dcmread
    monkeypatch.setattr(segwriter.pydicom, "dcmread",
                        lambda path, **options: read.append(path) or dcmread(path, **options))
    options = ExportOptions(formats=("stl", "seg"))
    prepared = prepare_export(segmentation, options)
    assert len(read) == 1 and read[0] in files
    result = write_export(prepared, tmp_path / "out", options)
    assert sorted(set(map(str, read))) == files
    seg = load_dicom_seg(ctx, result.folder / "segmentation.dcm")
    assert seg.GetSegmentation().GetNumberOfSegments() == 1

    other = next(name for name in files if name != read[0])  # a file an anonymiser got at, not the one read first
    header = pydicom.dcmread(other)
    del header.StudyInstanceUID
    header.save_as(other)
    prepared, meshed = prepare_export(segmentation, options), []  # the click does not see it: the worker does
    anonymised = f"{re.escape(other)} has no StudyInstanceUID \\(an anonymiser removed it\\)"
    with pytest.raises(ExportError, match=anonymised):
        write_export(prepared, tmp_path / "again", options, progress=lambda *done: meshed.append(done))
    assert not meshed and not (tmp_path / "again").exists()


@needs_highdicom
def test_seg_of_a_series_whose_files_are_gone_says_so(ctx, shared_data, tmp_path):
    """Moved, or an unpacked zip the inbox removed in a later session: once a FileNotFoundError traceback."""
    shutil.copytree(UNCOMPRESSED_SERIES, tmp_path / "series")
    segmentation = apply_preset(ctx, load_input(ctx, tmp_path / "series").node, "bone")
    (tmp_path / "series" / "02.dcm").unlink()
    with pytest.raises(ExportError, match=r"^1 of the 3 DICOM files '.*' was loaded from are gone from .*series "
                                          r"\(moved or removed since; .*\): load the series again from where it is now"):
        export_segmentation(segmentation, tmp_path / "out", ExportOptions(formats=("seg",)))


@needs_highdicom
def test_seg_of_a_volume_slicers_dicom_module_loaded_finds_its_series_through_the_database(ctx, shared_data, tmp_path):
    """Slicer's DICOM module leaves no storage node, only DICOM.instanceUIDs: its database gives the files."""
    import highdicom

    files = sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))
    loaded = as_dicom_module_loads(ctx, load_input(ctx, UNCOMPRESSED_SERIES).node, files)
    assert loaded.GetStorageNode() is None
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "on the DICOM module's volume")
    node.SetReferenceImageGeometryParameterFromVolumeNode(loaded)
    liver = load_volume_file(ctx, DCMQI / "liver_seg.nrrd", labelmap=True).node
    add_segment_from_mask(node, arrays.volume_array(liver) > 0, arrays.ijk_to_ras(liver), "Liver", (0.87, 0.51, 0.4))
    with pytest.raises(ExportError, match="DICOM SEG needs the DICOM series"):  # no database: no files
        export_segmentation(node, tmp_path, ExportOptions(formats=("seg",)))
    prepared = prepare_export(node, ExportOptions(formats=("seg",)), ctx=replace(ctx, dicom_database=DicomDatabase(files)))
    result = write_export(prepared, tmp_path, ExportOptions(formats=("seg",)))
    seg = highdicom.seg.segread(result.folder / "segmentation.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom_series_uid(files[0])
    assert highdicom_voxels(seg, loaded)["Liver"] == segment_voxels(node, 0, loaded)
    with pytest.raises(ExportError, match="DICOM SEG needs the DICOM series"):  # a slice the database lost
        prepare_export(node, ExportOptions(formats=("seg",)), ctx=replace(ctx, dicom_database=DicomDatabase(files[1:])))


def pydicom_series_uid(path) -> str:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID


def test_export_reads_dcmqis_liver_seg_where_slicers_reader_puts_it(ctx, shared_data, tmp_path):
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    ours = load_dicom_seg(ctx, DCMQI / "liver.dcm")
    slicers = load_segmentation(ctx, DCMQI / "liver.dcm")  # ITK's reader: right only for one-segment SEGs
    assert ours.GetSegmentation().GetNthSegment(0).GetName() == "Liver"  # the SEG's label, not the file name
    expected = segment_voxels(slicers, 0, volume)
    assert len(expected) == 107098 and segment_voxels(ours, 0, volume) == expected
    assert main(["export", str(DCMQI / "liver.dcm"), "--out", str(tmp_path), "--format", "stl", "--quiet"]) == 0
    report = json.loads(next(tmp_path.glob("*/report.json")).read_text())
    assert [m["name"] for m in report["meshes"]] == ["Liver"] and report["meshes"][0]["watertight"]


def test_segment_codes_and_colours():
    assert segment_codes("kidney_left")[1] == ("64033007", "Kidney")
    assert segment_codes("Tumour") == (("85756007", "Tissue"), ("85756007", "Tissue"))
    for rgb in [(1.0, 0.0, 0.0), (0.2, 0.6, 0.9), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]:
        assert np.allclose(dicom_lab_to_rgb(rgb_to_dicom_lab(rgb)), rgb, atol=1 / 255)
    assert rgb_to_dicom_lab((1.0, 1.0, 1.0)) == [65535, 32896, 32896]  # L 100, a 0, b 0


def test_the_module_exports_the_formats_in_one_order():  # SEG inside Slicer 5.10: test_seg_in_slicer.py
    assert ExportPanel(formats={"seg", "glb", "stl"}).options().formats == ("stl", "glb", "seg")


def gltf_validation(path: Path) -> dict:
    if shutil.which("node") is None or not VALIDATOR.is_dir():
        pytest.skip("the Khronos glTF-Validator is not installed: bash scripts/test.sh installs it "
                    "(npm install --prefix build/tools gltf-validator; needs Node.js)")
    script = ("const v = require('gltf-validator'); const fs = require('fs');"
              "v.validateBytes(new Uint8Array(fs.readFileSync(process.argv[1])))"
              ".then(r => console.log(JSON.stringify(r)), e => { console.error(String(e)); process.exit(1); });")
    done = subprocess.run(["node", "-e", script, str(path)], capture_output=True, text=True, check=True, timeout=120,
                          env={**os.environ, "NODE_PATH": str(VALIDATOR.parent)})
    return json.loads(done.stdout)


def glb_document(path: Path):
    data = path.read_bytes()
    length = int.from_bytes(data[12:16], "little")
    document = json.loads(data[20:20 + length])
    binary = data[28 + length:]
    return document, binary


def test_glb_passes_the_khronos_validator_with_named_coloured_nodes_in_metres_y_up(ctx, shared_data, tmp_path):
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    node = apply_preset(ctx, volume, "bone")
    apply_preset(ctx, volume, "skin", node)
    for coordinates in ("LPS", "RAS"):
        result = export_segmentation(node, tmp_path, ExportOptions(formats=("stl", "glb"), coordinates=coordinates))
        report = gltf_validation(result.folder / "segments.glb")
        issues = report["issues"]
        counts = [issues[f"num{kind}"] for kind in ("Errors", "Warnings", "Infos", "Hints")]
        assert counts == [0, 0, 0, 0], issues["messages"][:5]
        assert report["info"]["drawCallCount"] == 2
        document, binary = glb_document(result.folder / "segments.glb")
        assert [n["name"] for n in document["nodes"]] == ["Bone", "Skin"]
        assert [m["name"] for m in document["materials"]] == ["Bone", "Skin"]
        assert document["asset"]["extras"]["units"] == "metre"
        for index, entry in enumerate(result.report["meshes"]):
            accessor = document["accessors"][document["meshes"][index]["primitives"][0]["attributes"]["POSITION"]]
            view = document["bufferViews"][accessor["bufferView"]]
            points = np.frombuffer(binary, "<f4", accessor["count"] * 3, view["byteOffset"]).reshape(-1, 3)
            # Smooth shading: a unit normal per vertex, pointing out of the segment (away from its inside).
            accessor = document["accessors"][document["meshes"][index]["primitives"][0]["attributes"]["NORMAL"]]
            view = document["bufferViews"][accessor["bufferView"]]
            normals = np.frombuffer(binary, "<f4", accessor["count"] * 3, view["byteOffset"]).reshape(-1, 3)
            assert len(normals) == len(points) and np.allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-6)
            accessor = document["accessors"][document["meshes"][index]["primitives"][0]["indices"]]
            view = document["bufferViews"][accessor["bufferView"]]
            triangles = np.frombuffer(binary, "<u4", accessor["count"], view["byteOffset"]).reshape(-1, 3)
            agreement = np.sum(normals * outward_normals(points, triangles), axis=1)
            assert np.median(agreement) > 0.99 and np.mean(agreement > 0) > 0.99
            stl = stl_points(result.folder / entry["stl"])
            lps = stl if coordinates == "LPS" else stl * [-1, -1, 1]
            # glTF x = patient left, y = superior, z = anterior, metres: the same mesh, whatever the STL's axes
            expected = np.c_[lps[:, 0], lps[:, 2], -lps[:, 1]] / 1000
            assert np.allclose([points.min(0), points.max(0)], [expected.min(0), expected.max(0)], atol=1e-6)
            srgb = document["materials"][index]["pbrMetallicRoughness"]["baseColorFactor"][:3]
            assert np.allclose(np.where(np.array(srgb) <= 0.0031308, np.array(srgb) * 12.92,
                                        1.055 * np.array(srgb) ** (1 / 2.4) - 0.055), entry["color"], atol=1e-3)
        # The skin encloses the bone: see-through, so that a viewer shows the bone inside it.
        assert [e["opacity"] for e in result.report["meshes"]] == [1.0, 0.4]
        assert [(m["pbrMetallicRoughness"]["baseColorFactor"][3], m.get("alphaMode")) for m in document["materials"]] \
            == [(1.0, None), (pytest.approx(0.4), "BLEND")]


def test_glb_and_obj_carry_the_3d_opacity_slicer_shows_each_segment_with(ctx, shared_data, tmp_path):
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    node = apply_preset(ctx, volume, "skin")
    assert node.GetDisplayNode().GetSegmentOpacity3D(node.GetSegmentation().GetNthSegmentID(0)) == 1.0  # alone: opaque
    apply_preset(ctx, volume, "bone", node)  # skin first, bone joins it: the skin turns see-through all the same
    display = node.GetDisplayNode()
    assert display.GetSegmentOpacity3D(node.GetSegmentation().GetNthSegmentID(0)) == pytest.approx(0.4)
    display.SetSegmentOpacity3D(node.GetSegmentation().GetNthSegmentID(1), 0.8)  # as the Segmentations module does
    display.SetOpacity3D(0.5)
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("obj", "glb")))
    assert [e["opacity"] for e in result.report["meshes"]] == [0.2, 0.4]
    document, _ = glb_document(result.folder / "segments.glb")
    assert [m["pbrMetallicRoughness"]["baseColorFactor"][3] for m in document["materials"]] == pytest.approx([0.2, 0.4])
    assert {m.get("alphaMode") for m in document["materials"]} == {"BLEND"}
    materials = (result.folder / "segments.mtl").read_text()
    assert "newmtl Skin\n" in materials and materials.count("\nd 0.2\n") == 1 and materials.count("\nd 0.4\n") == 1


def test_the_segmentations_overall_opacity_is_carried_as_slicers_3d_view_applies_it(ctx, tmp_path):
    """Slicer's 3D view multiplies the display node's overall opacity in (vtkMRMLSegmentationsDisplayableManager3D,
    with its 3D opacity and each segment's): an export that took only the 3D opacity wrote an opaque mesh for a
    segmentation the user saw half see-through."""
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Dimmed")
    node.CreateDefaultDisplayNodes()
    cube = np.zeros((8, 8, 8), bool)
    cube[2:6, 2:6, 2:6] = True
    add_segment_from_mask(node, cube, np.eye(4), "Cube", (1, 0, 0))
    node.GetDisplayNode().SetOpacity(0.5)
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("glb",)))
    assert [mesh["opacity"] for mesh in result.report["meshes"]] == [0.5]
    document, _ = glb_document(result.folder / "segments.glb")
    assert [(m["pbrMetallicRoughness"]["baseColorFactor"][3], m.get("alphaMode")) for m in document["materials"]] \
        == [(0.5, "BLEND")]


def test_glb_places_colours_and_shades_a_known_mesh_without_the_validator(tmp_path):
    """Where Node.js or the Khronos validator is missing, the validator test is skipped, and with it every check of the
    glTF axes: a mirrored axis (meshes inside out, anterior behind), RAS exported as if it were LPS, sRGB colours
    taken as linear, and a JSON chunk padded to no multiple of 4 (a file viewers refuse) all passed."""
    from SegmentationMachineLib.mesh.gltf import write_glb

    # A tetrahedron in LPS mm, wound counter-clockwise seen from outside, and a vertex no triangle uses.
    lps = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10], [50, 50, 50]])
    triangles = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    # glTF x = patient left, y = superior, z = anterior (= -posterior), in metres.
    expected = np.array([[0.0, 0, 0], [0.01, 0, 0], [0, 0, -0.01], [0, 0.01, 0], [0.05, 0.05, -0.05]])
    for coordinates, points in (("LPS", lps), ("RAS", lps * [-1, -1, 1])):
        path = tmp_path / f"{coordinates}.glb"
        write_glb(path, [("Tetra", (0.5, 0.02, 1.0), points, triangles)], coordinates)
        document, binary = glb_document(path)
        primitive = document["meshes"][0]["primitives"][0]

        def read(accessor, dtype, width):
            accessor = document["accessors"][accessor]
            offset = document["bufferViews"][accessor["bufferView"]]["byteOffset"]
            return np.frombuffer(binary, dtype, accessor["count"] * width, offset).reshape(-1, width)

        assert np.allclose(read(primitive["attributes"]["POSITION"], "<f4", 3), expected, atol=1e-7), coordinates
        assert read(primitive["indices"], "<u4", 1).reshape(-1, 3).tolist() == triangles.tolist()
        normals = read(primitive["attributes"]["NORMAL"], "<f4", 3)
        assert np.allclose(normals[3], [0, 1, 0], atol=1e-6)  # the top vertex: superior, out of the tetrahedron
        assert np.allclose(normals[4], [0, 1, 0])  # unused: +Y, a unit vector all the same
        assert document["materials"][0]["pbrMetallicRoughness"]["baseColorFactor"] == pytest.approx(
            [((0.5 + 0.055) / 1.055) ** 2.4, 0.02 / 12.92, 1.0, 1.0])  # sRGB 0.5 is linear 0.214
    for name in ("a", "ab", "abc", "abcd"):  # JSON chunks of four lengths in a row: each residue modulo 4
        path = tmp_path / f"{name}.glb"
        write_glb(path, [(name, (1.0, 1.0, 1.0), lps, triangles)])
        data = path.read_bytes()
        json_length = int.from_bytes(data[12:16], "little")
        assert json_length % 4 == 0 and data[20 + json_length - 1:20 + json_length] in (b" ", b"}"), name
        assert int.from_bytes(data[8:12], "little") == len(data) and len(data) % 4 == 0, name


def outward_normals(points, triangles) -> np.ndarray:
    """VTK's point normals of a closed surface, turned to point outward whatever its triangles' winding."""
    polydata = vtk.vtkPolyData()
    polydata.SetPoints(vtk.vtkPoints())
    polydata.GetPoints().SetData(numpy_support.numpy_to_vtk(points.astype(float), deep=True))
    cells = vtk.vtkCellArray()
    cells.SetData(numpy_support.numpy_to_vtkIdTypeArray(np.arange(0, 3 * len(triangles) + 1, 3), deep=True),
                  numpy_support.numpy_to_vtkIdTypeArray(triangles.astype(np.int64).ravel(), deep=True))
    polydata.SetPolys(cells)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(polydata)
    normals.AutoOrientNormalsOn()
    normals.SplittingOff()  # one normal per point, in the points' order
    normals.Update()
    return numpy_support.vtk_to_numpy(normals.GetOutput().GetPointData().GetNormals())


def stl_points(path):
    reader = vtk.vtkSTLReader()
    reader.SetFileName(str(path))
    reader.Update()
    return numpy_support.vtk_to_numpy(reader.GetOutput().GetPoints().GetData()).astype(float)


def test_3mf_is_one_object_with_a_named_coloured_part_per_segment_where_the_stls_lie(ctx, shared_data, tmp_path):
    """What makes OrcaSlicer, Bambu Studio (bbs_3mf.cpp) load one object with a part per segment, relative
    positions kept and no "Multi-part object detected" question: one build item, an assembly object whose
    components (identity transforms) are the segments' mesh objects, and the parts' names in
    Metadata/model_settings.config; read by the 3MF Consortium's lib3mf in strict mode."""
    lib3mf = pytest.importorskip("lib3mf", reason="pip install lib3mf (the test extras include it)")
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    node = apply_preset(ctx, volume, "bone")
    apply_preset(ctx, volume, "skin", node)
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("stl", "3mf")))
    path = result.folder / "segments.3mf"
    model = lib3mf.get_wrapper().CreateModel()
    reader = model.QueryReader("3mf")
    reader.SetStrictModeActive(True)
    reader.ReadFromFile(str(path))
    assert reader.GetWarningCount() == 0
    assert model.GetUnit() == lib3mf.ModelUnit.MilliMeter
    items = model.GetBuildItems()
    assert items.Count() == 1 and items.MoveNext()
    item = items.GetCurrent()
    assert not item.HasObjectTransform()
    assembly = model.GetComponentsObjectByID(item.GetObjectResourceID())
    assert assembly.GetName() == result.report["segmentation"] == node.GetName()  # the object's name in the slicer
    assert assembly.GetComponentCount() == len(result.report["meshes"]) == 2
    identity = np.eye(4)[:, :3]
    parts = {}
    for index, entry in enumerate(result.report["meshes"]):
        component = assembly.GetComponent(index)
        transform = np.array(component.GetTransform().Fields)
        assert not component.HasTransform() and np.array_equal(transform, identity)
        mesh = model.GetMeshObjectByID(component.GetObjectResourceID())
        parts[str(component.GetObjectResourceID())] = entry["name"]
        assert mesh.GetName() == entry["name"] and mesh.GetTriangleCount() == entry["triangles"]
        assert mesh.IsManifoldAndOriented()
        group_id, property_id, has_property = mesh.GetObjectLevelProperty()
        materials = model.GetBaseMaterialGroupByID(group_id)
        color = materials.GetDisplayColor(property_id)
        assert has_property and materials.GetName(property_id) == entry["name"]
        assert np.allclose([color.Red, color.Green, color.Blue], np.array(entry["color"]) * 255, atol=0.5)
        vertices = np.array([v.Coordinates[0:3] for v in mesh.GetVertices()])
        stl = stl_points(result.folder / entry["stl"])  # the very place of every segment, not only relative
        assert np.allclose([vertices.min(0), vertices.max(0)], [stl.min(0), stl.max(0)], atol=1e-4)
        distinct = [np.sort(np.unique(v, axis=0), axis=0) for v in (vertices, stl)]
        assert np.allclose(*distinct, atol=1e-4)
    # OrcaSlicer/Bambu Studio name parts only from their own file: the object's id and its parts' ids and names
    with zipfile.ZipFile(path) as package:
        config = ElementTree.fromstring(package.read("Metadata/model_settings.config"))
    (settings,) = config.findall("object")
    assert settings.get("id") == str(item.GetObjectResourceID())
    assert settings.find("metadata[@key='name']").get("value") == node.GetName()
    names = {part.get("id"): part.find("metadata[@key='name']").get("value") for part in settings.findall("part")}
    assert names == parts
    assert {part.get("subtype") for part in settings.findall("part")} == {"normal_part"}


@pytest.mark.skipif(shutil.which("prusa-slicer") is None, reason="apt-get install prusa-slicer (Debian)")
def test_a_real_slicer_reads_the_3mf_with_every_segment_where_its_stl_lies(ctx, shared_data, tmp_path):
    """PrusaSlicer's libslic3r (the code OrcaSlicer's grew from) loads the 3MF: a manifold object per part
    (PrusaSlicer makes objects of components), each at its STL's coordinates, not moved."""
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    node = apply_preset(ctx, volume, "bone")
    apply_preset(ctx, volume, "skin", node)
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("stl", "3mf")))
    info = subprocess.run(["prusa-slicer", "--info", "segments.3mf"], cwd=result.folder, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert info.returncode == 0, info.stderr
    objects = [dict(line.split(" = ") for line in block.splitlines() if " = " in line)
               for block in info.stdout.split("[segments.3mf]")[1:]]
    assert len(objects) == 2 and all(o["manifold"].strip() == "yes" for o in objects)
    read = sorted([float(o[f"{end}_{axis}"]) for end in ("min", "max") for axis in "xyz"] for o in objects)
    stls = sorted([*points.min(0), *points.max(0)]
                  for points in (stl_points(result.folder / e["stl"]) for e in result.report["meshes"]))
    assert np.allclose(read, stls, atol=1e-3)
