"""Read study headers from a PACS over DICOMweb: QIDO-RS lists the studies, WADO-RS ``metadata``
returns the DICOM JSON of every instance of one study (no pixel data) in one request.

DICOM JSON instances become the same plain records the file readers produce: each value is turned
back into the element bytes it stands for and decoded by ``fields.add_value``, so both sources share
one decoder (numbers, multi-valued elements, padding, invalid values) and cannot drift apart.

Credentials come from environment variables only and never appear in messages or reprs.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping
from urllib.parse import urlsplit

import pydicom
import requests
from requests.adapters import HTTPAdapter

from beam_pipeline.codes import DOSE_REPORT_KEY, Reason, SourceUnavailable
from beam_pipeline.dicom import dose_report
from beam_pipeline.dicom.fields import Attribute, FieldSpec, add_value, encodings_for
from beam_pipeline.dicom.header import classify
from beam_pipeline.dicom.records import ERROR, INSTANCE, DoseReport, HeaderResult, ParsedHeader
from beam_pipeline.sources.retry import RetryBudget, RetryPolicy, requests_attempt, retrying

TOKEN_ENV = "DICOMWEB_TOKEN"
USER_ENV = "DICOMWEB_USER"
PASSWORD_ENV = "DICOMWEB_PASSWORD"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UTF8 = ["utf_8"]  # DICOM JSON strings are Unicode already
_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_SINGLE_VALUE_TEXT = frozenset({"LT", "ST", "UT"})
_DATE = re.compile(r"^[0-9]{8}$")
_CHARSET_TAG = 0x00080005


class DicomWebError(Exception):
    """The server cannot be used at all (unreachable, refused credentials, not DICOMweb).
    The message is one line for the console: no credentials, no traceback needed."""


# ---------------------------------------------------------------------------------------------
# Settings


class RetryingSession(requests.Session):
    """A session whose every request (QIDO searches, WADO metadata) is retried under the sources'
    one policy (``retry.retrying``): transient statuses, and with ``network_errors`` dropped
    connections, timeouts and broken-off bodies; past the deadline ``SourceUnavailable``."""

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None, what: str, network_errors: bool = True):
        super().__init__()
        self.policy, self.budget, self.what, self.network_errors = policy, budget, what, network_errors

    def send(self, request, **kwargs):
        send = super().send
        return retrying(requests_attempt(lambda: send(request, **kwargs), self.what, self.network_errors),
                        self.policy, self.budget)


class _BearerAuth(requests.auth.AuthBase):
    def __init__(self, token: str):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


@dataclass(frozen=True)
class Credentials:
    """A bearer token or basic credentials, read from the environment; never shown in a repr."""

    token: str | None = field(default=None, repr=False)
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Credentials":
        token = environ.get(TOKEN_ENV) or None
        user = environ.get(USER_ENV) or None
        password = environ.get(PASSWORD_ENV)
        if token and user:
            raise DicomWebError(f"set either {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}, not both")
        if user and password is None:
            raise DicomWebError(f"{USER_ENV} is set but {PASSWORD_ENV} is not")
        if password is not None and not user:
            raise DicomWebError(f"{PASSWORD_ENV} is set but {USER_ENV} is not")
        return cls(token=token, user=user, password=password)

    def auth(self):
        if self.token:
            return _BearerAuth(self.token)
        if self.user:
            return (self.user, self.password or "")
        return None


@dataclass(frozen=True)
class Connection:
    """Where and how to talk to the server: shared by the launcher's check and the workers."""

    url: str
    credentials: Credentials = Credentials()
    connect_timeout: float = 10.0
    read_timeout: float = 120.0     # one study's metadata can be large
    retry: RetryPolicy = RetryPolicy()  # for 408/429/5xx and network errors, as gs:// requests
    page_size: int = 1000           # QIDO limit per listing request
    max_in_flight: int = 8          # concurrent metadata requests per worker
    verify: bool | str = True       # TLS verification; a path is a CA bundle

    def __post_init__(self):
        check_url(self.url)

    def session(self, budget: RetryBudget | None = None, network_errors: bool = True) -> requests.Session:
        session = RetryingSession(self.retry, budget, safe_url(self.url), network_errors)
        adapter = HTTPAdapter(max_retries=0, pool_maxsize=max(self.max_in_flight, 1))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.auth = self.credentials.auth()
        session.verify = self.verify
        return session

    def client(self, budget: RetryBudget | None = None, timeout: float | None = None, network_errors: bool = True):
        """A client whose requests retry under ``retry`` (a worker's ``budget`` bounding the
        retry sleeps of all its clients); the start-up check passes a short ``timeout`` and
        ``network_errors=False``: no answer at all fails it at once."""
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.url, session=self.session(budget, network_errors),
                                timeout=(timeout or self.connect_timeout, timeout or self.read_timeout))
        client.set_http_retry_params(retry=False)  # the session retries, under the sources' one policy
        return client


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DicomWebError(f"--dicomweb must be an http(s) URL of the DICOMweb root, got {safe_url(url)!r}")
    if parts.username or parts.password:
        raise DicomWebError(f"put credentials in {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}, not in the URL")


