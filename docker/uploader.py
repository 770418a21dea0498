#!/usr/bin/env python3
"""The desktop pod's files page: files and folders from a browser into the inbox, and the finished exports
back to the browser as zip files (standard library only).

Runs as the desktop user under supervisord, behind HTTP Basic authentication (user `sm`, the password
from SM_FILES_PASSWORD in the environment, never on the command line where `ps` shows it). It writes only
into the inbox and reads only finished exports (folders of the exports folder holding report.json): no
other listing or download, no deleting, no shell.

A file arrives in chunks (`PUT /upload?path=a/b.dcm&size=N&offset=K`, each under RunPod's proxy body
cap) appended to a part file in the staging folder, outside the inbox. Only the last chunk moves it
under its final name, at once and never over an existing file, so the inbox watcher never sees half a
file. A chunk that fails is resumed from the byte the server reports (409 with `received`); a part whose
first bytes are not the file's is another file's, of the same name and size, and is started afresh.
"""

import argparse
import base64
import fcntl
import hashlib
import hmac
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

USER = "sm"
CHUNK_LIMIT = 64 * 1024 * 1024  # RunPod's proxy refuses bodies near 100 MB
BLOCK = 64 * 1024
# Touched in a file's folder in the inbox as its bytes arrive, removed once it is there: the inbox never reads a
# hidden file, but holds a folder while one in it changes, so a series is not taken before its last file arrives.
MARKER = ".upload-in-progress"
MAX_DEPTH, MAX_PATH, MAX_NAME_BYTES = 32, 1024, 255  # 255: a file name's limit on Linux file systems

log = logging.getLogger("segmentation-machine.uploader")


