"""A series in a transfer syntax Slicer 5.10 cannot decode (HTJ2K: its GDCM is 3.0.24) is named as such by the scan,
`model` and the inbox, instead of 'check that the files are complete'; listen asks a sender for a syntax Slicer
decodes where the sender offers one; syntaxes the table says Slicer decodes load with Slicer's real reader
(slicer-core's ITK 5.4 with the same GDCM)."""

import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from conftest import JPEG2000_SERIES, UNCOMPRESSED_SERIES
from orthanc_server import copies_in_a_new_study, free_port
from SegmentationMachineLib.cli import main as cli
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.dicom.slices import read_slice
from SegmentationMachineLib.dicom.transfer_syntaxes import DECODABLE
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.inbox.watcher import Inbox, InboxOptions
from SegmentationMachineLib.pacs.dicomnode import DicomNode, NodeOptions

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
REASON = (f"encoded as HTJ2K lossless ({HTJ2K_LOSSLESS}), which Slicer 5.10 cannot decode: have the series sent "
          "uncompressed (explicit VR little endian) or as JPEG 2000")


@pytest.fixture
def htj2k_series(shared_data, tmp_path):
    """The real JPEG 2000 CT series, its files labelled HTJ2K (as a PACS that stores HTJ2K sends it)."""
    folder = tmp_path / "htj2k"
    folder.mkdir()
    return folder, copies_in_a_new_study(folder, generate_uid(), 1, JPEG2000_SERIES, HTJ2K_LOSSLESS)


def test_slicers_reader_cannot_decode_htj2k_and_the_scan_says_so(htj2k_series, ctx):
    folder, paths = htj2k_series
    # The fact the table rests on: Slicer's own reader (GDCM 3.0.24) gives no image for these files.
    node = ctx.volumes_logic.AddArchetypeVolume(str(paths[0]), "htj2k", 0)
    assert node is None or node.GetImageData() is None
    assert read_slice(paths[0]) == (None, REASON)


