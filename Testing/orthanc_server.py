"""A real Orthanc (Debian packages orthanc + orthanc-dicomweb) started on loopback for the tests.

Basic authentication is on, so every request the client makes is checked against a registered user;
the DICOM port (C-STORE, C-FIND) is open too, for the tests of the DICOM node.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from conftest import DATA, UNCOMPRESSED_SERIES
from nninteractive_server import free_port  # noqa: F401 (also sets NO_PROXY for loopback)

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGINS = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGINS / "libOrthancDicomWeb.so"
HOW_TO_GET_IT = ("Orthanc with its DICOMweb plugin is not installed: apt-get install orthanc orthanc-dicomweb "
                 "(scripts/test.sh does it where apt-get is usable)")
USER, PASSWORD = "sm-test", "orthanc-Test-Password-7c1e"
AET = "ORTHANCTEST"
# A Lua filter (Orthanc's ReceivedInstanceFilter) that drops every DICOM SEG it receives: Orthanc 1.10 still answers
# the STOW-RS with HTTP 200, the SEG listed as stored and none as failed, as a hospital's routing rule may.
DROP_SEG_FILTER = """function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.Modality ~= 'SEG'
end
"""


def require_orthanc():
    """Skips the calling test (or module) with how to install Orthanc when it is missing."""
    if not (ORTHANC.exists() or shutil.which("Orthanc")) or not DICOMWEB_PLUGIN.exists():
        pytest.skip(HOW_TO_GET_IT)


class Orthanc:
    """One Orthanc process with its own storage under folder, on free loopback ports."""

    def __init__(self, folder: Path, settings: dict = None):
        self.folder = Path(folder)
        self.settings = settings or {}  # more configuration (e.g. LuaScripts), over the defaults
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.auth = (USER, PASSWORD)
        self.process = None

    def _config(self) -> dict:
        return {
            "Name": "SegmentationMachineTest",
            "StorageDirectory": str(self.folder / "storage"), "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "DicomServerEnabled": True, "DicomAet": AET, "DicomPort": self.dicom_port,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True, "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            **self.settings,
        }

    def start(self, timeout: float = 30):
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=2))
        self.log = open(self.folder / "orthanc.log", "ab")
        executable = ORTHANC if ORTHANC.exists() else shutil.which("Orthanc")
        self.process = subprocess.Popen([str(executable), str(config)], stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"Orthanc exited; see {self.log.name}"
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=1).ok:
                    return self
            except requests.RequestException:  # not listening yet, or slow to answer its first request
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Orthanc did not answer within {timeout} s; see {self.log.name}")

    def upload(self, *paths) -> list:
        """Stores DICOM files through Orthanc's REST API; returns Orthanc's answer for each."""
        answers = []
        for path in paths:
            response = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=30)
            response.raise_for_status()
            answers.append(response.json())
        return answers

    def get(self, path: str) -> requests.Response:
        """GET path (Orthanc's REST API, or /dicom-web/...) as the registered user."""
        response = requests.get(f"{self.url}{path}", auth=self.auth, timeout=30)
        response.raise_for_status()
        return response

    def instance_files(self, series_uid: str) -> list:
        """The stored files of a series, found by its SeriesInstanceUID, as bytes."""
        response = requests.post(f"{self.url}/tools/lookup", data=series_uid, auth=self.auth, timeout=30)
        response.raise_for_status()
        (series,) = response.json()
        instances = self.get(f"/series/{series['ID']}").json()["Instances"]
        return [self.get(f"/instances/{instance}/file").content for instance in instances]

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.log.close()


def copies_in_a_new_study(folder: Path, study: str, count: int, source_series=UNCOMPRESSED_SERIES,
                          transfer_syntax: str = None) -> list:
    """A real series as count image series of another study: new UIDs, the same pixels; with transfer_syntax, the
    files say that syntax (the pixel data stays as it is: JPEG 2000 labelled HTJ2K is how a reader without an HTJ2K
    decoder meets HTJ2K)."""
    paths = []
    for number in range(1, count + 1):
        series = generate_uid()
        for source in sorted(source_series.iterdir()):
            dataset = pydicom.dcmread(source)
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID  # blank in the anonymised JPEG 2000 CT
            dataset.SeriesDescription, dataset.SeriesNumber = f"copy {number}", 10 + number
            paths.append(Path(folder) / f"{number}-{source.name}.dcm")
            dataset.save_as(paths[-1])
            if transfer_syntax:
                _say_transfer_syntax(paths[-1], transfer_syntax)
    return paths


def _say_transfer_syntax(path: Path, uid: str):
    """Rewrites path's file meta information to say the transfer syntax uid: pydicom 2.4 (Slicer's) refuses to write
    a syntax it does not know, HTJ2K among them."""
    def element(syntax):  # (0002,0010) in explicit VR little endian, its value padded to an even length
        value = (syntax + "\0" * (len(syntax) % 2)).encode()
        return b"\x02\x00\x10\x00UI" + len(value).to_bytes(2, "little") + value

    data = path.read_bytes()
    old = element(str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID))
    assert data.count(old) == 1 and data[132:138] == b"\x02\x00\x00\x00UL", path  # group length first, as written
    data = data.replace(old, element(uid))
    length = int.from_bytes(data[140:144], "little") + len(element(uid)) - len(old)
    path.write_bytes(data[:140] + length.to_bytes(4, "little") + data[144:])


def dropping_seg(folder: Path) -> dict:
    """Orthanc settings that drop every DICOM SEG received (DROP_SEG_FILTER, written into folder)."""
    script = Path(folder) / "drop-seg.lua"
    script.write_text(DROP_SEG_FILTER)
    return {"LuaScripts": [str(script)]}


def serving(folder: Path, files, settings: dict = None):
    """For a fixture: yields an Orthanc in folder (with settings) loaded with files() (the real scans' paths), stopped
    afterwards; skips with a sentence when Orthanc or the scans are missing."""
    require_orthanc()
    if not UNCOMPRESSED_SERIES.is_dir():
        pytest.skip(f"the real scans are not at {DATA} (they sit beside the repository in CI)")
    server = Orthanc(folder, settings).start()
    try:
        server.upload(*files())
        yield server
    finally:
        server.stop()
