"""`model dicomweb+http://...`: a series fetched from a real Orthanc (QIDO-RS, WADO-RS), the pipeline run on it,
and the DICOM SEG stored back (STOW-RS); credentials from the environment or the keychain, never shown."""

import base64
import io
import json
import logging
import re
import socket
import warnings
from http.server import BaseHTTPRequestHandler

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from certificates import self_signed
from loopback import LoopbackServer, QuietHandler
from conftest import DATA, JPEG2000_SERIES, UNCOMPRESSED_SERIES
from orthanc_server import PASSWORD, USER, copies_in_a_new_study, dropping_seg, free_port, serving

from SegmentationMachineLib.cli import main as cli
from SegmentationMachineLib.core.credentials import SecretStore
from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.pacs.dicomweb import (BearerAuth, DicomWeb, DicomWebServer, credentials, failure_reason,
                                                  PASSWORD_VARIABLE, TOKEN_VARIABLE, USER_VARIABLE)

LIVER_SEG = DATA / "dcmqi" / "liver.dcm"  # a SEG in the CT's study: the study holds one image series and a SEG
STUDY = "1.2.392.200103.20080913.113635.0.2009.6.22.21.43.10.22941.1"
CT_SERIES = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
TWO_SERIES_STUDY, JPEG2000_STUDY, HTJ2K_STUDY = generate_uid(), generate_uid(), generate_uid()
JPEG2000_LOSSLESS, HTJ2K_LOSSLESS, MPEG2 = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.100"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("orthanc"), lambda: [
        *sorted(UNCOMPRESSED_SERIES.glob("*.dcm")), LIVER_SEG,
        *copies_in_a_new_study(tmp_path_factory.mktemp("copies"), TWO_SERIES_STUDY, 2),
        # its files' own UIDs are blank (anonymised): Orthanc needs them
        *copies_in_a_new_study(tmp_path_factory.mktemp("j2k"), JPEG2000_STUDY, 1, JPEG2000_SERIES),
        *copies_in_a_new_study(tmp_path_factory.mktemp("htj2k"), HTJ2K_STUDY, 1, JPEG2000_SERIES, HTJ2K_LOSSLESS)])


@pytest.fixture(scope="module")
def dropping_orthanc(tmp_path_factory):
    """An Orthanc whose filter drops every DICOM SEG, yet answers the STOW-RS with success."""
    folder = tmp_path_factory.mktemp("dropping")
    yield from serving(folder, lambda: sorted(UNCOMPRESSED_SERIES.glob("*.dcm")), dropping_seg(folder))


@pytest.fixture
def logged_in(monkeypatch):
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    monkeypatch.setenv(USER_VARIABLE, USER)
    monkeypatch.setenv(PASSWORD_VARIABLE, PASSWORD)


