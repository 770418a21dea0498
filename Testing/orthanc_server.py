"""A real Orthanc (Debian packages orthanc + orthanc-dicomweb) started on loopback for the tests.

Basic authentication is on, so every request the client makes is checked against a registered user;
the DICOM port (C-STORE, C-FIND) is open too, for the tests of the DICOM node.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import DATA, UNCOMPRESSED_SERIES
from nninteractive_server import free_port  # noqa: F401 (also sets NO_PROXY for loopback)

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGINS = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGINS / "libOrthancDicomWeb.so"
HOW_TO_GET_IT = ("Orthanc with its DICOMweb plugin is not installed: apt-get install orthanc orthanc-dicomweb "
                 "(scripts/test.sh does it where apt-get is usable)")
USER, PASSWORD = "sm-test", "orthanc-Test-Password-7c1e"
AET = "ORTHANCTEST"


def require_orthanc():
    """Skips the calling test (or module) with how to install Orthanc when it is missing."""
    if not (ORTHANC.exists() or shutil.which("Orthanc")) or not DICOMWEB_PLUGIN.exists():
        pytest.skip(HOW_TO_GET_IT)


class Orthanc:
    """One Orthanc process with its own storage under folder, on free loopback ports."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
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
            except requests.ConnectionError:
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


def serving(folder: Path, files):
    """For a fixture: yields an Orthanc in folder loaded with files() (the real scans' paths), stopped afterwards;
    skips with a sentence when Orthanc or the scans are missing."""
    require_orthanc()
    if not UNCOMPRESSED_SERIES.is_dir():
        pytest.skip(f"the real scans are not at {DATA} (they sit beside the repository in CI)")
    server = Orthanc(folder).start()
    try:
        server.upload(*files())
        yield server
    finally:
        server.stop()
