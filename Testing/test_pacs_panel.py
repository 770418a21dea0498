"""The module's PACS parts, Qt-free, against real components: Send to PACS stores a segmentation made with real MRML on
a real CT series in a real Orthanc (DICOMweb, basic authentication) with credentials saved in the secret store; the
Inbox section points at what `listen` received, and says each duplicate drop once."""

import io
import logging
import shutil
import time

import numpy as np
import pydicom
import pytest

from conftest import UNCOMPRESSED_SERIES
from orthanc_server import PASSWORD, USER, dropping_seg, free_port, serving
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.credentials import SecretStore
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.panels.inbox import InboxPanel
from SegmentationMachineLib.panels.pacs import PacsPanel
from SegmentationMachineLib.segment.presets import add_segment_from_mask

STUDY = "1.2.392.200103.20080913.113635.0.2009.6.22.21.43.10.22941.1"  # of dcmqi's ct-3slice
CT_SERIES = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
LOGGERS = ("", "dicomweb_client", "requests", "urllib3", "segmentation-machine")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("orthanc"), lambda: sorted(UNCOMPRESSED_SERIES.glob("*.dcm")))


@pytest.fixture
def full_log(caplog):
    """Everything the library and the HTTP stack log, down to DEBUG, from every thread."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def two_segments_on_the_ct(ctx):
    """A segmentation made in the scene on the real DICOM series: 'Bone' by threshold, 'Marker' a box."""
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    hu, ijk_to_ras = arrays.volume_array(volume), arrays.ijk_to_ras(volume)
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT bones")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    add_segment_from_mask(node, hu > 300, ijk_to_ras, "Bone", (0.95, 0.84, 0.57))
    box = np.zeros(hu.shape, bool)
    box[1:3, 200:240, 200:260] = True
    add_segment_from_mask(node, box, ijk_to_ras, "Marker", (0.2, 0.6, 0.9))
    return node


def panel_for(tmp_path, server: str) -> PacsPanel:
    """The panel with its own secret store (no keychain), an environment without SM_DICOMWEB_*, and a folder for
    a SEG that was not stored."""
    return PacsPanel(server=server, store=SecretStore(tmp_path / "secrets", use_keychain=False), environ={},
                     timeout=(5, 30), unsent_folder=tmp_path / "unsent")


def kept_seg(tmp_path):
    """The one SEG the panel kept in its unsent_folder, as CT bones_seg-not-stored_TIME/segmentation.dcm."""
    (path,) = (tmp_path / "unsent").glob("CT_bones_seg-not-stored_*/segmentation.dcm")
    return path


def send(panel: PacsPanel, node):
    panel.start(node)
    assert panel.task is not None, panel.status
    assert not panel.can_send()  # one send at a time: a second press replaced the running one
    assert panel.task.wait(120)
    return panel.finish()


def test_send_stores_the_segmentation_as_a_seg_in_its_study(orthanc, ctx, tmp_path, private_tmp, full_log):
    highdicom = pytest.importorskip("highdicom")
    node = two_segments_on_the_ct(ctx)
    panel = panel_for(tmp_path, orthanc.dicomweb_url)  # typed as a browser shows it: no dicomweb+
    assert panel.can_send() and not panel_for(tmp_path, " ").can_send()
    panel.start(None)
    assert panel.task is None and panel.status == "Choose the segmentation to send (Segmentation, above), then Send to PACS."
    assert panel.save_credentials(user=USER, password=PASSWORD)
    assert panel.status == f"Saved the credentials for {orthanc.dicomweb_url} in {tmp_path / 'secrets'} (readable only by you)."
    stored = send(panel, node)
    assert panel.status == f"Sent 'CT bones' (2 segments) to {orthanc.dicomweb_url} as a DICOM SEG."
    # QIDO-RS: the study now holds a SEG series, the one sent, that refers to the CT series it was made on.
    found = orthanc.get(f"/dicom-web/studies/{STUDY}/series?Modality=SEG").json()
    assert [series["0020000E"]["Value"][0] for series in found] == [stored.SeriesInstanceUID]
    (stored_file,) = orthanc.instance_files(stored.SeriesInstanceUID)
    seg = highdicom.seg.segread(io.BytesIO(stored_file))
    assert seg.StudyInstanceUID == STUDY and seg.Modality == "SEG"
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Bone", "Marker"]
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [CT_SERIES]
    assert not any(private_tmp.iterdir()), "the SEG written for the send was left on disk"
    assert f'"POST /dicom-web/studies/{STUDY} HTTP/1.1" 200' in full_log.text  # the send was logged...
    assert PASSWORD not in full_log.text + panel.status  # ...the password nowhere


def test_wrong_credentials_are_one_sentence_that_never_shows_them(orthanc, ctx, tmp_path, full_log):
    pytest.importorskip("highdicom")
    panel = panel_for(tmp_path, orthanc.dicomweb_url)
    assert panel.save_credentials(user=USER, password="wrong-Password-91f3")
    seg_series = orthanc.get(f"/dicom-web/studies/{STUDY}/series?Modality=SEG").content
    assert send(panel, two_segments_on_the_ct(ctx)) is None
    assert panel.status == (f"The DICOMweb server {orthanc.dicomweb_url} refused access (HTTP 401): save a token, or "
                            "a user name and password, that it accepts (Save credentials); the DICOM SEG stays in "
                            f"{kept_seg(tmp_path)}.")
    assert "wrong-Password-91f3" not in full_log.text and "Traceback" not in full_log.text
    assert orthanc.get(f"/dicom-web/studies/{STUDY}/series?Modality=SEG").content == seg_series  # nothing stored


def test_an_unreachable_server_is_one_sentence(ctx, shared_data, tmp_path):
    pytest.importorskip("highdicom")
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    panel = panel_for(tmp_path, f"dicomweb+{url}")  # the CLI's spelling works too
    node = two_segments_on_the_ct(ctx)
    node.GetSegmentation().RemoveSegment(node.GetSegmentation().GetSegmentIdBySegmentName("Marker"))
    panel.start(node)
    assert panel.status == f"Sending 'CT bones' (1 segment) to {url} as a DICOM SEG..."
    assert panel.task.wait(120) and panel.finish() is None
    assert panel.status == (f"Cannot reach the DICOMweb server {url} (connection refused): check the address and "
                            f"that the server is running; the DICOM SEG stays in {kept_seg(tmp_path)}.")
    assert panel.task is None and panel.can_send()  # ready to try again


def test_a_store_that_could_not_be_confirmed_says_so_after_sent(orthanc, ctx, tmp_path, monkeypatch):
    """A push-only account may store but not search (QIDO-RS 403, as test_dicomweb.py has it): the status said "Sent"
    alone, and the user never learnt to look for it in the PACS."""
    pytest.importorskip("highdicom")
    import requests
    from dicomweb_client.api import DICOMwebClient

    def refused(*args, **kwargs):
        answer = requests.Response()
        answer.status_code, answer.url = 403, orthanc.dicomweb_url
        raise requests.HTTPError("403 Client Error: Forbidden", response=answer)

    monkeypatch.setattr(DICOMwebClient, "search_for_instances", refused)
    panel = panel_for(tmp_path, orthanc.dicomweb_url)
    assert panel.save_credentials(user=USER, password=PASSWORD)
    assert send(panel, two_segments_on_the_ct(ctx)) is not None
    assert panel.status == (f"Sent 'CT bones' (2 segments) to {orthanc.dicomweb_url} as a DICOM SEG. The DICOMweb "
                            f"server {orthanc.dicomweb_url} stored segmentation.dcm, but whether it kept it could not "
                            "be checked (HTTP 403 to a search for it): look for it in the PACS.")


@pytest.fixture(scope="module")
def dropping_orthanc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dropping")
    yield from serving(folder, lambda: sorted(UNCOMPRESSED_SERIES.glob("*.dcm")), dropping_seg(folder))


def test_a_seg_the_pacs_does_not_keep_is_not_said_sent_and_stays_on_disk(dropping_orthanc, ctx, tmp_path, private_tmp):
    highdicom = pytest.importorskip("highdicom")
    url = dropping_orthanc.dicomweb_url
    panel = panel_for(tmp_path, url)
    assert panel.save_credentials(user=USER, password=PASSWORD)
    assert send(panel, two_segments_on_the_ct(ctx)) is None
    kept = kept_seg(tmp_path)
    assert panel.status == (f"The DICOMweb server {url} accepted segmentation.dcm but did not keep it (it is not in "
                            f"study {STUDY} afterwards): ask its administrator whether it filters DICOM SEG objects; "
                            f"the DICOM SEG stays in {kept}.")
    seg = highdicom.seg.segread(kept)  # the work, whole
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Bone", "Marker"] and seg.StudyInstanceUID == STUDY
    assert not any(private_tmp.iterdir())
    assert dropping_orthanc.get(f"/dicom-web/studies/{STUDY}/series?Modality=SEG").json() == []


@pytest.mark.parametrize("address, sentence", [
    ("pacs.example.org/dicom-web", "'dicomweb+pacs.example.org/dicom-web' is not a DICOMweb address"),
    ("http://pacs.example.org/dicom-web", "would send patient data and credentials unencrypted: use dicomweb+https"),
    ("https://me:secret@pacs.example.org/dicom-web", "Credentials in a DICOMweb address would show"),
    ("https://pacs.example.org/dicom-web?access_token=secret", "The DICOMweb address has a query or fragment"),
])
def test_a_bad_address_is_one_sentence_before_anything_is_read_or_sent(ctx, tmp_path, address, sentence):
    panel = panel_for(tmp_path, address)
    panel.start(ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))
    assert panel.task is None and sentence in panel.status and "secret" not in panel.status
    assert not panel.save_credentials(token="a-token") and sentence in panel.status
    assert not (tmp_path / "secrets").exists()


def test_a_segmentation_whose_every_segment_is_empty_is_one_sentence_and_nothing_is_sent(ctx, tmp_path):
    """Without its check the panel read the SEG of nothing: a traceback on the main thread instead of a sentence."""
    pytest.importorskip("highdicom")
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT bones")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.GetSegmentation().AddEmptySegment("", "Bone")
    node.GetSegmentation().AddEmptySegment("", "Marker")
    panel = panel_for(tmp_path, "https://pacs.example.org/dicom-web")
    panel.start(node)
    assert panel.task is None and panel.status == "Every segment of 'CT bones' is empty: nothing to send."
    assert panel.can_send() and not (tmp_path / "unsent").exists()


def test_only_a_segmentation_made_on_a_dicom_series_can_be_sent(ctx, tmp_path):
    pytest.importorskip("highdicom")
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "not from DICOM")
    arrays.set_volume_array(volume, np.zeros((4, 8, 8), np.int16), np.eye(4))
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    add_segment_from_mask(node, np.ones((4, 8, 8), bool), np.eye(4), "Blob", (1, 0, 0))
    panel = panel_for(tmp_path, "https://pacs.example.org/dicom-web")
    panel.start(node)
    assert panel.task is None
    assert panel.status.startswith("DICOM SEG needs the DICOM series 'drawn' was made on, and it was not made on one")
    panel.start(node, seg_installed=False)  # the user declined highdicom's install: said, not silently nothing
    assert panel.task is None and panel.status.startswith("Not sent: DICOM SEG needs highdicom, which was not installed")


def test_credentials_are_saved_under_the_servers_names_and_never_shown(tmp_path):
    panel = panel_for(tmp_path, "https://pacs.example.org:8443/dicom-web")
    store, (token, user, password) = panel.store, ("dicomweb-token-pacs.example.org_8443",
                                                   "dicomweb-user-pacs.example.org_8443",
                                                   "dicomweb-password-pacs.example.org_8443")
    assert not panel.save_credentials(user="me") and panel.status == (
        "Give a token, or a user name and a password, then Save credentials.")
    assert panel.save_credentials(user=" me ", password="pw-Secret-1")
    assert (store.load(token), store.load(user), store.load(password)) == (None, "me", "pw-Secret-1")
    assert panel.save_credentials(token=" tok-Secret-2 ")  # a token replaces the user and password
    assert (store.load(token), store.load(user), store.load(password)) == ("tok-Secret-2", None, None)
    assert "Secret" not in panel.status and "pacs.example.org:8443" in panel.status
    panel.forget_credentials()
    assert panel.status == "Forgot the credentials for https://pacs.example.org:8443/dicom-web."
    assert not any((tmp_path / "secrets").iterdir())


def test_the_inbox_points_at_what_listen_received_and_says_what_is_not_a_listen_outbox(tmp_path):
    """The folders here are those listen makes (test_listen.py points the panel at a running listen's OUTBOX)."""
    outbox, state = tmp_path / "outbox", tmp_path / "state"
    (outbox / ".segmentation-machine" / "received").mkdir(parents=True)
    (state / "received").mkdir(parents=True)
    panel = InboxPanel(folder=tmp_path / "inbox")
    assert panel.point_at_received(outbox) and panel.folder == outbox / ".segmentation-machine" / "received"
    assert panel.point_at_received(state) and panel.folder == state / "received"  # listen --state STATE
    assert not panel.point_at_received(tmp_path)
    assert panel.folder == state / "received"  # unchanged
    assert panel.status == (f"{tmp_path} holds no .segmentation-machine/received folder, so it is not where "
                            "`segmentation-machine listen` puts what it receives: choose the folder listen was given "
                            "with --out (or --state).")


def tick_until(panel: InboxPanel, condition, seconds=60) -> list:
    delivered, deadline = [], time.monotonic() + seconds
    while not condition(delivered):
        assert time.monotonic() < deadline, panel.status
        delivered += panel.tick()
        time.sleep(0.05)
    return delivered


def test_a_duplicate_drop_is_said_once_and_the_inbox_list_is_emptied(shared_data, tmp_path):
    (tmp_path / "inbox").mkdir()
    panel = InboxPanel(folder=tmp_path / "inbox", settle_seconds=0.3, state_folder=tmp_path / "state")
    panel.start()
    try:
        shutil.copytree(UNCOMPRESSED_SERIES, tmp_path / "inbox" / "ct")
        [delivery] = tick_until(panel, lambda delivered: delivered)
        panel.loaded(delivery, True)
        shutil.copytree(UNCOMPRESSED_SERIES, tmp_path / "inbox" / "ct-again")
        assert tick_until(panel, lambda delivered: "already processed" in panel.status) == []
        assert panel.status == ("CT 'series 2': 3 file(s) already processed: the same files as an earlier delivery; "
                                "not loaded again.")
        assert panel.inbox.duplicates == []  # drained: it never grows with the drops
        panel.status = ""
        shutil.copytree(UNCOMPRESSED_SERIES, tmp_path / "inbox" / "ct-third")  # each drop is said
        assert tick_until(panel, lambda delivered: "already processed" in panel.status) == []
        assert panel.inbox.duplicates == [] and [row[2] for row in panel.rows()] == ["loaded"]
    finally:
        panel.stop()
    assert pydicom.dcmread(tmp_path / "inbox" / "ct-again" / "01.dcm").SeriesInstanceUID == CT_SERIES  # left as it was