def model(capsys, *args) -> tuple:
    """segmentation-machine model ARGS in this process: (exit status, stdout, stderr)."""
    status = cli.main(["model", *map(str, args), "--quiet"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_sentence(status, err) -> str:
    assert status == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_model_fetches_the_series_and_writes_meshes(orthanc, logged_in, private_tmp, tmp_path, capsys):
    status, out, err = model(capsys, f"dicomweb+{orthanc.dicomweb_url}", "--study", STUDY, "--series", CT_SERIES,
                             "--out", tmp_path / "out", "--format", "stl")
    assert status == 0, err
    assert f"Retrieved CT 'series 2', 3 instance(s), uid {CT_SERIES} from {orthanc.dicomweb_url}: 3 file(s)" in out
    assert "512x512x3 voxels" in out
    report = json.loads(next((tmp_path / "out").glob("*/report.json")).read_text())
    assert report["meshes"][0]["name"] == "Bone" and report["meshes"][0]["triangles"] > 1000
    assert not any(private_tmp.iterdir()), "the fetched series was left on disk"
    assert PASSWORD not in out + err


def test_a_jpeg2000_series_comes_as_stored_and_is_decoded_here(orthanc, tmp_path, ctx, debug_log):
    # Orthanc 1.10 cannot transcode JPEG 2000: asked for explicit little endian it answers HTTP 500. Slicer decodes
    # JPEG 2000: asked for as stored, and only as stored, it comes.
    server = DicomWebServer.parse(f"dicomweb+{orthanc.dicomweb_url}")
    web = DicomWeb(server, (USER, PASSWORD))
    paths = web.retrieve(JPEG2000_STUDY, web.choose_series(JPEG2000_STUDY), tmp_path)
    assert len(paths) == 20 and pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS
    assert load_input(ctx, tmp_path).node.GetImageData().GetDimensions() == (512, 512, 20)
    accepts = {accept for accept in re.findall(r"'Accept': '([^']*)'", debug_log.getvalue()) if "multipart" in accept}
    assert accepts == {'multipart/related; type="application/dicom"; transfer-syntax=*'}, accepts


def test_an_htj2k_series_the_server_does_not_transcode_is_one_sentence(orthanc, logged_in, private_tmp, tmp_path,
                                                                      capsys):
    status, out, err = model(capsys, f"dicomweb+{orthanc.dicomweb_url}", "--study", HTJ2K_STUDY,
                             "--out", tmp_path / "out")
    (series,) = [s["0020000E"]["Value"][0] for s in orthanc.get(f"/dicom-web/studies/{HTJ2K_STUDY}/series").json()]
    assert one_sentence(status, err).endswith(
        f"The DICOMweb server {orthanc.dicomweb_url} sent series {series} encoded as HTJ2K lossless "
        f"({HTJ2K_LOSSLESS}), which Slicer 5.10 cannot decode, and does not transcode it to explicit VR little endian when asked: ask its "
        "administrator for the series uncompressed or as JPEG 2000.")
    assert not (tmp_path / "out").exists() and not any(private_tmp.iterdir())  # nothing fetched is left


def test_a_study_of_two_image_series_needs_series_and_lists_them(orthanc, logged_in, tmp_path, capsys):
    status, out, err = model(capsys, f"dicomweb+{orthanc.dicomweb_url}", "--study", TWO_SERIES_STUDY,
                             "--out", tmp_path)
    line = one_sentence(status, err)
    assert f"Study {TWO_SERIES_STUDY} on {orthanc.dicomweb_url} has 2 image series: choose one with --series" in line
    assert "1. CT 'copy 1', 3 instance(s), uid " in line and "2. CT 'copy 2', 3 instance(s), uid " in line
    assert not any(tmp_path.iterdir())


def test_list_shows_the_studys_series(orthanc, logged_in, capsys):
    status, out, err = model(capsys, f"dicomweb+{orthanc.dicomweb_url}", "--study", STUDY, "--list")
    assert status == 0, err
    assert out.splitlines()[0] == f"1. CT 'series 2', 3 instance(s), uid {CT_SERIES}"
    assert "SEG 'Liver Segmentation', 1 instance(s)" in out


def test_a_wrong_password_is_one_sentence_and_never_shown(orthanc, monkeypatch, tmp_path, capsys):
    wrong = "Wrong-Password-9f3a"
    monkeypatch.setenv(USER_VARIABLE, USER)
    monkeypatch.setenv(PASSWORD_VARIABLE, wrong)
    log_file = tmp_path / "log.txt"
    status, out, err = model(capsys, f"dicomweb+{orthanc.dicomweb_url}", "--study", STUDY, "--out", tmp_path / "out",
                             "--log", log_file)
    line = one_sentence(status, err)
    assert f"The DICOMweb server {orthanc.dicomweb_url} refused access (HTTP 401)" in line
    assert wrong not in out + err + log_file.read_text()


def test_an_unknown_study_is_one_sentence(orthanc, logged_in, tmp_path, capsys):
    status, out, err = model(capsys, f"dicomweb+{orthanc.dicomweb_url}", "--study", "1.2.3.4", "--out", tmp_path)
    assert f"The DICOMweb server {orthanc.dicomweb_url} has no study 1.2.3.4" in one_sentence(status, err)


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")  # the real scan's patient name
def test_store_seg_puts_the_segmentation_into_the_study(orthanc, logged_in, tmp_path, capsys):
    highdicom = pytest.importorskip("highdicom")
    # No --series: the study's only image series (the other one is a SEG) is taken.
    status, out, err = model(capsys, f"dicomweb+{orthanc.dicomweb_url}", "--study", STUDY, "--store-seg",
                             "--out", tmp_path, "--format", "stl")
    assert status == 0, err
    stored = next(line for line in out.splitlines() if line.startswith("Stored the DICOM SEG"))
    assert stored.endswith(f"1 segment(s)) in study {STUDY} on {orthanc.dicomweb_url}")
    seg_series = stored.split("(series ")[1].split(",")[0]
    found = orthanc.get(f"/dicom-web/studies/{STUDY}/series?Modality=SEG").json()  # QIDO-RS
    assert seg_series in [series["0020000E"]["Value"][0] for series in found]
    (stored_file,) = orthanc.instance_files(seg_series)
    seg = highdicom.seg.segread(io.BytesIO(stored_file))
    assert seg.SeriesInstanceUID == seg_series and seg.StudyInstanceUID == STUDY
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Bone"]
    assert CT_SERIES in [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence]
    assert seg.SOPInstanceUID == pydicom.dcmread(next(tmp_path.glob("*/segmentation.dcm"))).SOPInstanceUID


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")  # the real scan's patient name
def test_a_seg_the_pacs_does_not_keep_is_never_said_stored(dropping_orthanc, logged_in, tmp_path, capsys):
    pytest.importorskip("highdicom")
    url = dropping_orthanc.dicomweb_url
    status, out, err = model(capsys, f"dicomweb+{url}", "--study", STUDY, "--store-seg", "--out", tmp_path,
                             "--format", "stl")
    line = one_sentence(status, err)
    (seg_file,) = tmp_path.glob("*/segmentation.dcm")
    assert line.endswith(f"The DICOMweb server {url} accepted segmentation.dcm but did not keep it (it is not in study "
                         f"{STUDY} afterwards): ask its administrator whether it filters DICOM SEG objects; the DICOM "
                         f"SEG stays in {seg_file}.")
    assert "Stored the DICOM SEG" not in out
    assert pydicom.dcmread(seg_file).Modality == "SEG"  # the user's work is there
    assert dropping_orthanc.get(f"/dicom-web/studies/{STUDY}/series?Modality=SEG").json() == []


@pytest.mark.parametrize("accept", ["application/dicom+json", "application/dicom+xml"])
def test_a_refused_store_says_the_servers_reason(orthanc, monkeypatch, accept):
    """Orthanc answers a SEG posted to another study than its own with HTTP 409 and FailedSOPSequence, reason 0x0110
    (and no Content-Type): the reason is said, not 'try again later'."""
    web = DicomWeb(DicomWebServer.parse(f"dicomweb+{orthanc.dicomweb_url}"), (USER, PASSWORD))
    web._session.headers["Accept"] = accept  # the answer's two encodings
    post = web._client.store_instances
    monkeypatch.setattr(web._client, "store_instances",
                        lambda datasets, study_instance_uid: post(datasets, study_instance_uid=TWO_SERIES_STUDY))
    with pytest.raises(UserError) as error:
        web.store(LIVER_SEG)
    assert str(error.value) == (f"The DICOMweb server {orthanc.dicomweb_url} refused the store of liver.dcm in study "
                                f"{STUDY} (HTTP 409, failure reason 0x0110: processing failure): ask its administrator "
                                "why it does not take it.")


def test_a_store_these_credentials_may_not_search_for_is_said_unconfirmed_not_failed(orthanc, monkeypatch):
    """A push-only account may store but not search (QIDO-RS 403): the SEG was stored, and that is not a failure."""
    import requests

    web = DicomWeb(DicomWebServer.parse(f"dicomweb+{orthanc.dicomweb_url}"), (USER, PASSWORD))

    def refused(*args, **kwargs):
        answer = requests.Response()
        answer.status_code, answer.url = 403, orthanc.dicomweb_url
        raise requests.HTTPError("403 Client Error: Forbidden", response=answer)

    monkeypatch.setattr(web._client, "search_for_instances", refused)
    stored = web.store(LIVER_SEG)
    assert stored.dataset.SOPInstanceUID == pydicom.dcmread(LIVER_SEG).SOPInstanceUID
    assert stored.unconfirmed == (f"The DICOMweb server {orthanc.dicomweb_url} stored liver.dcm, but whether it kept it "
                                  "could not be checked (HTTP 403 to a search for it): look for it in the PACS.")


@pytest.mark.parametrize("code, words", [(0x0122, "0x0122: it does not take this SOP class"),
                                         (0xA701, "0xA701: out of resources"), (0xC123, "0xC123: it cannot understand"),
                                         (0x0124, "0x0124: not authorized"), (0x9999, "0x9999: a reason the DICOM")])
def test_failure_reasons_are_said_in_words_with_their_code(code, words):
    assert failure_reason(code).startswith(f"failure reason {words}")


def test_credentials_come_from_the_keychain_when_the_environment_has_none(orthanc, tmp_path):
    server = DicomWebServer.parse(f"dicomweb+{orthanc.dicomweb_url}")
    store = SecretStore(tmp_path / "secrets", use_keychain=False)
    token_name, user_name, password_name = server.keychain_names()
    store.save(user_name, USER)
    store.save(password_name, PASSWORD)
    series = DicomWeb(server, credentials(server, environ={}, store=store)).series(STUDY)
    assert series[0].uid == CT_SERIES
    with pytest.raises(UserError, match="refused access"):  # the environment comes first
        DicomWeb(server, credentials(server, {USER_VARIABLE: USER, PASSWORD_VARIABLE: "x"}, store)).series(STUDY)
    store.save(token_name, "a-token")
    assert isinstance(credentials(server, {}, store), BearerAuth)


def test_a_user_without_password_is_one_sentence(tmp_path):
    server = DicomWebServer.parse("dicomweb+https://pacs.example.org/dicom-web")
    with pytest.raises(UserError, match=f"Give both {USER_VARIABLE} and {PASSWORD_VARIABLE}"):
        credentials(server, {USER_VARIABLE: "me"}, SecretStore(tmp_path, use_keychain=False))
    assert server.keychain_names()[0] == "dicomweb-token-pacs.example.org"


def test_an_unreachable_server_is_one_sentence_naming_it(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    status, out, err = model(capsys, f"dicomweb+{url}", "--study", STUDY, "--out", tmp_path)
    assert f"Cannot reach the DICOMweb server {url} (connection refused)" in one_sentence(status, err)


def test_a_server_that_never_answers_is_one_sentence_not_a_hang():
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        web = DicomWeb(DicomWebServer.parse(f"dicomweb+{url}"), timeout=(1, 0.5))
        sentence = f"Cannot reach the DICOMweb server {url} (no answer within 1 s)"
        with pytest.raises(UserError, match=re.escape(sentence)):
            web.series(STUDY)


class _ClosesItsFirstConnection(BaseHTTPRequestHandler):
    """A server that closes a kept-alive connection as a request arrives on it (Orthanc closes one idle for a second):
    the first request of all is dropped unanswered; then an empty study list."""

    protocol_version = "HTTP/1.1"
    requests = []

    def do_GET(self):
        self.requests.append(self.command)
        if len(self.requests) == 1:
            self.close_connection = True
            return
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_read_on_a_connection_the_server_just_closed_is_sent_again_on_a_new_one():
    """Once a flaky "Cannot reach" against a real Orthanc, between two polls for a stored SEG."""
    _ClosesItsFirstConnection.requests.clear()
    with LoopbackServer(_ClosesItsFirstConnection) as server:
        web = DicomWeb(DicomWebServer.parse(f"dicomweb+{server.url}/dicom-web"))
        with pytest.raises(UserError, match=f"has no study {STUDY}"):  # answered: an empty list
            web.series(STUDY)
    assert _ClosesItsFirstConnection.requests == ["GET", "GET"]


def test_a_certificate_this_computer_does_not_trust_is_said_with_the_cure(tmp_path):
    """A hospital PACS signed by the hospital's own CA (or a proxy that inspects TLS): the sentence says the
    certificate is not trusted and names REQUESTS_CA_BUNDLE, not 'check the address'."""
    with LoopbackServer(tls=self_signed(tmp_path, "hospital-pacs", "127.0.0.1")) as server:
        url = f"{server.url}/dicom-web"
        with pytest.raises(UserError) as error:
            DicomWeb(DicomWebServer.parse(f"dicomweb+{url}")).series(STUDY)
    assert str(error.value) == (f"The DICOMweb server {url} shows a certificate this computer does not trust "
                                "(self-signed certificate): set REQUESTS_CA_BUNDLE to your organisation's CA "
                                "certificates.")


@pytest.mark.parametrize("source, extra, sentence", [
    ("dicomweb+https://me:secret@pacs.example.org/dicom-web", ["--study", "1.2"], "Credentials in a DICOMweb address"),
    ("dicomweb+http://pacs.example.org/dicom-web", ["--study", "1.2"], "would send patient data and credentials"),
    ("dicomweb+https://pacs.example.org/dicom-web?token=abc", ["--study", "1.2"], "address has a query or fragment"),
    ("dicomweb+ftp://pacs.example.org/", ["--study", "1.2"], "is not a DICOMweb address"),
    ("dicomweb+https://pacs.example.org/dicom-web", [], "with --study StudyInstanceUID"),
    ("dicomweb+https://pacs.example.org/dicom-web", ["--study", "1.2/../../x"], "is not a StudyInstanceUID"),
    ("{tmp}", ["--study", "1.2"], "--study and --store-seg are for a DICOMweb input"),
    ("{tmp}", ["--store-seg"], "--study and --store-seg are for a DICOMweb input"),
])
def test_bad_addresses_and_options_are_one_sentence(tmp_path, capsys, source, extra, sentence):
    status, out, err = model(capsys, source.format(tmp=tmp_path), *extra, "--out", tmp_path)
    line = one_sentence(status, err)
    assert sentence in line and "secret" not in line and "abc" not in line


class _NotDicomWeb(BaseHTTPRequestHandler):
    """A web server that is no DICOMweb server; it keeps each request's Authorization header."""
    seen = []

    def do_GET(self):
        self.seen.append(self.headers.get("Authorization"))
        status = 401 if self.headers.get("Authorization", "").startswith("Bearer ") else 200
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><body>Welcome to the hospital intranet</body></html>")

    def log_message(self, *args):
        pass


@pytest.fixture
def web_page():
    _NotDicomWeb.seen.clear()
    with LoopbackServer(_NotDicomWeb) as server:
        yield server.url


class _SomeFailed(BaseHTTPRequestHandler):
    """A PACS answering a store with 202 Accepted and the instance in FailedSOPSequence (DICOM PS3.18 10.5.3: some
    instances failed), its DICOM JSON typed with a charset as many servers do."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xA700]}}]}})
        self.send_response(202)
        self.send_header("Content-Type", "application/dicom+json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_a_store_answered_202_with_the_seg_failed_says_why_and_is_not_stored():
    with LoopbackServer(_SomeFailed) as server:
        url = server.url
        web = DicomWeb(DicomWebServer.parse(f"dicomweb+{url}"), (USER, PASSWORD))
        with pytest.raises(UserError) as error:
            web.store(LIVER_SEG)
    assert str(error.value) == (f"The DICOMweb server {url} did not store liver.dcm (failure reason 0xA700: out of "
                                "resources): ask its administrator whether it accepts DICOM SEG objects.")


def test_a_web_page_is_not_taken_for_a_dicomweb_server(web_page, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    monkeypatch.delenv(USER_VARIABLE, raising=False)
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    monkeypatch.setattr(SecretStore, "load", lambda self, name: None)  # no credentials saved on this computer
    status, out, err = model(capsys, f"dicomweb+{web_page}/intranet", "--study", STUDY, "--out", tmp_path)
    assert f"{web_page}/intranet did not answer as a DICOMweb server" in one_sentence(status, err)


@pytest.fixture
def debug_log():
    """Everything dicomweb-client, requests and urllib3 log, down to DEBUG (the CLI resets the root logger)."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    loggers = [logging.getLogger(name) for name in ("dicomweb_client", "requests", "urllib3")]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False  # here only: the CLI's stderr stays one sentence
    yield text
    for logger, (level, propagate) in zip(loggers, saved):
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def test_a_bearer_token_is_sent_as_a_header_and_never_shown(web_page, monkeypatch, tmp_path, capsys, debug_log):
    token = "eyJ-test-token-5d1c"
    monkeypatch.setenv(TOKEN_VARIABLE, token)
    status, out, err = model(capsys, f"dicomweb+{web_page}/dicom-web", "--study", STUDY, "--out", tmp_path)
    assert "refused access (HTTP 401; an access token, e.g. from gcloud or az, expires after about an hour)" in \
        one_sentence(status, err)
    assert _NotDicomWeb.seen == [f"Bearer {token}"]
    assert '"GET /dicom-web/studies/' in debug_log.getvalue()  # the requests were logged...
    assert token not in out + err + debug_log.getvalue()  # ...and the token nowhere


class _CloudPacs(QuietHandler):
    """A PACS as Azure's DICOM service and dcm4chee answer (their sources and conformance statements): a search sends
    at most 200 series (100 unasked) whatever is asked, with no sign that it cut the list; a series is sent as stored
    where asked for "*" first, and refused (406) where another syntax comes first and it holds more than one instance.
    mode "partial": some instances are offline, and the series comes with 206 and a Warning (dcm4chee); "short": one
    instance fewer than its search says, with 200; "mpeg2": stored as MPEG-2 (which Slicer cannot decode), sent
    uncompressed only when asked for explicit little endian alone; "busy": stored as MPEG-2 too, and asked to transcode,
    too busy (503); "refuse": every retrieve answered 400."""

    mode = None
    seen = []  # (path, Accept, Host, Authorization) of each request
    OTHERS = [generate_uid() for _ in range(249)]  # SR series, listed before the CT

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Accept"), self.headers.get("Host"),
                          self.headers.get("Authorization")))
        path, _, query = self.path.partition("?")
        if path == f"/dicom-web/studies/{STUDY}/series":
            asked = dict(item.split("=", 1) for item in query.split("&") if "=" in item)
            offset, limit = int(asked.get("offset", 0)), min(int(asked.get("limit", 100)), 200)
            listing = [self._series(uid, "SR", 1) for uid in self.OTHERS] + [self._series(CT_SERIES, "CT", 3)]
            return self.reply(200, json.dumps(listing[offset:offset + limit]).encode(),
                              [("Content-Type", "application/dicom+json")])
        if path != f"/dicom-web/studies/{STUDY}/series/{CT_SERIES}":
            return self.reply(404, b"")
        accepted = self.headers.get("Accept", "").split(",")
        files = [path.read_bytes() for path in sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))]
        if self.mode == "refuse":
            return self.reply(400, b'{"message": "Bad request."}')
        if self.mode == "busy" and "transfer-syntax=*" not in accepted[0]:
            return self.reply(503, b'{"message": "Service unavailable."}')
        if self.mode != "mpeg2" and "transfer-syntax=*" not in accepted[0] and len(files) > 1:
            return self.reply(406, b'{"message": "Transcoding of multiple instances is not supported."}')
        if self.mode in ("mpeg2", "busy") and accepted[0].endswith("transfer-syntax=*"):  # as stored
            files = [_declared_as(data, MPEG2) for data in files]
        files = files[:2] if self.mode in ("partial", "short") else files
        boundary = "b0undary"
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                        for data in files) + f"--{boundary}--\r\n".encode()
        warning = [("Warning", '299 dcm4chee: "1 objects no longer accessible."')] if self.mode == "partial" else []
        self.reply(206 if self.mode == "partial" else 200, body,
                   [("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}'), *warning])

    @staticmethod
    def _series(uid, modality, instances) -> dict:
        return {"0020000E": {"vr": "UI", "Value": [uid]}, "00080060": {"vr": "CS", "Value": [modality]},
                "00201209": {"vr": "IS", "Value": [instances]}}


def _declared_as(data: bytes, transfer_syntax: str) -> bytes:
    """A file whose header names transfer_syntax, without its pixels (only the name is read before the refusal)."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    del dataset.PixelData
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    out = io.BytesIO()
    with warnings.catch_warnings():  # pydicom 3 calls these deprecated; 2.4 (Slicer's) needs them
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset.is_little_endian, dataset.is_implicit_VR = True, False
        dataset.save_as(out)
    return out.getvalue()


@pytest.fixture
def cloud_pacs():
    _CloudPacs.seen.clear()
    with LoopbackServer(_CloudPacs) as server:
        yield server
    _CloudPacs.mode = None


def test_a_cloud_pacs_lists_a_long_study_page_by_page_and_sends_the_series_as_stored(cloud_pacs, tmp_path):
    """Azure lists at most 200 series and sends no sign of the rest; asked for explicit little endian first, it refuses
    a series of more than one instance (406): both were failures of a study with more series than a page."""
    server = DicomWebServer.parse(f"dicomweb+{cloud_pacs.url}/dicom-web/")
    web = DicomWeb(server, credentials(server, {USER_VARIABLE: "rådgiver", PASSWORD_VARIABLE: "pässwörd€"}))
    assert len(web.series(STUDY)) == 250
    series = web.choose_series(STUDY)  # the only image series, the last listed
    assert series.uid == CT_SERIES and len(web.retrieve(STUDY, series, tmp_path)) == 3
    paths, accepts, hosts, authorizations = zip(*_CloudPacs.seen)
    assert accepts[-1] == 'multipart/related; type="application/dicom"; transfer-syntax=*'
    assert set(hosts) == {f"127.0.0.1:{cloud_pacs.port}"}  # dicomweb-client's own lacked the port
    # Basic authentication in UTF-8, as servers read it (requests alone sends Latin-1, and no €)
    assert set(authorizations) == {"Basic " + base64.b64encode("rådgiver:pässwörd€".encode()).decode()}


@pytest.mark.parametrize("mode, sentence", [
    ("partial", f'sent only part of series {CT_SERIES} (HTTP 206: 299 dcm4chee: "1 objects no longer accessible."): '
                "try again later, or ask its administrator to bring the series back from its archive."),
    ("short", f"sent 2 of the 3 instances of series {CT_SERIES}: try again later, or check the series in the PACS."),
    ("refuse", f"answered HTTP 400 to the request for series {CT_SERIES} of study {STUDY}: ask its administrator "
               "whether it offers this request."),
    # Busy when asked to transcode: said as such, not as a server that cannot transcode (ask for another encoding).
    ("busy", f"answered HTTP 503 to the request for series {CT_SERIES} of study {STUDY}: try again later or ask its "
             "administrator.")])
def test_a_series_the_pacs_sends_in_part_or_not_at_all_is_refused_saying_why(cloud_pacs, tmp_path, mode, sentence):
    _CloudPacs.mode = mode
    web = DicomWeb(DicomWebServer.parse(f"dicomweb+{cloud_pacs.url}/dicom-web"))
    with pytest.raises(UserError) as error:
        web.retrieve(STUDY, web.choose_series(STUDY), tmp_path)
    assert str(error.value) == f"The DICOMweb server {cloud_pacs.url}/dicom-web {sentence}"


def test_a_series_stored_in_an_encoding_slicer_cannot_decode_is_asked_for_again_transcoded(cloud_pacs, tmp_path):
    _CloudPacs.mode = "mpeg2"
    web = DicomWeb(DicomWebServer.parse(f"dicomweb+{cloud_pacs.url}/dicom-web"))
    paths = web.retrieve(STUDY, web.choose_series(STUDY), tmp_path)
    assert len(paths) == 3 and all(pydicom.dcmread(p).file_meta.TransferSyntaxUID != MPEG2 for p in paths)
    assert sorted(tmp_path.iterdir()) == paths  # the MPEG-2 file written first is gone
    assert [accept for _, accept, _, _ in _CloudPacs.seen if "multipart" in (accept or "")] == [
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1']


def test_a_pasted_bearer_token_loses_its_scheme_and_one_with_spaces_is_refused_unshown(tmp_path):
    server, store = DicomWebServer.parse("dicomweb+https://pacs.example/dicom-web"), SecretStore(tmp_path,
                                                                                                  use_keychain=False)
    request = credentials(server, {TOKEN_VARIABLE: "Bearer ya29.a0Af-token\n"}, store)(
        requests.Request("GET", "https://pacs.example").prepare())
    assert request.headers["Authorization"] == "Bearer ya29.a0Af-token"
    with pytest.raises(UserError) as error:
        credentials(server, {TOKEN_VARIABLE: "ya29.a0Af token"}, store)
    assert "holds characters no token has" in str(error.value) and "a0Af" not in str(error.value)