def safe_url(url: str) -> str:
    """The URL without user info or query, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


@dataclass(frozen=True)
class StudyQuery:
    """Which studies: a StudyDate range (YYYYMMDD, either end open) and explicit StudyInstanceUIDs
    (each queried with the date range) go to QIDO-RS; the modality is matched here, against the
    ModalitiesInStudy each listed study carries. Servers that match ModalitiesInStudy after
    paging (Orthanc 1.10 with DICOMweb 1.7) return short or empty pages while matches remain,
    which would lose studies silently; the listing is small, the studies are what costs."""

    date_from: str | None = None
    date_to: str | None = None
    modality: str | None = None
    study_uids: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None and not _DATE.match(value):
                raise DicomWebError(f"--study-{name.replace('_', '-')} must be YYYYMMDD, got {value!r}")
        for uid in self.study_uids:
            if not _UID.match(uid):
                raise DicomWebError(f"--study-uid {uid!r} is not a DICOM UID")

    def filters(self) -> list[dict]:
        """One QIDO filter set per request series (one per given study UID, else one)."""
        base = {}
        if self.date_from or self.date_to:
            base["StudyDate"] = f"{self.date_from or ''}-{self.date_to or ''}"
        if not self.study_uids:
            return [base]
        return [{**base, "StudyInstanceUID": uid} for uid in dict.fromkeys(self.study_uids)]

    def matches(self, dataset: dict) -> bool:
        """Whether a listed study (QIDO result) passes the filters applied here (the modality)."""
        if not self.modality:
            return True
        values = (dataset.get("00080061") or {}).get("Value") or ()
        return self.modality.strip().upper() in {str(v).strip().upper() for v in values if v is not None}


# ---------------------------------------------------------------------------------------------
# Listing (QIDO-RS)


def _status_message(status: int, url: str) -> str:
    if status == 401:
        return (f"DICOMweb server {safe_url(url)} answered HTTP 401 Unauthorized: check {TOKEN_ENV} "
                f"or {USER_ENV}/{PASSWORD_ENV}")
    if status == 403:
        return f"DICOMweb server {safe_url(url)} answered HTTP 403 Forbidden: the credentials lack access"
    if status in (400, 404, 405):
        return (f"DICOMweb server {safe_url(url)} answered HTTP {status} to a study search: "
                "is this the DICOMweb root?")
    return f"DICOMweb server {safe_url(url)} answered HTTP {status} to a study search"


# What a listed study's stamp is made of (a later run fetches a study again when it differs):
# its series and instance counts, which a generic PACS keeps and QIDO returns (an added series, an
# added or deleted instance), and the study-level attributes a correction usually touches.
# An instance corrected in place under the same UIDs changes neither: QIDO offers no sound
# criterion for that, so a run without --since is the way to pick such corrections up.
_COUNT_TAGS = ("00201206", "00201208")  # NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances
_STAMP_TAGS = _COUNT_TAGS + (
    "00080020", "00080030", "00080050", "00080061", "00080090", "00081030",  # date, time, accession,
    "00100010", "00100020", "00100021", "00100030", "00100040", "00200010")  # modalities, physician,
# description; the patient's name, id, issuer, birth date, sex; the study id
_LISTED_FIELDS = ["StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances", "StudyDate", "StudyTime", "AccessionNumber",
                  "ReferringPhysicianName", "StudyDescription", "PatientName", "PatientID",
                  "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyID"]


def study_stamp(dataset: dict) -> str | None:
    """A listed study's stamp: its counts and a digest of its study-level attributes (no patient
    data in clear), or None when the server returns no counts (then the study is always fetched)."""
    counts = []
    for tag in _COUNT_TAGS:
        values = (dataset.get(tag) or {}).get("Value") or ()
        if not values or not str(values[0]).strip().isdigit():
            return None
        counts.append(str(values[0]).strip())
    attributes = {tag: (dataset.get(tag) or {}).get("Value") for tag in _STAMP_TAGS}
    digest = hashlib.sha256(json.dumps(attributes, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
    return f"{counts[0]}:{counts[1]}:{digest}"


def _search(client, url: str, filters: dict, limit: int, offset: int) -> list[dict]:
    try:
        page = client.search_for_studies(search_filters=dict(filters), limit=limit, offset=offset,
                                         fields=_LISTED_FIELDS)
    except requests.HTTPError as exc:
        raise DicomWebError(_status_message(exc.response.status_code, url)) from None
    except requests.exceptions.SSLError as exc:
        raise DicomWebError(f"TLS verification of {safe_url(url)} failed: {type(exc).__name__}") from None
    except SourceUnavailable as exc:  # still failing past the retry deadline
        raise DicomWebError(f"DICOMweb server {exc.strerror} (study search)") from None
    except requests.RequestException as exc:
        raise DicomWebError(f"cannot reach DICOMweb server {safe_url(url)}: {_network_reason(exc)}") from None
    except ValueError as exc:  # not JSON
        raise DicomWebError(f"{safe_url(url)} did not answer a study search with DICOM JSON "
                            f"({type(exc).__name__}): is this the DICOMweb root?") from None
    if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
        raise DicomWebError(f"{safe_url(url)} did not answer a study search with DICOM JSON: "
                            "is this the DICOMweb root?")
    return page


def _network_reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                   "Temporary failure in name resolution", "Connection reset"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def _uid_of(dataset: dict) -> str | None:
    values = (dataset.get("0020000D") or {}).get("Value") or ()
    return str(values[0]).strip() if values else None


CHECK_TIMEOUT = 15.0  # seconds for the start-up check's one request


def check_server(connection: Connection, query: StudyQuery) -> None:
    """One small search with a short timeout: fail fast with one clear line before building a
    pipeline (a server that refuses connections or never answers must not stall the start); a
    transient answer (a PACS restarting: 503) is waited out under the retry policy."""
    client = connection.client(timeout=CHECK_TIMEOUT, network_errors=False)
    _search(client, connection.url, query.filters()[0], limit=1, offset=0)


def list_studies(connection: Connection, query: StudyQuery, client=None) -> Iterator[str]:
    """Every matching StudyInstanceUID (see ``list_stamped_studies``)."""
    return (uid for uid, _ in list_stamped_studies(connection, query, client))


def list_stamped_studies(connection: Connection, query: StudyQuery, client=None) -> Iterator[tuple[str, str | None]]:
    """(StudyInstanceUID, stamp) of every matching study, page by page (limit/offset) until an empty page.

    A page shorter than asked is not taken as the end: servers cap results per request (Orthanc's
    LimitFindResults, dcm4chee's max results), so only an empty page ends the listing.
    Raises DicomWebError when the server cannot be used or ignores the offset.
    """
    client = client or connection.client()
    for filters in query.filters():
        offset, previous_first = 0, None
        while True:
            page = _search(client, connection.url, filters, connection.page_size, offset)
            if not page:
                break
            first = _uid_of(page[0])
            if offset and first is not None and first == previous_first:
                raise DicomWebError(f"DICOMweb server {safe_url(connection.url)} ignores the QIDO offset "
                                    "parameter: cannot page through the studies")
            previous_first = first
            for dataset in page:
                uid = _uid_of(dataset)
                if uid and query.matches(dataset):
                    yield uid, study_stamp(dataset)
            offset += len(page)


# ---------------------------------------------------------------------------------------------
# Fetching (WADO-RS metadata)


@dataclass(frozen=True)
class FetchedStudy:
    """The DICOM JSON instances of one study, or the error record that replaces them."""

    study_uid: str
    instances: list | None = None
    error: dict | None = None


def _fetch_error(reason: str, uid: str, status: int | None, detail: str) -> dict:
    return {"reason": reason, "study_uid": uid, "status": status, "detail": detail}


def fetch_study(client, study_uid: str) -> FetchedStudy:
    """GET /studies/{uid}/metadata. Never raises for server or network trouble: an error record.

    Transient answers, dropped connections and bodies broken off are retried in the client's
    session (``RetryingSession``); still failing past the deadline, the study is ``unavailable``
    (worth another run), as a gs:// object would be.
    """
    if not _UID.match(study_uid):
        return FetchedStudy(study_uid, error=_fetch_error(
            Reason.INVALID_UID, study_uid, None, "the server listed a StudyInstanceUID that is not a DICOM UID"))
    try:
        instances = client.retrieve_study_metadata(study_uid)
    except SourceUnavailable as exc:
        return FetchedStudy(study_uid, error=_fetch_error(
            Reason.UNAVAILABLE, study_uid, None, exc.strerror or "server unavailable"))
    except requests.HTTPError as exc:
        status = exc.response.status_code
        if status in (404, 410):
            return FetchedStudy(study_uid, error=_fetch_error(
                Reason.STUDY_NOT_FOUND, study_uid, status, "the study was listed but is no longer on the server"))
        return FetchedStudy(study_uid, error=_fetch_error(
            Reason.FETCH_FAILED, study_uid, status, f"HTTP {status} for the study metadata"))
    except requests.RequestException as exc:  # not retried: TLS, a malformed answer
        return FetchedStudy(study_uid, error=_fetch_error(
            Reason.FETCH_FAILED, study_uid, None, f"network error: {_network_reason(exc)}"))
    except ValueError as exc:  # body is not JSON
        return FetchedStudy(study_uid, error=_fetch_error(
            Reason.FETCH_FAILED, study_uid, 200, f"the metadata is not DICOM JSON: {type(exc).__name__}"))
    if not instances:
        return FetchedStudy(study_uid, error=_fetch_error(
            Reason.STUDY_NOT_FOUND, study_uid, 200, "the server returned no instance for the study"))
    return FetchedStudy(study_uid, instances=list(instances))


# ---------------------------------------------------------------------------------------------
# DICOM JSON -> record


def read_instance(dataset: dict, spec: FieldSpec) -> HeaderResult:
    """One DICOM JSON instance -> the HeaderResult a file with the same header gives."""
    if not isinstance(dataset, dict):
        return HeaderResult(ERROR, reason=Reason.UNREADABLE, detail="metadata item is not a DICOM JSON object")
    record = json_record(dataset, spec.attributes, None)
    result = classify(ParsedHeader({}, record, truncated=False))
    if result.kind == INSTANCE and spec.dose_concepts and dose_report.is_dose_report(result.record):
        result.record[DOSE_REPORT_KEY] = json_dose_report(dataset, spec)
    return result


def json_dose_report(dataset: dict, spec: FieldSpec) -> DoseReport:
    """The dose values of a dose report's DICOM JSON (WADO-RS metadata carries its content tree)."""
    try:
        ds = pydicom.Dataset.from_json(dataset)
    except Exception:  # malformed DICOM JSON inside the tree: the instance itself was read
        return DoseReport(problems=(dose_report.UNREADABLE,))
    return dose_report.read_report(ds, spec.dose_concepts)


def json_record(dataset: dict, attributes: tuple[Attribute, ...], inherited: list[str] | None) -> dict:
    """The record of a DICOM JSON dataset for the given attributes (see ``fields``)."""
    record: dict = {}
    charset = _charset(dataset, inherited)
    for attr in attributes:
        if attr.tag == _CHARSET_TAG:
            continue  # read for decoding only, as the file readers do
        element = dataset.get(f"{attr.tag:08X}")
        if not isinstance(element, dict):
            continue
        if attr.vr == "SQ":
            items = [json_record(item, attr.items, charset) for item in element.get("Value") or ()
                     if isinstance(item, dict)]
            items = [item for item in items if item]
            if items:
                record[attr.keyword] = tuple(items)
            continue
        raw, encodings = _element_bytes(attr.vr, element, charset)
        if raw:
            add_value(record, attr, raw, encodings, True)
    return record


def _charset(dataset: dict, inherited: list[str] | None) -> list[str]:
    """Codecs for InlineBinary text (raw bytes in the instance's character set)."""
    values = (dataset.get("00080005") or {}).get("Value")
    raw = "\\".join(str(v) for v in values if v is not None).encode("ascii", "replace") if values else None
    return encodings_for(raw, inherited)


def _element_bytes(vr: str, element: dict, charset: list[str]) -> tuple[bytes | None, list[str]]:
    """The element's value as the bytes a file would hold (little endian), and their encodings."""
    if "InlineBinary" in element:  # e.g. a standard element stored with VR UN: raw bytes, as on disk
        try:
            return base64.b64decode(element["InlineBinary"]), charset
        except (ValueError, TypeError):
            return b"\x00invalid", charset  # decodes to an invalid value, as unreadable bytes would
    values = element.get("Value")
    if not values:
        return None, _UTF8
    if vr in _BINARY_FORMATS:
        numbers = [v for v in values if v is not None]
        try:
            return struct.pack("<" + _BINARY_FORMATS[vr] * len(numbers), *numbers), _UTF8
        except (struct.error, TypeError):
            return b"\x00", _UTF8  # too short for the VR: an invalid value
    texts = [_text(v) for v in values]
    if vr in _SINGLE_VALUE_TEXT:
        texts = texts[:1]
    joined = "\\".join(texts)
    if vr in _DEFAULT_REPERTOIRE:
        # Byte 0x5C separates values in these VRs whatever the character set; a server that decoded
        # it with JIS X 0201 (ISO 2022 IR 13, e.g. Orthanc) shows it as a yen sign.
        return joined.replace("\u00a5", "\\").encode("latin-1", "replace"), _UTF8
    return joined.encode("utf-8"), _UTF8


_DEFAULT_REPERTOIRE = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR", "DS", "IS"})


def _text(value) -> str:
    """A JSON value as DICOM text: numbers (DS/IS) in a form ``fields`` parses back exactly."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):  # PN: not decoded by ``fields`` either
        return str(value.get("Alphabetic", ""))
    return str(value)


# ---------------------------------------------------------------------------------------------
# One fetched study -> instance records, error lines and counts (shared by the Beam step and tests)


@dataclass(frozen=True)
class Source:
    """A DICOMweb source of a run: the server and the studies to read from it."""

    connection: Connection
    query: StudyQuery = StudyQuery()
