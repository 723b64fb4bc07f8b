"""The FHIR Bulk Data description of an output folder: ``manifest.json`` and OperationOutcome error lines.

Bulk-import tools (HAPI/Smile ``$import``, cloud FHIR stores) read the Bulk Data export manifest
(https://hl7.org/fhir/uv/bulkdata/export.html#response---complete-status): ``transactionTime``,
``request``, ``requiresAccessToken``, one ``output`` entry per resource file and ``error`` entries whose
files hold OperationOutcome resources. Pure functions over plain data; the pipeline supplies the file
names and their line counts.
"""
from __future__ import annotations

import json
import re
import shlex
from datetime import datetime, timezone
from typing import Iterable, Mapping

from beam_pipeline.codes import REASON_SYSTEM, Reason, sha256_id

# FHIR IssueType (http://hl7.org/fhir/issue-type) of each reason; other reasons: "processing".
ISSUE_TYPES: Mapping[str, str] = {
    Reason.EMPTY_FILE: "structure",
    Reason.TRUNCATED: "structure",
    Reason.UNREADABLE: "exception",
    Reason.NOT_A_REGULAR_FILE: "not-supported",
    Reason.DANGLING_SYMLINK: "not-found",
    Reason.HEADER_TOO_LARGE: "too-costly",
    Reason.MISSING_STUDY_INSTANCE_UID: "required",
    Reason.MISSING_SERIES_INSTANCE_UID: "required",
    Reason.MISSING_SOP_INSTANCE_UID: "required",
    Reason.MISSING_SOP_CLASS_UID: "required",
    Reason.INVALID_UID: "value",
    Reason.CONFLICTING_PATIENT_ID: "business-rule",
    Reason.CONFLICTING_ACCESSION: "business-rule",
    Reason.CONFLICTING_DUPLICATE: "business-rule",
    Reason.MISSING_PATIENT_ID: "required",
    Reason.MISSING_MODALITY: "required",
    Reason.UNKNOWN_PATIENT_ID_ISSUER: "business-rule",
    Reason.INVALID_FHIR: "invalid",
    Reason.MULTIPLE_STUDIES_IN_DIRECTORY: "business-rule",
    Reason.STUDY_IN_REJECTED_DIRECTORY: "business-rule",
    Reason.STUDY_NOT_FOUND: "not-found",
    Reason.FETCH_FAILED: "exception",
    Reason.FHIR_SERVER_REFUSED: "processing",
}
# Where an error happened, named first in ``diagnostics`` (other fields, e.g. a DICOMweb ``status``, follow).
ERROR_LOCATORS = ("path", "study_uid", "study_uids", "files")

# Option names whose values are not repeated in the manifest's ``request``.
SECRET_OPTION = re.compile(r"token|secret|passw|pwd|credential|key|auth|signature|cookie", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
REDACTED = "REDACTED"


def transaction_time(moment: datetime | None = None) -> str:
    """A FHIR ``instant`` in UTC (default: now), when the run started."""
    moment = (moment or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _redact_url(token: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://REDACTED@host``; query strings are dropped when
    they carry a secret-looking parameter (signed URLs)."""
    token = _URL_USERINFO.sub(REDACTED + "@", token)
    base, sep, query = token.partition("?")
    return base + sep + REDACTED if sep and SECRET_OPTION.search(query) else token


def request_line(argv: Iterable[str], program: str = "python -m beam_pipeline") -> str:
    """The command line, for the manifest's ``request``, without the values of secret-looking options
    (``--x_token=…``, ``--password …``) or credentials inside URLs. Environment variables are never read."""
    out, hide_next = [], False
    for token in argv:
        if hide_next and not token.startswith("-"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        if token.startswith("-"):
            name, eq, _ = token.partition("=")
            if SECRET_OPTION.search(name):
                if eq:
                    token = name + "=" + REDACTED
                else:
                    hide_next = True
        out.append(_redact_url(token))
    line = " ".join([program, shlex.join(out)]) if out else program
    return line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # valid JSON text


def file_url(relative: str, base_url: str | None) -> str:
    """A file's URL in the manifest: relative to the output folder, or under ``base_url``."""
    return relative if not base_url else base_url.rstrip("/") + "/" + relative.lstrip("/")


def output_entries(files: Iterable[tuple[str, str, int]], base_url: str | None = None) -> list[dict]:
    """``{type, url, count}`` per (resource type, relative path, line count), sorted by path."""
    return [{"type": resource_type, "url": file_url(path, base_url), "count": count}
            for resource_type, path, count in sorted(files, key=lambda item: (item[1], item[0]))]


def manifest(*, transaction_time: str, request: str, requires_access_token: bool,
             outputs: Iterable[tuple[str, str, int]], errors: Iterable[tuple[str, int]],
             base_url: str | None = None) -> dict:
    """The Bulk Data manifest.

    ``outputs``: (resource type, file path relative to the output folder, line count) per resource
    file; ``errors``: (relative path, line count) per OperationOutcome error file. Sorted by path,
    so the same files give the same manifest.
    """
    return {
        "transactionTime": transaction_time,
        "request": request,
        "requiresAccessToken": requires_access_token,
        "output": output_entries(outputs, base_url),
        "error": [{"type": "OperationOutcome", "url": file_url(path, base_url), "count": count}
                  for path, count in sorted(errors)],
    }


def error_outcome(error: Mapping) -> dict:
    """One error line (``reason``, ``detail``, ``path``/``study_uid``/…) as an OperationOutcome.

    ``details`` carries the reason code (coding) and the detail text, ``diagnostics`` where it
    happened; the id is a hash of the error, so re-runs write the same line.
    """
    reason = str(error.get("reason", ""))
    detail = error.get("detail")
    issue = {"severity": "error", "code": ISSUE_TYPES.get(reason, "processing"),
             "details": {"coding": [{"system": REASON_SYSTEM, "code": reason}],
                         "text": f"{reason}: {detail}" if detail else reason}}
    keys = [*ERROR_LOCATORS, *sorted(k for k in error if k not in ERROR_LOCATORS and k not in ("reason", "detail"))]
    where = [f"{key}: {_plain(error[key])}" for key in keys if error.get(key) not in (None, "", [])]
    if where:
        issue["diagnostics"] = "; ".join(where)
    canonical = json.dumps(error, sort_keys=True, ensure_ascii=False, default=str)
    return {"resourceType": "OperationOutcome", "id": sha256_id("error", canonical), "issue": [issue]}


def _plain(value) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