class Refused(Exception):
    """An upload the pod does not take: the HTTP status and the sentence the page shows."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.extra = status, extra


def inbox_path(inbox: Path, relative: str) -> Path:
    """Where `relative` (a/b/c.dcm, as the browser names a file in a dropped folder) lands in the inbox;
    refuses anything that could leave it or hide in it (.., absolute paths, hidden names, control characters)."""
    parts = relative.split("/")
    if not relative or len(relative) > MAX_PATH or len(parts) > MAX_DEPTH or any(
            not part or part.startswith(".") or "\\" in part or any(ord(c) < 32 or c == "\x7f" for c in part)
            or len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in parts):
        raise Refused(400, f"{relative!r} is not a file name the inbox takes (no '..', hidden or absolute names).")
    return inbox.joinpath(*parts)


def part_file(staging: Path, relative: str, size: int, head: str = "") -> Path:
    """head: the page's fingerprint of the file's first bytes. Two pages sending two patients' files of one name
    and size by turns each append to their own part (by name and size alone, B's first chunk restarted A's part
    and A's next chunk went on after B's bytes); the same file dropped again resumes its own."""
    return staging / f"{hashlib.sha256(f'{size}:{head}:{relative}'.encode()).hexdigest()}.part"


def receive(inbox: Path, staging: Path, relative: str, size: int, offset: int, body, length: int,
            head: str = "") -> dict:
    """Appends one chunk; the last one publishes the file. Returns what the page is told."""
    final = inbox_path(inbox, relative)
    if not re.fullmatch(r"[0-9a-f]{0,16}", head):
        raise Refused(400, "head must be the page's fingerprint of the file (up to 16 hexadecimal digits).")
    if offset + length > size:
        raise Refused(400, "The chunk goes past the file's size.")
    if length > CHUNK_LIMIT:
        raise Refused(413, f"A chunk may hold at most {CHUNK_LIMIT // 2**20} MiB.")
    if os.path.lexists(final):
        raise Refused(409, f"{relative} is already in the inbox; rename the file to upload it again.", exists=True)
    part = part_file(staging, relative, size, head)
    if offset == 0 and shutil.disk_usage(staging).free < size:
        raise Refused(507, f"The pod's volume has no room for {relative} ({size / 2**20:.0f} MiB).")
    marker = inbox_folder(final, inbox) / MARKER
    try:
        return _append(part, final, inbox, relative, size, offset, body, length, marker)
    finally:  # touched while bytes arrive: never left behind (the pod agent would count it as a file of the user's)
        marker.unlink(missing_ok=True)


def _append(part: Path, final: Path, inbox: Path, relative: str, size: int, offset: int, body, length: int,
            marker: Path) -> dict:
    with open(part, "a+b") as out:
        try:  # one writer at a time: two pages sending a file of this name and size wove their blocks into one
            fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused(409, f"{relative} is being uploaded from another page now: upload it again once that "
                               "has finished.") from None
        try:  # the other page published it between our open and our lock: that file is in the inbox now
            current = os.stat(part).st_ino == os.fstat(out.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if not current:
            raise Refused(409, "Resume from the byte the pod has.", received=0)
        received = out.tell()
        head = b""
        if offset == 0 and received:  # a part of this name and size: this file's, or another's that broke off
            head = body.read(min(received, length, BLOCK))
            out.seek(0)
            if out.read(len(head)) == head:
                raise Refused(409, "Resume from the byte the pod has.", received=received)
            # Another file's (a CD export of another patient names its files alike): never joined, started afresh.
            out.truncate(0)
            received = 0
        if received != offset:  # a chunk was lost or repeated: the page resumes from here
            raise Refused(409, "Resume from the byte the pod has.", received=received)
        out.write(head)
        length -= len(head)
        while length:
            marker.touch()
            block = body.read(min(BLOCK, length))
            if not block:
                raise Refused(400, "The upload ended early; it resumes from the byte the pod has.",
                              received=_size(out))
            out.write(block)
            length -= len(block)
        received = _size(out)
        if received < size:
            return {"received": received}
        out.flush()
        os.fsync(out.fileno())
        publish(part, final, inbox)  # still locked: nobody appends to it meanwhile
    log.info("Saved %s (%d bytes).", relative, size)
    return {"received": size, "saved": relative}


def _size(out) -> int:
    """What the part file holds (an append-mode file's position says less after a truncate)."""
    out.flush()
    return os.fstat(out.fileno()).st_size


def inbox_folder(final: Path, inbox: Path) -> Path:
    """final's folder in the inbox, made where missing; refused where a link inside the inbox leads out of it, or where
    a file in the inbox has a folder's name."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise Refused(409, f"{final.relative_to(inbox)}: a folder on its path is a file in the inbox; rename the "
                           "folder to upload it.", exists=True) from None
    if not final.parent.resolve().is_relative_to(inbox.resolve()):
        raise Refused(400, f"{final.parent.name} is a link out of the inbox.")
    return final.parent


def publish(part: Path, final: Path, inbox: Path):
    """Gives the complete part file its name in the inbox at once, never replacing a file there."""
    try:
        inbox_folder(final, inbox)
    except Refused:
        part.unlink()
        raise
    try:
        os.link(part, final)  # atomic, and fails when the name exists
    except FileExistsError:
        part.unlink()
        raise Refused(409, f"{final.name} is already in the inbox.", exists=True) from None
    except OSError:  # a volume without hard links: rename is atomic too (the name was checked just before)
        if os.path.lexists(final):
            part.unlink()
            raise Refused(409, f"{final.name} is already in the inbox.", exists=True) from None
        os.rename(part, final)
        return
    part.unlink()


def forget_abandoned_parts(staging: Path, age_s: float = 2 * 24 * 3600):
    """Part files of uploads nobody resumed for two days (they were never in the inbox)."""
    for part in staging.glob("*.part"):
        if time.time() - part.stat().st_mtime > age_s:
            part.unlink()


def finished_exports(exports: Path) -> list:
    """The exports a user may download, newest first: folders directly in exports holding report.json (written last,
    so the export is whole), with their plain files (links, which could lead anywhere, are left out). A folder that
    goes away or cannot be read meanwhile is left out too."""
    found = []
    for folder in exports.iterdir() if exports and exports.is_dir() else ():
        try:
            if folder.is_dir() and not folder.is_symlink() and (folder / "report.json").is_file():
                files = sorted(f for f in folder.iterdir() if f.is_file() and not f.is_symlink())
                found.append({"name": folder.name, "files": [f.name for f in files],
                              "bytes": sum(f.stat().st_size for f in files),
                              "time": (folder / "report.json").stat().st_mtime})
        except OSError:
            continue
    return sorted(found, key=lambda export: -export["time"])


class ChunkedBody(io.RawIOBase):
    """HTTP/1.1 chunked coding onto the connection: a zip streams as it is made, nothing is written to the volume,
    and bytes flow from the start (RunPod's proxy gives up on an answer silent for 100 s). Only end() writes the
    last chunk: an answer broken off lacks it, so the browser says the download failed rather than keep a cut zip."""

    def __init__(self, connection):
        super().__init__()
        self.connection = connection

    def writable(self):
        return True

    def write(self, data):
        if data:
            self.connection.write(b"%x\r\n%s\r\n" % (len(data), bytes(data)))
        return len(data)

    def end(self):
        self.connection.write(b"0\r\n\r\n")


class PodKeeper:
    """Uploads are use: while chunks arrive, the pod agent gets a heartbeat at most every EVERY_S (a big study sent
    through this page with no desktop open met the pod's idle timeout half-way). Never delays a chunk. Not the
    library's Heartbeat: this page runs on the image's system Python, with the standard library only."""
    EVERY_S = 30.0

    def __init__(self, agent_port: str, token: str):
        self.url = f"http://127.0.0.1:{agent_port}/heartbeat" if agent_port and token else None
        self._token, self._last, self._lock = token, -self.EVERY_S, threading.Lock()

    def upload_seen(self):
        with self._lock:
            if self.url is None or time.monotonic() - self._last < self.EVERY_S:
                return
            self._last = time.monotonic()
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self):
        request = urllib.request.Request(self.url, method="POST", headers={"Authorization": f"Bearer {self._token}"})
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError as error:  # the agent restarting: the next chunk tells it again
            log.warning("Could not tell the pod agent of the upload (%s).", error)


def make_handler(inbox: Path, staging: Path, secret: str, exports: Path = None, keeper: PodKeeper = None):
    keeper = keeper or PodKeeper("", "")
    expected = ("Basic " + base64.b64encode(f"{USER}:{secret}".encode()).decode()).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120  # a stalled browser does not hold a thread forever
        server_version = "SegmentationMachine-upload"
        sys_version = ""

        def do_GET(self):
            if not self._authorized():
                return
            path = unquote(urlsplit(self.path).path)
            if path == "/":
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/exports" and exports:
                self._answer(200, {"exports": [{k: e[k] for k in ("name", "files", "bytes")}
                                               for e in finished_exports(exports)]})
            elif path.startswith("/exports/") and path.endswith(".zip") and exports:
                self._send_export(path[len("/exports/"):-len(".zip")])
            else:
                self._answer(404, {"error": "Only the upload page and the finished exports are here."})

        def _send_export(self, name: str):
            """Only a name finished_exports() lists: nothing else can be asked for (no path ever reaches a file)."""
            export = next((e for e in finished_exports(exports) if e["name"] == name), None)
            if export is None:
                self._answer(404, {"error": f"There is no finished export called {name!r}."})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Content-Disposition", f"attachment; filename*=UTF-8''{quote(name)}.zip")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.close_connection = True  # until the last chunk is out: a failure part-way ends the connection
            chunks = ChunkedBody(self.wfile)
            body = io.BufferedWriter(chunks, BLOCK)
            with zipfile.ZipFile(body, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
                for file in export["files"]:
                    archive.write(exports / name / file, f"{name}/{file}")
            body.flush()
            chunks.end()
            self.close_connection = False
            log.info("Sent the export %s.", name)

        def do_PUT(self):
            if not self._authorized():
                return
            url = urlsplit(self.path)
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            try:
                if url.path != "/upload":
                    raise Refused(404, "Uploads go to /upload.")
                keeper.upload_seen()
                length = self._number(self.headers.get("Content-Length"), "Content-Length")
                size, offset = self._number(query.get("size"), "size"), self._number(query.get("offset", "0"), "offset")
                self._answer(200, receive(inbox, staging, query.get("path", ""), size, offset, self.rfile, length,
                                          query.get("head", "")))
            except Refused as refused:
                self.close_connection = True  # the rest of the body is not read
                self._answer(refused.status, {"error": str(refused), **refused.extra})

        @staticmethod
        def _number(text, name: str) -> int:
            if text is None or not text.isascii() or not text.isdigit():
                raise Refused(400, f"{name} must be a number of bytes.")
            return int(text)

        def _authorized(self) -> bool:
            if hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected):
                return True
            if self.headers.get("Authorization"):
                log.warning("Refused a wrong password from %s.", self.client_address[0])
            self.close_connection = True
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="SegmentationMachine upload", charset="UTF-8"')
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            return False

        def _answer(self, status: int, payload: dict):
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status: int, data: bytes, content_type: str):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")  # a JSON answer is never run as a page
            self.send_header("Content-Security-Policy", "frame-ancestors 'none'")  # nor the page framed by another
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def handle_one_request(self):
            try:
                super().handle_one_request()
            except OSError as error:  # the browser went away or the volume failed: the page resumes or says so
                log.warning("A transfer broke off: %s", error.strerror or error)
                self.close_connection = True

        def log_message(self, *args):
            pass  # request lines carry file names; what matters is logged above

    return Handler


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>The pod's files</title>
<style>body{font:16px sans-serif;margin:2em;max-width:50em}#log{white-space:pre-wrap;font-family:monospace}</style>
</head><body>
<h1>Upload to the pod's inbox</h1>
<p>DICOM folders, zip archives or single files. Slicer on the pod's desktop loads each series once it is complete.</p>
<p><label>Folder: <input type="file" id="folder" webkitdirectory multiple></label></p>
<p><label>Files: <input type="file" id="files" multiple></label></p>
<p id="status"></p><div id="log"></div>
<h2>Exports</h2>
<p>What you exported in Slicer on the pod (STL, OBJ, 3MF...), one zip file each, newest first.
<button id="refresh">Refresh</button></p>
<ul id="exports"></ul>
<script>
const CHUNK = 32 * 1024 * 1024, MIN_CHUNK = 1024 * 1024;
const status = document.getElementById("status"), logView = document.getElementById("log");
const say = (text) => { logView.textContent += text + "\\n"; };

async function fingerprint(file) {  // FNV-1a of the first 64 KiB: another patient's file of this name and size differs
  const bytes = new Uint8Array(await file.slice(0, 65536).arrayBuffer());
  let hash = 0x811c9dc5;
  for (const byte of bytes) { hash = Math.imul(hash ^ byte, 0x01000193) >>> 0; }
  return hash.toString(16);
}

async function upload(file) {
  const name = file.webkitRelativePath || file.name, head = await fingerprint(file);
  let offset = 0, chunk = CHUNK;
  for (let tries = 0; tries < 5;) {
    const end = Math.min(offset + chunk, file.size);
    const query = new URLSearchParams({path: name, size: file.size, offset: offset, head: head});
    let answer;
    try {
      const response = await fetch("upload?" + query, {method: "PUT", body: file.slice(offset, end)});
      answer = await response.json();
      if (response.ok) {
        offset = answer.received; tries = 0;
        status.textContent = `${name}: ${Math.round(100 * offset / Math.max(file.size, 1))} %`;
        if (answer.saved) { say("saved    " + name); return; }
        continue;
      }
    } catch (error) {  // cut off: RunPod's proxy ends a request after 100 s, so a slow uplink needs smaller chunks
      chunk = Math.max(Math.floor((end - offset) / 2), MIN_CHUNK); tries += 1; continue;  // the pod says where to resume
    }
    if (answer.exists) { say("skipped  " + name + ": " + answer.error); return; }
    if (answer.received === undefined) { say("failed   " + name + ": " + answer.error); return; }
    tries = answer.received > offset ? 0 : tries + 1;  // part of it arrived: that is progress, not a failure
    offset = answer.received;
  }
  say("failed   " + name + ": the upload kept breaking off; try again");
}

async function uploadAll(input) {
  for (const file of input.files) { await upload(file); }
  status.textContent = "Done: " + input.files.length + " file(s).";
  input.value = "";
}
async function listExports() {
  const list = document.getElementById("exports");
  const response = await fetch("exports");
  if (!response.ok) { list.textContent = "No exports here."; return; }
  const answer = await response.json();
  list.replaceChildren(...answer.exports.map((e) => {
    const item = document.createElement("li"), link = document.createElement("a");
    link.href = "exports/" + encodeURIComponent(e.name) + ".zip";
    link.textContent = e.name;
    item.append(link, ` (${e.files.join(", ")}; ${(e.bytes / 1048576).toFixed(1)} MiB)`);
    return item;
  }));
  if (!answer.exports.length) { list.textContent = "None yet: export a segmentation in Slicer first."; }
}
document.getElementById("refresh").addEventListener("click", listExports);
listExports();
for (const id of ["folder", "files"]) {
  const input = document.getElementById(id);
  input.addEventListener("change", () => uploadAll(input));
}
</script></body></html>
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--inbox", type=Path, required=True)
    parser.add_argument("--staging", type=Path, required=True, help="part files; on the inbox's file system")
    parser.add_argument("--exports", type=Path, help="the folder whose finished exports may be downloaded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="uploader: %(levelname)s: %(message)s", stream=sys.stderr)
    secret = os.environ.pop("SM_FILES_PASSWORD", "")  # not inherited by what this starts (/proc keeps it: same user)
    keeper = PodKeeper(os.environ.get("SM_AGENT_PORT", ""), os.environ.pop("SM_HEARTBEAT_TOKEN", ""))
    if len(secret) < 12:
        log.error("SM_FILES_PASSWORD (12 characters or more) is not set: the upload page stays off.")
        return 2
    for folder in (args.inbox, args.staging):
        folder.mkdir(parents=True, exist_ok=True)
    forget_abandoned_parts(args.staging)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.inbox, args.staging, secret, args.exports,
                                                                       keeper))
    server.daemon_threads = True
    log.info("Upload page on port %d into %s.", server.server_port, args.inbox)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
