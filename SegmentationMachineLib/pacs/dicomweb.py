"""DICOMweb: a series fetched from a PACS (QIDO-RS, WADO-RS) and a DICOM SEG stored back (STOW-RS).

Through dicomweb-client, which Slicer bundles too. The source is written `dicomweb+https://HOST/dicom-web`.
Credentials come from the environment or the keychain, never from the command line or the URL (both show
in `ps` and in logs), and travel only as an Authorization header. Every failure is one sentence that
names the server and the cause.
"""

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests
from urllib3.exceptions import ProtocolError

from ..core.addresses import DICOMWEB_PREFIX, is_loopback
from ..core.credentials import SecretStore
from ..core.errors import UserError, install_extra, untrusted_certificate
from ..core.files import printable
from ..dicom.transfer_syntaxes import undecodable
from ..dicom.uids import is_uid

TOKEN_VARIABLE = "SM_DICOMWEB_TOKEN"  # bearer token (OAuth 2 access token)
USER_VARIABLE, PASSWORD_VARIABLE = "SM_DICOMWEB_USER", "SM_DICOMWEB_PASSWORD"  # HTTP basic
# What a refusal (401, 403) asks of the user; the module, whose credentials are saved in it, says its own.
SET_CREDENTIALS = f"set {TOKEN_VARIABLE}, or {USER_VARIABLE} and {PASSWORD_VARIABLE}, to credentials it accepts"
TIMEOUT = (10, 120)  # seconds to connect, and between two reads of an answer
# A series is asked for as stored (JPEG 2000 too, which Slicer decodes), and only where that is a syntax Slicer cannot
# decode (HTJ2K), once more as explicit VR little endian. One syntax per request: servers choose differently among
# several (Orthanc 1.10 heeds the last, Orthanc's DICOMweb 1.14 and Azure the first), Azure refuses to transcode a
# series of more than one instance (HTTP 406), and Orthanc 1.10 fails (HTTP 500) to transcode JPEG 2000.
AS_STORED = (("application/dicom", "*"),)
TRANSCODED = (("application/dicom", "1.2.840.10008.1.2.1"),)
SERIES_PAGE = 100  # series asked for per search: Azure sends at most 200, dcm4chee 1000, and cut the list there
# A PACS may answer a STOW-RS with success and not keep the instance (a filter): QIDO-RS looks for it after these
# waits (seconds), for a server that indexes what it received a moment later.
CONFIRM_WAITS = (0, 0.5, 1, 2)
UNSEARCHABLE = (400, 401, 403, 405, 501)  # a search refused or not offered: what was stored cannot be confirmed
# Why a STOW-RS server did not store an instance: FailureReason (0008,1197), PS3.18 10.5.3 and PS3.4 Annex B.
FAILURE_REASONS = {0x0110: "processing failure", 0x0111: "the instance is already stored",
                   0x0122: "it does not take this SOP class", 0x0124: "not authorized",
                   0xC122: "it does not take this transfer syntax"}
FAILURE_REASON_RANGES = ((0xA700, 0xA7FF, "out of resources"), (0xA900, 0xA9FF, "the data set does not match its "
                         "SOP class"), (0xC000, 0xCFFF, "it cannot understand the data set"))
# Series that hold no image slices: never the default choice.
NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "PR", "KO", "REG", "DOC", "AU", "ECG", "PLAN"}
_QIDO_FIELDS = ["SeriesNumber", "SeriesDescription", "Modality", "NumberOfSeriesRelatedInstances"]


@dataclass(frozen=True)
class DicomWebServer:
    url: str  # http(s)://HOST[:PORT]/ROOT, as dicomweb-client wants it

    @classmethod
    def parse(cls, source: str) -> "DicomWebServer":
        shown = printable(source)
        parts = urlsplit(source[len(DICOMWEB_PREFIX):])
        if parts.username is not None or parts.password is not None:
            raise UserError("Credentials in a DICOMweb address would show in the process list and in logs: remove "
                            f"them and set {TOKEN_VARIABLE}, or {USER_VARIABLE} and {PASSWORD_VARIABLE}, instead.")
        if parts.query or parts.fragment:  # not shown: it may hold a token
            raise UserError("The DICOMweb address has a query or fragment (?... or #...): give only the server's "
                            f"DICOMweb root, and a token in {TOKEN_VARIABLE}.")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"'{shown}' is not a DICOMweb address: write dicomweb+https://HOST/dicom-web "
                            "(the server's DICOMweb root).")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise UserError(f"'{shown}' would send patient data and credentials unencrypted: use dicomweb+https "
                            "(plain http is only for this computer, e.g. through an SSH tunnel to 127.0.0.1).")
        return cls(f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}")

    @property
    def keychain_suffix(self) -> str:
        """HOST[_PORT], as a keychain name (or a file name where no keychain works) can hold it."""
        return re.sub(r"[^A-Za-z0-9.-]", "_", urlsplit(self.url).netloc)

    def keychain_names(self) -> tuple:
        """The keychain names of this server's token, user and password."""
        return tuple(f"dicomweb-{kind}-{self.keychain_suffix}" for kind in ("token", "user", "password"))


