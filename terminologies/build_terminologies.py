"""Rebuild the shipped terminology tables (``terminologies/data/*.json``) from DICOM PS3.16.

Online (default) it reads the NEMA PS3.16 HTML pages; ``--source DIR`` rebuilds from a local copy
of the extracted tables (the ``dicom-terminologies`` reference directory), which is how the shipped
JSON is produced, so it can be reproduced without network access:

    python -m terminologies.build_terminologies --source ../shared/reference/dicom-terminologies

Exit status: 0 on success, 2 when the source cannot be read (offline, missing file, page changed).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

NEMA_PART16 = "https://dicom.nema.org/medical/dicom/current/output/chtml/part16/"
DATA_DIR = Path(__file__).resolve().parent / "data"

# source table name -> (PS3.16 page, local file): the local names are those of the reference copy.
SOURCES = {
    "bodysite": ("chapter_L.html", "bodysite_snomed.json"),
    "laterality": ("sect_CID_244.html", "laterality_snomed.json"),
    "viewposition_MG": ("sect_CID_4014.html", "viewposition_MG.json"),
    "viewposition_DX": ("sect_CID_4010.html", "viewposition_DX.json"),
    "radionuclide_NM": ("sect_CID_18.html", "radionuclide_NM.json"),
    "radionuclide_PT": ("sect_CID_4020.html", "radionuclide_PT.json"),
    "radiopharmaceutical_NM": ("sect_CID_25.html", "radiopharmaceutical_NM.json"),
    "radiopharmaceutical_PT": ("sect_CID_4021.html", "radiopharmaceutical_PT.json"),
    "units": ("sect_CID_84.html", "units.csv"),
}

# PS3.3 C.7.3.1 / C.7.6.2.1.2: Laterality and Image Laterality enumerated values -> CID 244 meaning.
# "U" (unpaired body part) has no CID 244 concept: it means "laterality does not apply", not
# "Unilateral", so it is deliberately not mapped.
LATERALITY_TERMS = {"R": "Right", "L": "Left", "B": "Bilateral"}

# PS3.3 C.8.11.5 (DX) / C.8.11.7 (MG) View Position defined terms -> CID 4010 code meaning.
# CID 4014 (mammography) carries its ACR MQCM terms itself; CID 4010 has no such column.
DX_VIEW_POSITION_TERMS = {
    "AP": "antero-posterior", "PA": "postero-anterior", "LL": "left lateral", "RL": "right lateral",
    "RPO": "right posterior oblique", "LPO": "left posterior oblique",
    "RAO": "right anterior oblique", "LAO": "left anterior oblique",
    "ML": "medial-lateral", "LM": "lateral-medial", "CC": "cranio-caudal", "FB": "caudo-cranial",
    "MLO": "medio-lateral oblique",
}

# CID 84 (PET units) lists UCUM codes; the Units (0054,1001) defined terms are in PS3.3 C.8.9.1.1.3.
UNITS_TERMS = {
    "CNTS": "{counts}", "CPS": "{counts}/s", "PROPCNTS": "{propcounts}", "PROPCPS": "{propcounts}/s",
    "CM2": "cm2", "CM2ML": "cm2/ml", "PCNT": "%", "BQML": "Bq/ml", "MGMINML": "mg/min/ml",
    "UMOLMINML": "umol/min/ml", "MLMING": "ml/min/g", "MLG": "ml/g", "1CM": "/cm", "UMOLML": "umol/ml",
    "NONE": "1", "MLMINML": "ml/min/ml", "MLML": "ml/ml", "GML": "g/ml",
}


class SourceError(Exception):
    """A table could not be read; the message says which and why."""


# --- reading -------------------------------------------------------------------------------------

class _TableParser(HTMLParser):
    """Collects every HTML table as a list of rows of whitespace-collapsed cell texts."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def records_from_html(html: str, required: tuple[str, ...]) -> list[dict]:
    """Rows of the first table whose header has all ``required`` columns, as column -> text."""
    parser = _TableParser()
    parser.feed(html)
    for table in parser.tables:
        if table and all(col in table[0] for col in required):
            header = table[0]
            return [
                {col: (cell or None) for col, cell in zip(header, row)}
                for row in table[1:] if len(row) == len(header)
            ]
    raise SourceError(f"no table with columns {required} (page layout changed?)")


def fetch_online(base_url: str, timeout: float) -> dict[str, list[dict]]:
    raw = {}
    for name, (page, _local) in SOURCES.items():
        url = base_url + page
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                html = response.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError(f"cannot download {url}: {reason}") from None
        required = ("Code Value", "Code Meaning", "Body Part Examined") if name == "bodysite" else (
            "Code Value", "Code Meaning")
        try:
            raw[name] = records_from_html(html, required)
        except SourceError as exc:
            raise SourceError(f"{url}: {exc}") from None
    return raw


def read_source(directory: Path) -> dict[str, list[dict]]:
    raw = {}
    for name, (_page, local) in SOURCES.items():
        path = directory / local
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror}") from None
        if local.endswith(".csv"):
            rows = csv.DictReader(text.splitlines(), skipinitialspace=True)
            raw[name] = [{k.strip(): (v or "").strip() or None for k, v in row.items()} for row in rows]
        else:
            try:
                raw[name] = json.loads(text)
            except ValueError as exc:
                raise SourceError(f"{path} is not JSON: {exc}") from None
    return raw


