"""The DICOM node takes the SOP classes a real study carries that pynetdicom does not know, such as Siemens CSA
Non-Image (in most Siemens studies): refusing one failed a real Orthanc's whole push and stopped storescu at that file.
Real Orthanc, real dcmtk storescu, real node; another pynetdicom AE in the same process keeps its own rules."""

import shutil
import subprocess

import pytest
import requests
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from conftest import UNCOMPRESSED_SERIES
from orthanc_server import Orthanc, require_orthanc
from SegmentationMachineLib.pacs.dicomnode import DicomNode, NodeOptions
from test_listen import free_port, needs_dcmtk

SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
# storescu proposes a SOP class it does not know only from a profile (dcmtk 3.6.7 has no other way)
STORESCU_PROFILE = """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[Siemens]
PresentationContext1 = 1.3.12.2.1107.5.9.1\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
[[Profiles]]
[Siemens]
PresentationContexts = Siemens
"""


@pytest.fixture
def slices(shared_data) -> list:
    return sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))


@pytest.fixture
def csa_object(tmp_path, slices):
    """A non-image object of the study, as a Siemens scanner adds one: its own series, no pixels."""
    dataset = dcmread(slices[0])
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = SIEMENS_CSA_NON_IMAGE
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del dataset.PixelData
    dataset.save_as(tmp_path / "csa.dcm")
    return tmp_path / "csa.dcm"


@pytest.fixture
def node(tmp_path):
    node = DicomNode(NodeOptions("SEGMACHINE", free_port(), ("PACS", "ORTHANCTEST"), "127.0.0.1", min_free_mb=0),
                     folder=tmp_path / "received", staging=tmp_path / "receiving")
    node.start()
    yield node
    node.stop()


def received_classes(node) -> list:
    return sorted(str(dcmread(path, stop_before_pixels=True).SOPClassUID) for path in node.folder.rglob("*.dcm"))


@needs_dcmtk
def test_storescu_sends_the_csa_object_and_the_slices_after_it(tmp_path, node, slices, csa_object):
    profile = tmp_path / "storescu.cfg"
    profile.write_text(STORESCU_PROFILE)
    sent = subprocess.run(["storescu", "-xf", str(profile), "Siemens", "-aet", "PACS", "-aec", "SEGMACHINE",
                           "127.0.0.1", str(node.options.port), str(csa_object), *map(str, slices)],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert received_classes(node) == sorted([SIEMENS_CSA_NON_IMAGE] + [str(CTImageStorage)] * len(slices))


def test_orthanc_pushes_a_study_with_a_csa_object_whole(tmp_path, node, slices, csa_object):
    require_orthanc()
    orthanc = Orthanc(tmp_path / "orthanc")
    config = orthanc._config
    orthanc._config = lambda: {**config(), "DicomModalities": {"segm": ["SEGMACHINE", "127.0.0.1", node.options.port]}}
    orthanc.start()
    try:
        study = orthanc.upload(csa_object, *slices)[-1]["ParentStudy"]
        answer = requests.post(f"{orthanc.url}/modalities/segm/store", json={"Resources": [study], "Synchronous": True},
                               auth=orthanc.auth, timeout=60)
    finally:
        orthanc.stop()
    assert answer.status_code == 200, answer.text
    assert received_classes(node) == sorted([SIEMENS_CSA_NON_IMAGE] + [str(CTImageStorage)] * len(slices))


def test_another_scp_in_the_same_process_still_refuses_what_it_does_not_support(node, csa_object):
    """The node widens only its own associations (pynetdicom's global unrestricted switch would widen every AE's)."""
    other = AE(ae_title="OTHER")
    other.add_supported_context(CTImageStorage)
    port = free_port()
    server = other.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
    try:
        for title, target in (("SEGMACHINE", node.options.port), ("OTHER", port)):  # the node first: it registers
            sender = AE(ae_title="PACS")
            sender.add_requested_context(SIEMENS_CSA_NON_IMAGE)
            association = sender.associate("127.0.0.1", target, ae_title=title)
            accepted = [str(c.abstract_syntax) for c in association.accepted_contexts]
            association.release()
            assert accepted == ([SIEMENS_CSA_NON_IMAGE] if title == "SEGMACHINE" else []), title
    finally:
        server.shutdown()
    shutil.rmtree(node.folder, ignore_errors=True)