class BearerAuth(requests.auth.AuthBase):
    """Authorization: Bearer; requests drops it when a redirect leads to another host."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self):
        return "BearerAuth(***)"


def credentials(server: DicomWebServer, environ=os.environ, store: SecretStore = None):
    """The requests auth for server: the environment first, else the keychain; None: ask without."""
    token, user, password = environ.get(TOKEN_VARIABLE), environ.get(USER_VARIABLE), environ.get(PASSWORD_VARIABLE)
    if not (token or user or password):
        store = store or SecretStore()
        token, user, password = (store.load(name) for name in server.keychain_names())
    if token:
        token = re.sub(r"(?i)^bearer\s+", "", token.strip())  # pasted with its scheme
        if not re.fullmatch(r"[\x21-\x7e]+", token):  # never shown: it is a secret
            raise UserError(f"The bearer token for {server.url} holds characters no token has (spaces, line breaks or "
                            "letters outside ASCII): copy it again, whole.")
        return BearerAuth(token)
    if bool(user) != bool(password):
        raise UserError(f"Give both {USER_VARIABLE} and {PASSWORD_VARIABLE} for {server.url} (HTTP basic "
                        f"authentication), or a bearer token in {TOKEN_VARIABLE}.")
    return (user.encode("utf-8"), password.encode("utf-8")) if user else None  # requests would send Latin-1


class _Session(requests.Session):
    """Every request with our timeout: a server that stops answering is an error, not a hang. dicomweb-client
    0.60 (Slicer's) sets none, 0.61 its own 20 s, short for a PACS that first fetches a series from its archive."""

    def __init__(self, timeout):
        super().__init__()
        self.timeout = timeout
        self.last_answer = None  # what the store's answer says is read from here, not as dicomweb-client parses it

    def request(self, method, *args, **kwargs):
        kwargs["timeout"] = self.timeout
        headers = kwargs.get("headers")
        if headers and "Host" in headers:  # dicomweb-client's lacks the port (an IPv6 host whole) and outlives a redirect
            kwargs["headers"] = {name: value for name, value in headers.items() if name != "Host"}
        try:
            self.last_answer = super().request(method, *args, **kwargs)
        except requests.ConnectionError as error:
            # A server closes a kept-alive connection when it likes (Orthanc after a second idle): a request sent as it
            # does fails at once. A read is sent once more, on a new connection; a store is never sent twice.
            dropped = error.args and isinstance(error.args[0], (ProtocolError, ConnectionResetError))
            if method.upper() not in ("GET", "HEAD") or not dropped:
                raise
            self.last_answer = super().request(method, *args, **kwargs)
        return self.last_answer


def _text(dataset, keyword) -> str:
    value = dataset.get(keyword, "")
    return printable(str(value if value is not None else "")).strip()


@dataclass
class RemoteSeries:
    uid: str
    modality: str
    description: str
    number: str
    instances: int

    @property
    def is_image(self) -> bool:
        return self.modality.upper() not in NON_IMAGE_MODALITIES

    def summary(self) -> str:
        label = self.description or f"series {self.number or '?'}"
        count = f"{self.instances} instance(s), " if self.instances else ""  # not every PACS says
        return f"{self.modality or '?'} '{label}', {count}uid {self.uid}"


def _check_uid(uid: str, what: str):
    """A UID goes into the request's path: anything else is the user's typo, said before any request."""
    if not is_uid(uid):
        raise UserError(f"'{printable(uid)}' is not a {what} (digits and dots, e.g. 1.2.840.113619.2.55.3): "
                        "copy it from the PACS viewer's study information.")


def _status(error: requests.HTTPError) -> int:
    return error.response.status_code if error.response is not None else 0


def _cause(error: requests.RequestException, timeout) -> str:
    """A short cause from requests' long message (which repeats the URL and urllib3's internals)."""
    if isinstance(error, requests.Timeout):
        return f"no answer within {max(timeout):g} s"
    if isinstance(error, requests.exceptions.SSLError):
        return "the TLS handshake failed"
    found = re.search(r"\[Errno -?\d+\] ([^)'\"\]]+)", str(error))
    return found.group(1).strip().rstrip(".").lower() if found else type(error).__name__


def failure_reason(code) -> str:
    """A STOW-RS FailureReason in words, with its code as the standard writes it (None: an item without one)."""
    if code is None:
        return "no failure reason given"
    ranges = (text for low, high, text in FAILURE_REASON_RANGES if low <= code <= high)
    words = FAILURE_REASONS.get(code) or next(ranges, "a reason the DICOM standard does not name")
    return f"failure reason 0x{code:04X}: {words}"


def _failure_codes(response) -> list:
    """The FailureReason of each FailedSOPSequence item of a STOW-RS answer's body (DICOM JSON or XML, whatever its
    Content-Type says: Orthanc 1.10 sends none with its 409), None for an item without one; [] for a body that has
    none."""
    text = response.text.strip() if response is not None else ""
    try:
        if text.startswith("<"):
            from xml.etree import ElementTree

            tree = ElementTree.fromstring(text)
            return [int(value.text) for value in tree.iterfind(
                ".//{*}DicomAttribute[@tag='00081198']//{*}DicomAttribute[@tag='00081197']/{*}Value")]
        items = json.loads(text).get("00081198", {}).get("Value", [])
        return [int(item["00081197"]["Value"][0]) if "00081197" in item else None for item in items]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # not DICOM JSON or XML: no reason known
        return []


class DicomWeb:
    """One DICOMweb server, with its credentials."""

    def __init__(self, server: DicomWebServer, auth=None, timeout=TIMEOUT, set_credentials: str = SET_CREDENTIALS):
        try:
            from dicomweb_client.api import DICOMwebClient
        except ImportError:
            raise UserError(f"DICOMweb needs dicomweb-client: {install_extra('pacs')} (Slicer bundles it).") from None

        self.server = server
        self._set_credentials = set_credentials
        self._session = _Session(timeout)
        self._session.auth = auth
        self._client = DICOMwebClient(server.url, session=self._session)
        self._client.set_http_retry_params(retry=False)  # an unanswered request is said at once, not in 30 s
        # dicomweb-client 0.60-0.61 counts application/dicom once per transfer syntax and then refuses a series asked
        # for in several (ValueError): counted once, as its docstring says it should be.
        common = getattr(self._client, "_get_common_media_types", None)
        if common is not None:  # a private method: a later dicomweb-client may have none, or no such bug
            self._client._get_common_media_types = lambda media_types=None: list(dict.fromkeys(common(media_types)))

    @contextmanager
    def _asking(self, what: str):
        """Turns every failure of one request into the user's sentence; what names the item asked for."""
        url, timeout = self.server.url, self._session.timeout  # the cause is said, never requests' long text
        try:
            yield
        except requests.HTTPError as error:
            status = _status(error)
            if status in (401, 403):
                expiry = "; an access token, e.g. from gcloud or az, expires after about an hour" if isinstance(
                    self._session.auth, BearerAuth) else ""
                raise UserError(f"The DICOMweb server {url} refused access (HTTP {status}{expiry}): "
                                f"{self._set_credentials}.") from None
            codes = _failure_codes(error.response)
            if codes:  # a STOW-RS refusal (409 for a conflict): its reason, as retrying would not help
                raise UserError(f"The DICOMweb server {url} refused {what} (HTTP {status}, "
                                f"{failure_reason(codes[0])}): ask its administrator why it does not take it."
                                ) from None
            if status == 404:
                raise UserError(f"The DICOMweb server {url} answered 'not found' (HTTP 404) for {what}: check the "
                                "UID, and that the address is the server's DICOMweb root (e.g. https://HOST/dicom-web)."
                                ) from None
            if status == 413:
                raise UserError(f"The DICOMweb server {url} found {what} too large (HTTP 413): ask its administrator "
                                "to raise its upload limit (or its proxy's, such as nginx's client_max_body_size)."
                                ) from None
            advice = "try again later or ask its administrator" if status == 429 or status >= 500 else \
                "ask its administrator whether it offers this request"
            raise UserError(f"The DICOMweb server {url} answered HTTP {status} to the request for {what}: "
                            f"{advice}.") from None
        except (requests.ConnectionError, requests.Timeout) as error:
            if untrusted_certificate(error):  # a hospital's own CA, or a proxy that inspects TLS and re-signs
                raise UserError(f"The DICOMweb server {url} shows a certificate this computer does not trust "
                                f"({untrusted_certificate(error)}): set REQUESTS_CA_BUNDLE to your organisation's "
                                "CA certificates.") from None
            raise UserError(f"Cannot reach the DICOMweb server {url} ({_cause(error, timeout)}): check the address "
                            "and that the server is running.") from None
        except (ValueError, KeyError, pydicom.errors.InvalidDicomError) as error:
            # an HTML page, JSON that is not DICOM JSON, a multipart answer without DICOM parts
            raise UserError(f"{url} did not answer as a DICOMweb server when asked for {what} "
                            f"({type(error).__name__}): check that the address is its DICOMweb root "
                            "(e.g. https://HOST/dicom-web).") from None
        except requests.RequestException as error:  # too many redirects, a broken answer
            raise UserError(f"The request to the DICOMweb server {url} for {what} failed "
                            f"({_cause(error, timeout)}): try again, or ask its administrator.") from None

    def series(self, study: str) -> list:
        """The series of study (QIDO-RS): image series first, in series number order."""
        _check_uid(study, "StudyInstanceUID")
        with self._asking(f"study {study}"):
            found = self._all_series(study)
            series = [RemoteSeries(_text(d, "SeriesInstanceUID"), _text(d, "Modality"),
                                   _text(d, "SeriesDescription"), _text(d, "SeriesNumber"),
                                   int(d.get("NumberOfSeriesRelatedInstances") or 0)) for d in found]
        if not series:
            raise UserError(f"The DICOMweb server {self.server.url} has no study {study}: check the "
                            "StudyInstanceUID (in the PACS viewer: study information).")
        return sorted(series, key=lambda s: (not s.is_image, int(s.number) if s.number.isdigit() else 1e9, s.uid))

    def _all_series(self, study: str) -> list:
        """Page by page, as a server cuts a long list (with no more than a Warning header, if that), until a page
        brings nothing new: a server may cut pages shorter than asked, or ignore the offset and send the same again."""
        found, uids = [], set()
        while True:
            page = [pydicom.Dataset.from_json(item) for item in self._client.search_for_series(
                study_instance_uid=study, fields=_QIDO_FIELDS, limit=SERIES_PAGE, offset=len(found))]
            new = [d for d in page if _text(d, "SeriesInstanceUID") not in uids]
            found += new
            uids.update(_text(d, "SeriesInstanceUID") for d in new)
            if not new:
                return found

    def choose_series(self, study: str, selector: str = None) -> RemoteSeries:
        """The series named by UID or by its number in series(); with none, the study's only image series."""
        series = self.series(study)
        listing = "; ".join(f"{n}. {s.summary()}" for n, s in enumerate(series, 1))
        if selector:
            if selector.isdigit() and 1 <= int(selector) <= len(series):
                return series[int(selector) - 1]
            for item in series:
                if item.uid == selector:
                    return item
            raise UserError(f"Study {study} on {self.server.url} has no series '{printable(selector)}': "
                            f"give --series with one of: {listing}.")
        images = [s for s in series if s.is_image]
        if len(images) == 1:
            return images[0]
        if not images:
            raise UserError(f"Study {study} on {self.server.url} has no image series ({listing}): choose a "
                            "study with a CT or MR series.")
        raise UserError(f"Study {study} on {self.server.url} has {len(images)} image series: choose one with "
                        f"--series NUMBER or UID: {listing}.")

    def retrieve(self, study: str, series: RemoteSeries, folder: Path, progress=None) -> list:
        """The series' instances (WADO-RS: as stored; where that is a syntax Slicer cannot decode, transcoded to
        explicit VR little endian where the server does) written into folder as 00001.dcm...; their paths."""
        _check_uid(study, "StudyInstanceUID")
        url, what = self.server.url, f"series {series.uid} of study {study}"
        with self._asking(what):
            paths, problem = self._fetch(study, series, folder, AS_STORED, progress)
            if problem:
                try:
                    paths, problem = self._fetch(study, series, folder, TRANSCODED, progress)
                except requests.HTTPError as error:
                    if _status(error) in (401, 403, 429, 502, 503, 504):  # said as such
                        raise
                    # refused (Azure: 406) or failed (Orthanc 1.10: 500): it does not transcode this series
        if problem:  # said now, not as a reader failure once the whole series is here
            raise UserError(f"The DICOMweb server {url} sent series {series.uid} {problem}, and does not transcode "
                            "it to explicit VR little endian when asked: ask its administrator for the series "
                            "uncompressed or as JPEG 2000.")
        answer = self._session.last_answer
        if answer is not None and answer.status_code == 206:  # dcm4chee, where instances are offline
            warning = printable(answer.headers.get("Warning", ""))[:200]
            raise UserError(f"The DICOMweb server {url} sent only part of series {series.uid} (HTTP 206"
                            f"{': ' + warning if warning else ''}): try again later, or ask its administrator to "
                            "bring the series back from its archive.")
        if len(paths) < series.instances:
            raise UserError(f"The DICOMweb server {url} sent {len(paths)} of the {series.instances} instances of "
                            f"series {series.uid}: try again later, or check the series in the PACS.")
        if not paths:
            raise UserError(f"The DICOMweb server {url} sent no instance of series {series.uid}: "
                            "check the series in the PACS.")
        return paths

    def _fetch(self, study: str, series: RemoteSeries, folder: Path, media_types, progress) -> tuple:
        """(the files written, None), or ([], why) at the first instance Slicer cannot decode; those written then
        are removed."""
        paths, instances = [], self._client.iter_series(study, series.uid, media_types=media_types)
        for dataset in instances:
            problem = undecodable(getattr(dataset, "file_meta", {}).get("TransferSyntaxUID"))
            if problem:
                instances.close()
                for path in paths:
                    path.unlink()
                return [], problem
            paths.append(Path(folder) / f"{len(paths) + 1:05d}.dcm")
            dataset.save_as(paths[-1])
            if progress:
                progress(len(paths), max(series.instances, len(paths)), series.uid)
        return paths, None

    def store(self, path: Path) -> "Stored":
        """Stores one DICOM file (STOW-RS) in its study and confirms (QIDO-RS) that the server kept it; returns its
        header, with a sentence where the server cannot be searched for it."""
        dataset = pydicom.dcmread(path)
        study, name = dataset.StudyInstanceUID, Path(path).name
        with self._asking(f"the store of {name} in study {study}"):
            answer = self._client.store_instances([dataset], study_instance_uid=study)
        # A success status (200, or 202 for "some failed") may still list it as failed. dicomweb-client reads the
        # list only under an exact Content-Type ('application/dicom+json; charset=utf-8' gets an empty answer).
        failed = _failure_codes(self._session.last_answer) or [None] * len(answer.get("FailedSOPSequence") or [])
        if failed:
            reason = failure_reason(failed[0])
            raise UserError(f"The DICOMweb server {self.server.url} did not store {name} ({reason}): ask its "
                            "administrator whether it accepts DICOM SEG objects.")
        listed = self._lists(dataset)
        if listed is False:
            raise UserError(f"The DICOMweb server {self.server.url} accepted {name} but did not keep it (it is not in "
                            f"study {study} afterwards): ask its administrator whether it filters DICOM SEG objects.")
        if listed is True:
            return Stored(dataset)
        return Stored(dataset, f"The DICOMweb server {self.server.url} stored {name}, but whether it kept it could not "
                               f"be checked (HTTP {listed} to a search for it): look for it in the PACS.")

    def _lists(self, dataset: pydicom.Dataset):
        """Whether QIDO-RS finds the instance in its series: a PACS may answer a STOW-RS with success and drop the
        instance (an Orthanc ReceivedInstanceFilter does). The HTTP status instead where this server, or these
        credentials, may store but not search (push-only accounts): not confirmable."""
        study, series, instance = dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
        for wait in CONFIRM_WAITS:
            time.sleep(wait)
            with self._asking(f"the instance {instance} just stored in study {study}"):
                try:
                    found = self._client.search_for_instances(study, series,
                                                              search_filters={"SOPInstanceUID": instance})
                except requests.HTTPError as error:
                    status = _status(error)
                    if status in UNSEARCHABLE:
                        return status
                    if status != 404:
                        raise
                    found = []  # no such series (yet)
            if any(item.get("00080018", {}).get("Value") == [instance] for item in found):
                return True
        return False


@dataclass
class Stored:
    dataset: pydicom.Dataset  # the header of what was stored
    unconfirmed: str = ""  # the sentence, where the server could not be searched for it


def kept(error: UserError, path: Path) -> UserError:
    """error, saying where the DICOM SEG that was not stored stays."""
    return UserError(f"{str(error).rstrip('.')}; the DICOM SEG stays in {path}.")