# --- transforming --------------------------------------------------------------------------------

def _verhoeff_ok(digits: str) -> bool:
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
         [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
         [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = d[check][p[i % 8][int(ch)]]
    return check == 0


def coding_scheme(code: str, designator: str | None = None) -> str:
    """The coding scheme of a PS3.16 code; the extracted copies lost the designator column.

    SNOMED CT ids carry a partition id (00/10 for concepts) and a Verhoeff check digit, which the
    DICOM-defined (DCM) numeric codes fail; NCI Thesaurus codes are ``C`` plus up to 6 digits,
    UMLS CUIs ``C`` plus exactly 7.
    """
    if designator:
        return {"SRT": "SCT"}.get(designator, designator)
    if code.isdigit():
        return "SCT" if len(code) >= 6 and code[-3:-1] in ("00", "10") and _verhoeff_ok(code) else "DCM"
    if re.fullmatch(r"C\d{7}", code):
        return "UMLS"
    if re.fullmatch(r"C\d{1,6}", code):
        return "NCIt"
    raise SourceError(f"cannot tell the coding scheme of code {code!r}")


def _code(row: dict) -> str | None:
    value = row.get("Code Value")
    return str(value).strip() if value not in (None, "") else None


def _coded_entries(rows: list[dict]) -> list[list]:
    """[scheme, code, meaning, SNOMED-RT id] for every row with a code, in source order."""
    return [
        [coding_scheme(code, row.get("Coding Scheme Designator")), code, row["Code Meaning"],
         row.get("SNOMED-RT ID") or None]
        for row in rows if (code := _code(row))
    ]


def _by_meaning(rows: list[dict], terms: dict[str, str], table: str) -> dict[str, list]:
    index = {row["Code Meaning"].lower(): row for row in rows if _code(row)}
    out = {}
    for term, meaning in terms.items():
        row = index.get(meaning.lower())
        if row is None:
            raise SourceError(f"{table}: no code with meaning {meaning!r} (needed for {term!r})")
        out[term] = [coding_scheme(_code(row), row.get("Coding Scheme Designator")), _code(row), row["Code Meaning"]]
    return out


def build_tables(raw: dict[str, list[dict]]) -> dict[str, object]:
    """The shipped tables (file stem -> JSON value) from the raw PS3.16 rows."""
    body_site = {}
    for row in raw["bodysite"]:
        term, code = row.get("Body Part Examined"), _code(row)
        if term and code:  # a few fetal terms have no code in the standard's table
            body_site.setdefault(term.upper(), [code, row["Code Meaning"]])

    view_mg = {
        row["ACR MQCM 1999 Equivalent"]: [coding_scheme(_code(row), row.get("Coding Scheme Designator")),
                                          _code(row), row["Code Meaning"]]
        for row in raw["viewposition_MG"] if row.get("ACR MQCM 1999 Equivalent") and _code(row)
    }
    units = {}
    ucum_meanings = {(row.get("Code Value") or "").strip(): row.get("Code Meaning") for row in raw["units"]}
    for term, ucum in UNITS_TERMS.items():
        meaning = ucum_meanings.get(ucum)
        if meaning is None:
            raise SourceError(f"units: UCUM code {ucum!r} (for {term!r}) not in CID 84")
        units[term] = [ucum, meaning.strip()]

    return {
        "body_site": body_site,
        "laterality": _by_meaning(raw["laterality"], LATERALITY_TERMS, "laterality"),
        "view_position": {
            "MG": view_mg,
            "DX": _by_meaning(raw["viewposition_DX"], DX_VIEW_POSITION_TERMS, "viewposition_DX"),
        },
        "radionuclide": {m: _coded_entries(raw[f"radionuclide_{m}"]) for m in ("NM", "PT")},
        "radiopharmaceutical": {m: _coded_entries(raw[f"radiopharmaceutical_{m}"]) for m in ("NM", "PT")},
        "units": units,
    }


def dump(value: object) -> str:
    """Canonical JSON text: sorted keys, compact, UTF-8, one trailing newline (diff-friendly)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_tables(tables: dict[str, object], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, value in tables.items():
        (out_dir / f"{stem}.json").write_text(dump(value), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="rebuild from a local copy of the extracted tables")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"output directory (default {DATA_DIR})")
    parser.add_argument("--base-url", default=NEMA_PART16, help="PS3.16 chtml base URL")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-page download timeout (s)")
    args = parser.parse_args(argv)
    try:
        raw = read_source(args.source) if args.source else fetch_online(args.base_url, args.timeout)
        tables = build_tables(raw)
    except SourceError as exc:
        hint = "" if args.source else " (offline? rebuild from a local copy with --source DIR)"
        print(f"build_terminologies: error: {exc}{hint}", file=sys.stderr)
        return 2
    write_tables(tables, args.out)
    print(f"build_terminologies: wrote {len(tables)} tables to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
