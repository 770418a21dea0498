"""`listen`: a DICOM node that a PACS pushes to, as real processes on loopback, with two independent senders
(dcmtk's storescu and pynetdicom): models exactly once, an allow-list, kill -9 mid-association, TLS, SEG sent back."""

import json
import logging
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage

from conftest import REPO, UNCOMPRESSED_SERIES
from certificates import self_signed
from nninteractive_server import free_port
from SegmentationMachineLib.cli.main import main
from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series

CLI = [sys.executable, "-m", "SegmentationMachineLib.cli"]
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
needs_dcmtk = pytest.mark.skipif(not shutil.which("storescu"),
                                 reason="dcmtk's storescu is not installed: apt-get install dcmtk")


def ct_files(shared_data) -> list:
    return sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))


class Listener:
    """`segmentation-machine listen` as a user starts it; its stdout and stderr go to files (appended on restart)."""

    def __init__(self, tmp_path, *extra, port=None):
        self.port, self.outbox = port or free_port(), tmp_path / "outbox"
        self.received = self.outbox / ".segmentation-machine" / "received"
        self.stdout, self.stderr = tmp_path / "listen.out", tmp_path / "listen.err"
        self.command = CLI + ["listen", "--out", str(self.outbox), "--host", "127.0.0.1", "--port", str(self.port),
                              "--allow", "PACS", "--allow", "OTHER", "--settle", "1", "--hold", "3", *extra]
        self.process, self.starts = None, 0

    def start(self):
        self.starts += 1
        with open(self.stdout, "a") as out, open(self.stderr, "a") as err:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO)
        self.wait_for(lambda: self.out().count("Listening as") == self.starts)
        return self

    def out(self) -> str:
        return self.stdout.read_text() if self.stdout.exists() else ""

    def err(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""

    def wait_for(self, condition, seconds=90):
        deadline = time.monotonic() + seconds
        while not condition():
            assert self.process.poll() is None, f"listen ended with {self.process.returncode}: {self.err()}"
            assert time.monotonic() < deadline, f"timed out; stdout: {self.out()}\nstderr: {self.err()}"
            time.sleep(0.2)

    def series(self) -> list:
        path = self.outbox / "status.json"
        return json.loads(path.read_text())["series"] if path.exists() else []

    def done(self) -> list:
        return [s for s in self.series() if s["state"] == "done"]

    def instances(self) -> list:
        return sorted(self.received.rglob("*.dcm"))

    def stop(self, signal_number=signal.SIGTERM) -> int:
        self.process.send_signal(signal_number)
        return self.process.wait(timeout=30)

    def kill(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def listener(tmp_path):
    started = []

    def start(*extra, port=None):
        started.append(Listener(tmp_path, *extra, port=port))
        return started[-1].start()

    yield start
    for item in started:
        item.kill()


def push(port, files, calling="PACS", tls=None) -> list:
    """C-STOREs files over one association as pynetdicom does: their statuses (None for one that got no
    answer), or None when the association was refused."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.dimse_timeout = ae.network_timeout = 10
    ae.acse_timeout = 5  # a refused TLS client waits this long with pynetdicom 2
    association = ae.associate("127.0.0.1", port, ae_title="SEGMACHINE", tls_args=tls)
    if not association.is_established:
        return None
    statuses = []
    for path in files:
        try:
            statuses.append(getattr(association.send_c_store(dcmread(path)), "Status", None))
        except (RuntimeError, OSError):  # the node went away
            statuses.append(None)
    association.release()
    return statuses


def as_new_series(files, folder) -> list:
    """The same real slices under new series and instance UIDs: another series with the scanner's headers."""
    from pydicom.uid import generate_uid

    folder.mkdir()
    series_uid, copies = generate_uid(), []
    for path in files:
        dataset = dcmread(path)
        dataset.SeriesInstanceUID, dataset.SeriesDescription = series_uid, "resent"
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(folder / path.name)
        dataset.save_as(copies[-1])
    return copies


def phantom_series(folder) -> list:
    return write_ct_series(folder, make_phantom(shape=(12, 64, 64)).hu, 1.5,
                           [(-47.25, -47.25, 2.0 * k) for k in range(12)], "small phantom")


@needs_dcmtk
def test_storescu_pushes_a_study_that_becomes_a_model_and_an_unlisted_ae_is_refused(listener, shared_data):
    node = listener("--format", "stl")
    assert subprocess.run(["echoscu", "-aet", "PACS", "-aec", "SEGMACHINE", "127.0.0.1", str(node.port)],
                          timeout=30).returncode == 0
    sent = subprocess.run(["storescu", "-aet", "PACS", "-aec", "SEGMACHINE", "127.0.0.1", str(node.port),
                           *map(str, ct_files(shared_data))], capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    node.wait_for(lambda: node.done())
    [series] = node.series()
    assert series["files"] == 3 and (Path(series["result"]) / "Bone.stl").stat().st_size > 0
    assert [dcmread(p).SOPInstanceUID for p in node.instances()] == sorted(dcmread(p).SOPInstanceUID
                                                                             for p in ct_files(shared_data))

    refused = subprocess.run(["storescu", "-aet", "INTRUDER", "-aec", "SEGMACHINE", "127.0.0.1", str(node.port),
                              str(phantom_series(node.outbox.parent / "phantom")[0])],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
    node.wait_for(lambda: "Refused an association from AE 'INTRUDER' at 127.0.0.1" in node.err())
    assert len(node.instances()) == 3
    assert node.stop() == 128 + signal.SIGTERM
    assert "Received 3 instance(s) from AE 'PACS' at 127.0.0.1." in node.err() and "Traceback" not in node.err()
    assert "Stopped; run the same command again" in node.out()


def test_pynetdicom_pushes_each_series_once_however_often_it_is_sent(listener, tmp_path, shared_data):
    node = listener("--format", "stl")
    phantom = phantom_series(tmp_path / "phantom")
    assert push(node.port, ct_files(shared_data)) == [0, 0, 0]
    assert push(node.port, phantom, calling="OTHER") == [0] * 12
    node.wait_for(lambda: len(node.done()) == 2)
    assert push(node.port, ct_files(shared_data) + phantom) == [0] * 15  # a PACS that sends again
    time.sleep(3)  # read, settled, and known: not modelled again
    assert node.out().count("processing") == 2 and len(node.series()) == 2
    assert sorted(s["name"] for s in node.done()) == ["CT 'series 2'", "CT 'small phantom'"]
    assert push(node.port, phantom[:1], calling="STRANGER") is None and len(node.instances()) == 15

    ae = AE(ae_title="PACS")  # Ctrl-C while a PACS is connected: the node ends cleanly, the association aborted
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", node.port, ae_title="SEGMACHINE")
    assert association.send_c_store(dcmread(phantom[0])).Status == 0
    assert node.stop(signal.SIGINT) == 128 + signal.SIGINT and "Traceback" not in node.err()
    association.abort()
    assert "Stopped; run the same command again" in node.out()


def test_a_pacs_pausing_within_an_association_has_its_series_modelled_once_and_whole(listener, tmp_path):
    node = listener("--format", "stl", "--settle", "3")  # a busy machine's hiccups stay well within it
    phantom = phantom_series(tmp_path / "phantom")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", node.port, ae_title="SEGMACHINE")
    assert [association.send_c_store(dcmread(p)).Status for p in phantom[:5]] == [0] * 5
    time.sleep(7)  # an archive fetching the rest: far longer than the settle time
    assert "processing" not in node.out() and [s["state"] for s in node.series()] in ([], ["waiting"])
    assert [m.name for m in node.received.rglob(".*")] == [".receiving"]
    assert [association.send_c_store(dcmread(p)).Status for p in phantom[5:]] == [0] * 7
    association.release()
    node.wait_for(lambda: node.done())
    [series] = node.series()
    assert series["files"] == 12 and node.out().count("processing") == 1
    assert not list(node.received.rglob(".receiving"))


def test_a_series_whose_association_is_released_well_after_its_last_instance_is_modelled(listener, tmp_path):
    """The mark's removal is the change that makes the series ready: it waited for an unrelated file before."""
    node = listener("--format", "stl", "--settle", "2")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", node.port, ae_title="SEGMACHINE")
    assert [association.send_c_store(dcmread(p)).Status for p in phantom_series(tmp_path / "phantom")] == [0] * 12
    time.sleep(5)  # the files have long settled; the open association holds them
    assert "processing" not in node.out()
    association.release()
    node.wait_for(lambda: node.done(), seconds=30)
    assert node.done()[0]["files"] == 12 and "looks incomplete" not in node.out()


def test_a_series_whose_sender_broke_off_is_modelled_marked_incomplete_until_sent_again(listener, tmp_path):
    """A killed storescu, a cut network: the slices that came may number 1 to 80 without a gap, and the series was
    modelled as whole. It is held for --hold, then modelled saying so; an instance stored again clears the mark."""
    node = listener("--format", "stl")
    phantom = phantom_series(tmp_path / "phantom")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", node.port, ae_title="SEGMACHINE")
    assert [association.send_c_store(dcmread(p)).Status for p in phantom] == [0] * 12
    association.abort()
    node.wait_for(lambda: node.done())
    [series] = node.series()
    assert "broke off the association" in series["reason"] and "looks incomplete" in node.out()
    assert "Received 12 instance(s) from AE 'PACS' at 127.0.0.1, which then broke off without a release" in node.err()
    assert len(list(node.received.rglob(".broken-off"))) == 1
    assert push(node.port, phantom) == [0] * 12  # the PACS sends it again, whole
    assert not list(node.received.rglob(".broken-off"))


def test_the_node_takes_explicit_vr_when_a_sender_offers_it_beside_implicit(tmp_path):
    """Stored as sent: implicit VR files would lose the value representations of private tags."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from SegmentationMachineLib.pacs.dicomnode import DicomNode, NodeOptions

    node = DicomNode(NodeOptions("SEGMACHINE", free_port(), ("PACS",), "127.0.0.1", min_free_mb=0),
                     tmp_path / "received", tmp_path / "receiving")
    node.start()
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        association = ae.associate("127.0.0.1", node.options.port, ae_title="SEGMACHINE")
        [context] = association.accepted_contexts
        association.release()
        assert context.transfer_syntax == [ExplicitVRLittleEndian]
    finally:
        node.stop()


@pytest.mark.parametrize("status, said", [(0x0000, ""), (0xA700, "did not store 01.dcm (status 0xA700)")])
def test_a_seg_the_destination_answers_with_a_failure_is_not_said_stored(status, said):
    """send_file's answer is what `--send-seg-to` says: a PACS out of resources had stored nothing."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from SegmentationMachineLib.pacs.dicomnode import send_file

    destination = AE(ae_title="DEST")
    destination.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])
    try:
        answer = send_file(UNCOMPRESSED_SERIES / "01.dcm", ("DEST", "127.0.0.1", port), "SEGMACHINE")
    finally:
        server.shutdown()
    assert answer == (f"DEST at 127.0.0.1:{port} {said}." if said else "")


def test_an_association_broken_by_a_malformed_message_leaves_no_mark_holding_its_series(tmp_path, caplog):
    """pynetdicom ends such an association without a release or abort event: its mark was touched for ever, and the
    series was never modelled until listen restarted. Its reactor thread's traceback is one sentence."""
    from SegmentationMachineLib.pacs.dicomnode import DicomNode, MARK, NodeOptions

    caplog.set_level(logging.INFO)
    node = DicomNode(NodeOptions("SEGMACHINE", free_port(), ("PACS",), "127.0.0.1", min_free_mb=0),
                     tmp_path / "received", tmp_path / "receiving")
    node.start()
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        association = ae.associate("127.0.0.1", node.options.port, ae_title="SEGMACHINE")
        assert association.send_c_store(dcmread(sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))[0])).Status == 0
        assert len(list(node.folder.rglob(MARK))) == 1
        pdv = bytes([1, 0x03]) + b"\xff" * 40  # presentation context 1, "last command fragment": not a command set
        association.dul.socket.socket.sendall(bytes([0x04, 0]) + struct.pack(">II", 4 + len(pdv), len(pdv)) + pdv)
        deadline = time.monotonic() + 20
        while list(node.folder.rglob(MARK)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list(node.folder.rglob(MARK)) and len(list(node.folder.rglob("*.dcm"))) == 1
        assert "An association ended: its sender sent a message that is not DICOM (AttributeError" in caplog.text
        while "Received 1 instance(s)" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Received 1 instance(s) from AE 'PACS'" in caplog.text  # its line, and nothing of it kept
        assert not node._received and not node._refused and not node._marked
        association.abort()
    finally:
        node.stop()


def test_kill_9_mid_association_keeps_every_acknowledged_instance_and_the_resent_series_completes(
        listener, shared_data):
    files = ct_files(shared_data)
    node = listener("--format", "stl", "--settle", "3")  # the resend comes well within it
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", node.port, ae_title="SEGMACHINE")
    assert [association.send_c_store(dcmread(p)).Status for p in files[:2]] == [0, 0]
    node.process.kill()  # between two instances of one association
    node.process.wait(timeout=30)
    try:  # the third is not acknowledged: the connection is gone
        assert getattr(association.send_c_store(dcmread(files[2])), "Status", None) is None
    except RuntimeError:  # pynetdicom noticed before sending
        pass
    association.abort()

    # Every acknowledged instance is in the inbox, whole, with the bytes as sent.
    stored = node.instances()
    assert sorted(dcmread(p).SOPInstanceUID for p in stored) == sorted(dcmread(p).SOPInstanceUID for p in files[:2])
    originals = {dcmread(p).SOPInstanceUID: dcmread(p).PixelData for p in files}
    assert all(dcmread(p).PixelData == originals[dcmread(p).SOPInstanceUID] for p in stored)
    # A kill during a write leaves a staging file, never a file in the inbox: it is swept on restart.
    staging = node.received.parent / "receiving"
    (staging / "tmpcut.partial").write_bytes(files[2].read_bytes()[:5000])
    assert node.series() == []

    node.start()
    assert not (staging / "tmpcut.partial").exists()
    assert push(node.port, files) == [0, 0, 0]  # the PACS resends what was not acknowledged
    node.wait_for(lambda: node.done())
    [series] = node.series()
    assert series["files"] == 3 and len(node.instances()) == 3
    assert len([p for p in node.outbox.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 1
    assert node.stop() == 128 + signal.SIGTERM


def test_tls_with_client_certificates_takes_a_tls_push_and_refuses_plain_or_unknown_clients(
        listener, tmp_path, shared_data):
    server_cert, server_key = self_signed(tmp_path, "node", "127.0.0.1")
    client_cert, client_key = self_signed(tmp_path, "pacs", "127.0.0.1")
    node = listener("--format", "stl", "--tls-cert", str(server_cert), "--tls-key", str(server_key),
                    "--tls-ca", str(client_cert))
    assert "(TLS)" in node.out()
    silent = socket.create_connection(("127.0.0.1", node.port))  # connects and says nothing: must not block others
    trusted = ssl.create_default_context(cafile=str(server_cert))
    trusted.load_cert_chain(client_cert, client_key)
    assert push(node.port, ct_files(shared_data), tls=(trusted, "127.0.0.1")) == [0, 0, 0]
    node.wait_for(lambda: node.done())
    silent.close()

    without_certificate = ssl.create_default_context(cafile=str(server_cert))
    assert push(node.port, ct_files(shared_data)[:1], tls=(without_certificate, "127.0.0.1")) is None
    assert push(node.port, ct_files(shared_data)[:1]) is None  # plain DICOM to a TLS port
    assert len(node.instances()) == 3 and len(node.series()) == 1
    assert node.stop() == 128 + signal.SIGTERM and "Traceback" not in node.err()


def test_the_dicom_seg_goes_back_to_the_named_ae_and_a_missing_ae_costs_one_sentence(listener, tmp_path, shared_data):
    pytest.importorskip("highdicom", reason="DICOM SEG needs highdicom (segmentation-machine[hospital])")
    received = []

    def store(event):
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append(dataset)
        return 0

    destination = AE(ae_title="DEST")
    destination.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        node = listener("--format", "stl,seg", "--send-seg-to", f"DEST@127.0.0.1:{port}")
        assert push(node.port, ct_files(shared_data)) == [0, 0, 0]
        node.wait_for(lambda: node.done() and received)
    finally:
        server.shutdown()
    [seg] = received
    assert seg.SOPClassUID == SEG_STORAGE and seg.file_meta.MediaStorageSOPClassUID == SEG_STORAGE
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dcmread(ct_files(shared_data)[0]).SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Bone"]

    assert push(node.port, as_new_series(ct_files(shared_data), tmp_path / "again")) == [0, 0, 0]  # DEST is gone
    node.wait_for(lambda: len(node.done()) == 2)
    assert node.err().count("The DICOM SEG was not sent: DEST at 127.0.0.1:") == 1
    assert "The models are delivered all the same." in node.err() and "Traceback" not in node.err()
    assert node.stop() == 128 + signal.SIGTERM


def test_a_tls_node_sends_the_dicom_seg_back_over_tls_showing_its_certificate(listener, tmp_path, shared_data):
    """The SEG (the patient's name, ID and birth date) went back in the clear from a node that took TLS only, and
    a PACS that takes TLS only never got it."""
    pytest.importorskip("highdicom", reason="DICOM SEG needs highdicom (segmentation-machine[hospital])")
    node_cert, node_key = self_signed(tmp_path, "node", "127.0.0.1")
    pacs_cert, pacs_key = self_signed(tmp_path, "pacs", "127.0.0.1")
    received = []
    pacs_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(node_cert))  # the node's, only
    pacs_side.verify_mode = ssl.CERT_REQUIRED
    pacs_side.load_cert_chain(pacs_cert, pacs_key)
    destination = AE(ae_title="DEST")
    destination.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False, ssl_context=pacs_side,
                                      evt_handlers=[(evt.EVT_C_STORE, lambda event: received.append(event) or 0)])
    try:
        node = listener("--format", "stl,seg", "--send-seg-to", f"DEST@127.0.0.1:{port}", "--tls-cert",
                        str(node_cert), "--tls-key", str(node_key), "--tls-ca", str(pacs_cert))
        sender = ssl.create_default_context(cafile=str(node_cert))
        sender.load_cert_chain(pacs_cert, pacs_key)
        assert push(node.port, ct_files(shared_data), tls=(sender, "127.0.0.1")) == [0, 0, 0]
        node.wait_for(lambda: node.done() and received)
    finally:
        server.shutdown()
    assert [event.dataset.SOPClassUID for event in received] == [SEG_STORAGE]
    assert "was not sent" not in node.err() and node.stop() == 128 + signal.SIGTERM


@pytest.mark.parametrize("options, sentence", [
    ([], "Name the PACS that may send with --allow"),
    (["--allow", "PACS", "--ae-title", "A_TITLE_LONGER_THAN_16"], "is not a DICOM AE title"),
    (["--allow", "BAD\\AE"], "is not a DICOM AE title"),
    (["--allow", "PACS", "--port", "70000"], "is not a TCP port"),
    (["--allow", "PACS", "--send-seg-to", "PACS:104"], "write it as AE@HOST:PORT"),
    (["--allow", "PACS", "--send-seg-to", "PACS@host:104"], "add seg to --format"),
    (["--allow", "PACS", "--tls-key", "key.pem"], "need --tls-cert"),
    (["--allow", "PACS", "--tls-cert", "missing.pem"], "Cannot use the TLS files missing.pem"),
    (["--allow", "PACS", "--keep-received", "-1"], "--keep-received -1 is not a number of days"),
    (["--allow", "PACS", "--min-free-mb", "-5"], "--min-free-mb -5 is not an amount of free space"),
])
def test_a_wrong_option_is_one_sentence_before_anything_listens(tmp_path, capsys, options, sentence):
    assert main(["listen", "--out", str(tmp_path / "out"), *options]) == 2
    err = capsys.readouterr().err
    assert sentence in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_port_in_use_is_one_sentence(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["listen", "--out", str(tmp_path / "out"), "--allow", "PACS", "--host", "127.0.0.1",
                     "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"Cannot listen on port {port} (Address already in use)" in err and len(err.strip().splitlines()) == 1


def test_the_modules_inbox_section_shows_what_listen_received(listener, tmp_path, shared_data):
    """In Slicer, the Inbox section pointed at OUTBOX/.segmentation-machine/received lists (and loads) the series
    a PACS pushed: it only reads that folder, with its own journal, beside listen's queue."""
    from SegmentationMachineLib.panels.inbox import InboxPanel

    node = listener("--format", "stl")
    assert push(node.port, ct_files(shared_data)) == [0, 0, 0]
    panel = InboxPanel(settle_seconds=0.5, state_folder=tmp_path / "module-state")
    assert panel.point_at_received(node.outbox) and panel.folder == node.received  # the section's one click
    panel.start()
    try:
        delivered, deadline = [], time.monotonic() + 60
        while not delivered and time.monotonic() < deadline:
            delivered += panel.tick()
            time.sleep(0.05)
        [delivery] = delivered
        assert delivery.series.name == "CT 'series 2'" and len(delivery.series.files) == 3
        panel.loaded(delivery, True)
        node.wait_for(lambda: node.done())  # listen's own queue models it all the same
    finally:
        panel.stop()
    assert len(node.instances()) == 3  # the section moved and removed nothing