def test_model_names_the_encoding_in_one_sentence(htj2k_series, tmp_path, capsys):
    folder, paths = htj2k_series
    status = cli.main(["model", str(folder), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith(f"No series in {folder} can be loaded: 20 image file(s), the first {paths[0].name}, "
                                f"are {REASON}.")


def test_the_inbox_gives_each_file_that_reason(htj2k_series, tmp_path):
    folder, paths = htj2k_series
    inbox = Inbox(InboxOptions(folder=folder, state_folder=tmp_path / "state", settle_seconds=0.3, hold_seconds=1))
    inbox.start()
    try:
        deadline = time.monotonic() + 30
        while len(inbox.bad_files) < len(paths) and time.monotonic() < deadline:
            assert inbox.poll() == []  # nothing delivered to fail in Slicer's reader
            time.sleep(0.1)
    finally:
        inbox.stop()
    assert inbox.bad_files == {path: REASON for path in paths}


@pytest.fixture
def node(tmp_path):
    """The node `listen` runs, taking what the AE title PACS sends."""
    node = DicomNode(NodeOptions("SEGMACHINE", free_port(), ("PACS",), "127.0.0.1", min_free_mb=0),
                     folder=tmp_path / "received", staging=tmp_path / "receiving")
    node.start()
    yield node
    node.stop()


def associated(node, *offers):
    """A pynetdicom sender's association with node, offering CT Image Storage in each syntax list of offers."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    sender = AE(ae_title="PACS")
    for syntaxes in offers:
        sender.add_requested_context(CTImageStorage, syntaxes)
    association = sender.associate("127.0.0.1", node.options.port, ae_title="SEGMACHINE")
    assert association.is_established
    return association


def test_listen_takes_a_syntax_slicer_decodes_where_the_sender_offers_one(node):
    association = associated(node, [HTJ2K_LOSSLESS, RLELossless], [HTJ2K_LOSSLESS])
    try:  # where it may transcode (to RLE) it is asked to; where it sends only as stored, that is taken
        assert [context.transfer_syntax[0] for context in association.accepted_contexts] == [RLELossless,
                                                                                              HTJ2K_LOSSLESS]
    finally:
        association.release()


def test_listen_stores_htj2k_sent_as_stored_and_says_why_it_cannot_be_loaded(node, htj2k_series):
    if pydicom.__version__.startswith("2."):
        pytest.skip("pydicom 2.4 (Slicer's) knows no HTJ2K: pynetdicom 2.1 can neither send nor decode it")
    folder, paths = htj2k_series
    association = associated(node, [HTJ2K_LOSSLESS])
    try:
        assert association.send_c_store(paths[0]).Status == 0  # the file's bytes as they are
    finally:
        association.release()
    (received,) = node.folder.rglob("*.dcm")
    assert read_slice(received) == (None, REASON)  # what the inbox of listen says of it


def _written_as(folder, syntax) -> list:
    """The uncompressed real series rewritten in syntax by pydicom."""
    folder.mkdir()
    paths = []
    for source in sorted(UNCOMPRESSED_SERIES.glob("*.dcm")):
        dataset = pydicom.dcmread(source)
        if syntax == RLELossless:
            dataset.compress(RLELossless)
        else:
            dataset.file_meta.TransferSyntaxUID = syntax
            if pydicom.__version__.startswith("2."):  # pydicom 2.4 (Slicer's) writes as these say, not as the syntax
                dataset.is_implicit_VR, dataset.is_little_endian = syntax == ImplicitVRLittleEndian, True
        paths.append(folder / source.name)
        dataset.save_as(paths[-1])
    return paths


@pytest.mark.parametrize("syntax", [RLELossless, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_syntax_the_table_says_slicer_decodes_loads_with_the_same_voxels(shared_data, ctx, tmp_path, syntax):
    assert syntax in DECODABLE
    paths = _written_as(tmp_path / "written", syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    written = arrays.volume_array(load_input(ctx, tmp_path / "written").node)
    original = arrays.volume_array(load_input(ctx, UNCOMPRESSED_SERIES).node)
    assert np.array_equal(written, original)


def test_files_without_a_part_10_header_load_as_slicers_reader_reads_them(shared_data, ctx, tmp_path):
    """Old PACS exports write the bare dataset (no preamble, no DICM, no file meta, implicit VR little endian).
    Slicer's reader loads them; the scan refused them as 'malformed image attributes' (no TransferSyntaxUID)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    for folder, empty_start in (("bare", False), ("bare-empty-start", True)):
        (tmp_path / folder).mkdir()
        for source in sorted(UNCOMPRESSED_SERIES.iterdir()):
            dataset = pydicom.dcmread(source)
            del dataset.file_meta
            if not empty_start:  # these files start with an empty SpecificCharacterSet, which GDCM cannot take
                del dataset.SpecificCharacterSet
            written = DicomBytesIO()
            written.is_little_endian, written.is_implicit_VR = True, True
            write_dataset(written, dataset)
            (tmp_path / folder / source.stem).write_bytes(written.getvalue())
    bare = arrays.volume_array(load_input(ctx, tmp_path / "bare").node)
    assert np.array_equal(bare, arrays.volume_array(load_input(ctx, UNCOMPRESSED_SERIES).node))
    item, reason = read_slice(tmp_path / "bare-empty-start" / "01")  # said as what it is, not 'check the files'
    assert item is None and reason.startswith("DICOM without its file header, starting with an empty attribute")


def test_a_file_in_ges_private_syntax_is_not_called_malformed(shared_data, tmp_path):
    """pydicom cannot say whether a private syntax is compressed (it raised 'UID is not a transfer syntax')."""
    (path,) = _written_as(tmp_path / "ge", ImplicitVRLittleEndian)[:1]
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = "1.2.840.113619.5.2"  # its header is implicit VR little endian
    dataset.save_as(path)
    item, reason = read_slice(path)
    assert item is not None, reason
