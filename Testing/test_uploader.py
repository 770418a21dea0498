"""The desktop pod's files page (docker/uploader.py), started for real on loopback as supervisord starts it:
password from the environment, files into an inbox only whole, nothing outside it; finished exports out as zips,
nothing else."""

import base64
import hashlib
import http.client
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from nninteractive_server import free_port

UPLOADER = Path(__file__).resolve().parent.parent / "docker" / "uploader.py"
PASSWORD = "files-password-0123456789"
MiB = 1024 * 1024


class Uploader:
    def __init__(self, tmp_path: Path, **env):
        self.inbox, self.staging = tmp_path / "workspace/inbox", tmp_path / "workspace/.uploads"
        self.exports = tmp_path / "workspace/exports"
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(UPLOADER), "--host", "127.0.0.1", "--port", str(self.port),
             "--inbox", str(self.inbox), "--staging", str(self.staging), "--exports", str(self.exports)],
            env={"PATH": os.environ["PATH"], "SM_FILES_PASSWORD": PASSWORD, **env}, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, auth=("sm", PASSWORD), timeout=60)
        for _ in range(100):
            try:
                httpx.get(self.url, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("the uploader did not start")

    def put(self, path: str, data: bytes, size: int = None, offset: int = 0, auth=None, head: str = "") -> httpx.Response:
        size = len(data) if size is None else size
        return self.client.put(f"/upload?path={quote(path)}&size={size}&offset={offset}&head={head}", content=data,
                               **({"auth": auth} if auth else {}))

    def stop(self) -> str:
        self.client.close()
        self.process.terminate()
        self.process.wait(10)
        return self.process.stderr.read()

    def files(self) -> list:
        return sorted(str(p.relative_to(self.inbox.parent)) for p in self.inbox.parent.rglob("*") if p.is_file())


@pytest.fixture
def uploader(tmp_path):
    running = Uploader(tmp_path)
    yield running
    running.stop()


def test_the_right_password_uploads_and_a_wrong_one_gets_nothing(uploader):
    page = uploader.client.get("/")
    assert page.status_code == 200 and 'webkitdirectory' in page.text and PASSWORD not in page.text
    assert 'id="exports"' in page.text
    saved = uploader.put("CT head/series 1/IM0001.dcm", b"DICM" * 100)
    assert saved.status_code == 200 and saved.json() == {"received": 400, "saved": "CT head/series 1/IM0001.dcm"}
    assert (uploader.inbox / "CT head/series 1/IM0001.dcm").read_bytes() == b"DICM" * 100

    for auth in (("sm", "wrong-password-0123"), ("admin", PASSWORD)):
        refused = uploader.put("evil.dcm", b"x", auth=auth)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic ")
    anonymous = httpx.get(f"{uploader.url}/")
    assert anonymous.status_code == 401 and "webkitdirectory" not in anonymous.text
    assert httpx.put(f"{uploader.url}/upload?path=a.dcm&size=1", content=b"x").status_code == 401
    assert uploader.files() == ["inbox/CT head/series 1/IM0001.dcm"]
    log = uploader.stop()
    assert "Refused a wrong password from 127.0.0.1" in log and PASSWORD not in log and "wrong-password" not in log


@pytest.mark.parametrize("name", ["../escaped.dcm", "a/../../escaped.dcm", "/etc/escaped.dcm", "..", "a//b.dcm",
                                  "a\\..\\escaped.dcm", ".hidden/x.dcm", "a/.x.dcm", "", "new\nline.dcm"])
def test_names_that_leave_or_hide_in_the_inbox_are_refused(uploader, name):
    refused = uploader.put(name, b"payload")
    assert refused.status_code == 400 and "not a file name the inbox takes" in refused.json()["error"]
    assert uploader.files() == []


def test_a_link_in_the_inbox_does_not_lead_out(uploader, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (uploader.inbox / "link").symlink_to(outside)
    assert uploader.put("link/x.dcm", b"payload").status_code == 400
    assert list(outside.iterdir()) == [] and list(uploader.staging.iterdir()) == []


def test_a_big_file_in_chunks_appears_in_the_inbox_only_whole(uploader):
    data = os.urandom(MiB) * 130  # 130 MiB: over RunPod's proxy body cap, so in chunks as the page sends it
    chunk = 64 * MiB
    for offset in range(0, len(data), chunk):
        answer = uploader.put("big/volume.nii.gz", data[offset:offset + chunk], size=len(data), offset=offset)
        assert answer.status_code == 200, answer.text
        if offset + chunk < len(data):
            assert answer.json() == {"received": offset + chunk}
            # nothing under the final name before the last byte (the hidden mark only while a request's bytes come)
            assert list((uploader.inbox / "big").iterdir()) == []
    saved = uploader.inbox / "big/volume.nii.gz"
    assert [p.name for p in saved.parent.iterdir()] == ["volume.nii.gz"]
    assert hashlib.sha256(saved.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert list(uploader.staging.iterdir()) == []
    assert uploader.put("big/huge.bin", b"", size=1 << 60).status_code == 507  # more than the volume holds


def test_a_broken_off_upload_never_appears_and_resumes_where_it_stopped(uploader):
    data = os.urandom(3 * MiB)
    query = f"/upload?path=scan.zip&size={len(data)}&offset=0"
    with socket.create_connection(("127.0.0.1", uploader.port)) as sock:  # the browser tab is closed mid-upload
        sock.sendall(f"PUT {query} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic()}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:MiB])
    for _ in range(100):  # the pod keeps what arrived, outside the inbox
        parts = list(uploader.staging.glob("*.part"))
        if parts and parts[0].stat().st_size == MiB:
            break
        time.sleep(0.05)
    assert [p.stat().st_size for p in parts] == [MiB] and not (uploader.inbox / "scan.zip").exists()
    for _ in range(100):  # the mark it touched while bytes came is gone with the request: the pod agent would
        if not (uploader.inbox / ".upload-in-progress").exists():  # count it as a file of the user's
            break
        time.sleep(0.05)
    assert list(uploader.inbox.iterdir()) == []
    wrong = uploader.put("scan.zip", data[2 * MiB:], size=len(data), offset=2 * MiB)
    assert wrong.status_code == 409 and wrong.json()["received"] == MiB  # the page resumes from the byte the pod has
    done = uploader.put("scan.zip", data[MiB:], size=len(data), offset=MiB)
    assert done.json()["saved"] == "scan.zip" and (uploader.inbox / "scan.zip").read_bytes() == data
    assert "Traceback" not in uploader.stop()


def test_a_broken_off_file_is_never_joined_to_another_file_of_the_same_name_and_size(uploader):
    """Patient A's upload broke off inside DICOM/IM000037; patient B's CD export has a file of that name and, as
    uncompressed slices do, that size. B's file must arrive as B's bytes, not as A's header with B's pixels."""
    a, b = b"patient A " * 60_000, b"patient B " * 60_000
    assert uploader.put("DICOM/IM000037", a[:250_000], size=len(a)).json() == {"received": 250_000}  # then cut off
    answer = uploader.put("DICOM/IM000037", b, size=len(b))  # the page starts every file at byte 0
    assert answer.status_code == 200 and answer.json()["saved"] == "DICOM/IM000037"
    assert (uploader.inbox / "DICOM/IM000037").read_bytes() == b and list(uploader.staging.iterdir()) == []


def test_two_pages_sending_a_file_of_one_name_and_size_at_once_never_weave_them_together(uploader):
    """Two tabs uploading two patients' CDs, whose slices share names and sizes: their blocks went into one part
    file by turns, and the inbox got a file of both."""
    a, b = b"patient A " * 300_000, b"patient B " * 300_000
    with socket.create_connection(("127.0.0.1", uploader.port)) as sock:  # A's request is still arriving
        sock.sendall(f"PUT /upload?path=DICOM/IM000037&size={len(a)}&offset=0 HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {basic()}\r\nContent-Length: {len(a)}\r\n\r\n".encode() + a[:MiB])
        for _ in range(100):
            if [part.stat().st_size for part in uploader.staging.glob("*.part")] == [MiB]:
                break
            time.sleep(0.05)
        busy = uploader.put("DICOM/IM000037", b)  # B's, meanwhile
        assert busy.status_code == 409 and "is being uploaded from another page now" in busy.json()["error"]
        assert "received" not in busy.json()  # the page says so rather than resume into A's part
        sock.sendall(a[MiB:])
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 200")
    assert (uploader.inbox / "DICOM/IM000037").read_bytes() == a and list(uploader.staging.iterdir()) == []
    assert uploader.put("DICOM/IM000037", b).json()["exists"]  # B's, again: skipped with its reason, not merged


def test_two_pages_sending_chunks_of_two_files_of_one_name_and_size_by_turns_never_join_them(uploader):
    """Two tabs, two patients' CDs, a slice over one chunk: B's first chunk restarted A's part file and A's next
    chunk went on after B's bytes, so the inbox got a file of both. The page's fingerprint of each file's first
    bytes gives each its own part."""
    a, b = (b"patient A " * (3 * MiB // 10 + 1))[:3 * MiB], (b"patient B " * (3 * MiB // 10 + 1))[:3 * MiB]
    name = "DICOM/IM0001"
    assert uploader.put(name, a[:MiB], len(a), 0, head="a1").json() == {"received": MiB}
    assert uploader.put(name, b[:MiB], len(b), 0, head="b2").json() == {"received": MiB}
    assert uploader.put(name, a[MiB:2 * MiB], len(a), MiB, head="a1").json() == {"received": 2 * MiB}
    assert uploader.put(name, a[2 * MiB:], len(a), 2 * MiB, head="a1").json()["saved"] == name
    late = uploader.put(name, b[MiB:2 * MiB], len(b), MiB, head="b2")
    assert late.status_code == 409 and late.json()["exists"]  # the page says "skipped ... already in the inbox"
    assert (uploader.inbox / name).read_bytes() == a
    assert uploader.put(name, a, head="not hex").status_code == 400
    assert "head: head" in uploader.client.get("/").text  # the page sends its fingerprint


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js runs the page's script (scripts/test.sh needs it)")
def test_the_pages_fingerprint_is_fnv1a_of_the_first_64_kib(uploader):
    script = uploader.client.get("/").text.split("<script>")[1].split("</script>")[0]
    function = script[script.index("async function fingerprint"):script.index("async function upload")]
    data = os.urandom(70_000)
    run = subprocess.run(["node"], input=function + f"fingerprint({{slice: (a, b) => ({{arrayBuffer: async () => "
                         f"Buffer.from('{data.hex()}', 'hex').subarray(a, b)}})}}).then(console.log);",
                         capture_output=True, text=True, timeout=60)
    expected = 0x811C9DC5
    for byte in data[:65536]:
        expected = ((expected ^ byte) * 0x01000193) & 0xFFFFFFFF
    assert run.stdout.strip() == f"{expected:x}", run.stderr


def test_an_upload_keeps_the_pod_running_by_the_agents_heartbeat(tmp_path):
    """A big study sent through the page with no desktop open met the pod's idle timeout half-way: chunks arriving
    are use, told to the agent (at most every 30 s) with the heartbeat token."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    beats = []

    class Agent(BaseHTTPRequestHandler):
        def do_POST(self):
            beats.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    agent = ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    running = Uploader(tmp_path, SM_AGENT_PORT=str(agent.server_port), SM_HEARTBEAT_TOKEN="heartbeat-token-0123")
    try:
        data = os.urandom(3 * MiB)
        for offset in range(0, len(data), MiB):
            assert running.put("big.dcm", data[offset:offset + MiB], len(data), offset).status_code == 200
        for _ in range(100):
            if beats:
                break
            time.sleep(0.05)
        assert beats == [("/heartbeat", "Bearer heartbeat-token-0123")]  # one: at most every 30 s
    finally:
        running.stop()
        agent.shutdown()


def test_names_the_file_system_cannot_hold_are_refused_with_an_answer(uploader):
    """A 300-character name, or a folder whose name a file in the inbox has: the connection was dropped unanswered,
    and the page retried five times before saying the upload "kept breaking off"."""
    too_long = uploader.put("CD/" + "x" * 300 + ".dcm", b"payload")
    assert too_long.status_code == 400 and "not a file name the inbox takes" in too_long.json()["error"]
    assert uploader.put("CON", b"a file").status_code == 200
    taken = uploader.put("CON/IM0001.dcm", b"payload")
    assert taken.status_code == 409 and taken.json() == {
        "error": "CON/IM0001.dcm: a folder on its path is a file in the inbox; rename the folder to upload it.",
        "exists": True}
    assert taken.headers["X-Content-Type-Options"] == "nosniff"  # and no page elsewhere may frame ours
    assert uploader.client.get("/").headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert "Traceback" not in uploader.stop()


def slow_put(uploader, path: str, data: bytes, seconds: float) -> str:
    """One PUT whose body arrives evenly over seconds, as from a slow uplink; the answer's body."""
    pieces = 8
    step = len(data) // pieces + 1
    with socket.create_connection(("127.0.0.1", uploader.port)) as sock:
        sock.sendall(f"PUT /upload?path={quote(path)}&size={len(data)}&offset=0 HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {basic()}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
        for start in range(0, len(data), step):
            sock.sendall(data[start:start + step])
            time.sleep(seconds / pieces)
        return sock.makefile("rb").read().decode()


def test_the_inbox_takes_a_folder_uploaded_through_the_page_as_one_series(uploader, shared_data):
    """The page publishes each file whole, at once: between two files nothing visible changed in the inbox for as
    long as a file took to arrive, and the inbox took the first files as a settled series. The mark the page
    touches while bytes arrive holds the folder."""
    from conftest import UNCOMPRESSED_SERIES
    from SegmentationMachineLib.inbox.watcher import Inbox, InboxOptions

    settle = 1.0
    uploader.inbox.mkdir(parents=True, exist_ok=True)
    inbox = Inbox(InboxOptions(folder=uploader.inbox, state_folder=uploader.inbox.parent / ".inbox-state",
                               settle_seconds=settle, hold_seconds=settle))
    inbox.start()
    files = sorted(UNCOMPRESSED_SERIES.iterdir())
    sender = threading.Thread(target=lambda: [slow_put(uploader, f"CD/DICOM/{f.name}", f.read_bytes(), 1.6 * settle)
                                              for f in files])
    sender.start()
    deliveries = []
    while sender.is_alive():
        deliveries += inbox.poll()
        time.sleep(0.1)
    deadline = time.monotonic() + settle + 3
    while time.monotonic() < deadline and not deliveries:
        deliveries += inbox.poll()
        time.sleep(0.1)
    inbox.stop()
    assert [len(d.series.files) for d in deliveries] == [len(files)]
    assert sorted(p.name for p in (uploader.inbox / "CD/DICOM").iterdir()) == [f.name for f in files]


def test_an_upload_never_replaces_a_file_in_the_inbox(uploader):
    uploader.inbox.mkdir(parents=True, exist_ok=True)
    (uploader.inbox / "report.pdf").write_bytes(b"the user's own")
    again = uploader.put("report.pdf", b"something else")
    assert again.status_code == 409 and again.json()["exists"] is True
    assert (uploader.inbox / "report.pdf").read_bytes() == b"the user's own"


def test_the_password_is_never_on_the_command_line(uploader):
    command_line = Path(f"/proc/{uploader.process.pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in command_line and b"uploader.py" in command_line


def test_finished_exports_download_as_zips_and_nothing_else_does(uploader, tmp_path):
    bone = uploader.exports / "CT_segmentation_20261126-1200"
    bone.mkdir(parents=True)
    mesh = os.urandom(3 * MiB)
    (bone / "Bone.stl").write_bytes(mesh)
    (bone / "report.json").write_text('{"meshes": []}')
    (bone / "secrets").symlink_to("/etc/passwd")  # a link in an export leads nowhere
    (uploader.exports / "half-written").mkdir()  # no report.json yet: not finished
    (uploader.exports / "half-written" / "Skin.stl").write_bytes(b"solid")
    (uploader.inbox / "patient").mkdir(parents=True)
    (uploader.inbox / "patient" / "IM1.dcm").write_bytes(b"DICM")

    listed = uploader.client.get("/exports")
    assert listed.status_code == 200 and listed.json() == {"exports": [
        {"name": bone.name, "files": ["Bone.stl", "report.json"], "bytes": len(mesh) + 14}]}
    for _ in range(2):  # streamed (chunked), twice on one kept-alive connection
        got = uploader.client.get(f"/exports/{bone.name}.zip")
        assert got.status_code == 200 and got.headers["Content-Type"] == "application/zip"
        assert got.headers["Transfer-Encoding"] == "chunked"
        with zipfile.ZipFile(io.BytesIO(got.content)) as archive:
            assert archive.namelist() == [f"{bone.name}/Bone.stl", f"{bone.name}/report.json"]
            assert archive.read(f"{bone.name}/Bone.stl") == mesh
    for path in ["/exports/half-written.zip", "/exports/..%2Finbox%2Fpatient.zip", "/exports/../inbox/patient.zip",
                 "/exports/%2Fetc.zip", "/exports/%2E%2E.zip", "/inbox/patient/IM1.dcm", "/exports/"]:
        connection = http.client.HTTPConnection("127.0.0.1", uploader.port, timeout=10)  # the path as written here
        connection.request("GET", path, headers={"Authorization": basic()})
        refused = connection.getresponse()
        assert refused.status == 404 and b"PK" not in refused.read(), path
        connection.close()
    assert httpx.get(f"{uploader.url}/exports/{bone.name}.zip").status_code == 401
    assert list(uploader.staging.iterdir()) == []  # nothing made on the volume for the download
    assert "Traceback" not in uploader.stop()


def test_without_a_password_the_page_stays_off(tmp_path):
    done = subprocess.run([sys.executable, str(UPLOADER), "--port", str(free_port()), "--inbox", str(tmp_path / "i"),
                           "--staging", str(tmp_path / "s")], env={"PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "SM_FILES_PASSWORD" in done.stderr and "Traceback" not in done.stderr


def basic() -> str:
    return "Basic " + base64.b64encode(f"sm:{PASSWORD}".encode()).decode()


# The page's own upload code, run by Node (its fetch and Blob are the browser's) on a stand-in document.
PAGE_IN_NODE = """
const [base, authorization, size] = process.argv.slice(1);  // node -e: no script path
const element = () => ({textContent: "", value: "", addEventListener() {}, replaceChildren() {}, append() {}});
const elements = {};
globalThis.document = {getElementById: (id) => elements[id] ??= element(), createElement: element};
const browserFetch = fetch;  // relative to the page, with the password the browser was given
globalThis.fetch = (url, init = {}) => browserFetch(new URL(url, base), {...init, headers: {authorization}});
%s
const bytes = new Uint8Array(Number(size)).map((_, i) => (i * 7919) %% 251);
const file = new Blob([bytes]);
file.name = "study.zip";
upload(file).then(() => console.log(document.getElementById("log").textContent.trim()));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js runs the page's script")
def test_the_page_gets_a_big_file_through_a_slow_uplink_in_smaller_chunks(uploader):
    """RunPod's proxy ends a request after 100 s: below ~2.7 Mbit/s up, the page's 32 MiB chunk never arrives. It
    halves the chunk after each cut-off request and counts a part that arrived as progress (here scaled: 1.5 s,
    4 MiB/s, an 8 MiB file)."""
    from cloudflare import CloudflareLike

    page = uploader.client.get("/").text
    script = page[page.index("<script>") + len("<script>"):page.index("</script>")]
    script = script[:script.index('document.getElementById("refresh")')]  # the functions, not the page's wiring
    proxy = CloudflareLike(uploader.port, limit_s=1.5, uplink_bytes_per_s=4 * MiB)
    try:
        size = 8 * MiB
        ran = subprocess.run(["node", "--input-type=module", "-e", PAGE_IN_NODE % script, proxy.url + "/", basic(),
                              str(size)], capture_output=True, text=True, timeout=120)
    finally:
        proxy.close()
    assert ran.returncode == 0 and ran.stdout.strip() == "saved    study.zip", (ran.stdout + ran.stderr, proxy.seen)
    expected = bytes((i * 7919) % 251 for i in range(size))
    assert (uploader.inbox / "study.zip").read_bytes() == expected
    statuses = [status for method, path, length, status in proxy.seen if method == "PUT"]
    assert statuses[0] == 524 and statuses[-1] == 200 and 524 not in statuses[statuses.index(200):]
