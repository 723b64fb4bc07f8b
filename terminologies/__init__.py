"""DICOM PS3.16 lookup tables (body part, laterality, view position, radionuclide, ...) as FHIR Codings.

The tables are JSON package data under ``terminologies/data`` (loaded with ``importlib.resources``
so they work from an installed wheel on a worker); ``build_terminologies`` regenerates them.
Every lookup returns a fresh dict (callers may mutate it) or ``None`` when the term is unknown.
"""
from __future__ import annotations

import json
import re
from importlib import resources
from typing import Mapping

SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "NCIt": "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl",
    "UMLS": "http://www.nlm.nih.gov/research/umls",
}

TABLES = ("body_site", "laterality", "view_position", "radionuclide", "radiopharmaceutical", "units")


def read_table(name: str):
    """One shipped table as parsed JSON."""
    return json.loads(resources.files(__name__).joinpath("data", f"{name}.json").read_text("utf-8"))


def coding(scheme: str, code: str, display: str | None) -> dict:
    """A FHIR Coding for a DICOM coding scheme designator (``SCT``, ``DCM``, ...)."""
    out = {"system": SYSTEMS[scheme], "code": code}
    if display:
        out["display"] = display
    return out


def meaning_key(text: str) -> str:
    """Comparable form of a code meaning: case, spaces, ``^`` and ``-`` do not matter."""
    return re.sub(r"[\s^\-]+", "", text).lower()


class _CodedIndex:
    """A CID table searchable by code, by legacy SNOMED-RT id and by code meaning."""

    def __init__(self, entries: list[list]):
        self.by_code: dict[str, tuple] = {}
        self.by_meaning: dict[str, tuple] = {}
        for scheme, code, meaning, rt_id in entries:
            entry = (scheme, code, meaning)
            self.by_code.setdefault(code, entry)
            if rt_id:
                self.by_code.setdefault(rt_id, entry)
            self.by_meaning.setdefault(meaning_key(meaning), entry)

    def find(self, code: str | None = None, meaning: str | None = None) -> dict | None:
        entry = self.by_code.get(code.strip()) if isinstance(code, str) else None
        if entry is None and isinstance(meaning, str):
            entry = self.by_meaning.get(meaning_key(meaning))
        return coding(*entry) if entry else None


class Terminologies:
    """All lookup tables, read once; plain dicts inside, so instances pickle cheaply."""

    def __init__(self, tables: Mapping[str, object]):
        self._body_site = {k.upper(): v for k, v in tables["body_site"].items()}
        self._laterality = dict(tables["laterality"])
        self._view_position = {m: dict(t) for m, t in tables["view_position"].items()}
        self._units = dict(tables["units"])
        self._radionuclide = {m: _CodedIndex(e) for m, e in tables["radionuclide"].items()}
        self._radiopharmaceutical = {m: _CodedIndex(e) for m, e in tables["radiopharmaceutical"].items()}

    @classmethod
    def load(cls) -> "Terminologies":
        return cls({name: read_table(name) for name in TABLES})

    def body_site(self, term: str) -> dict | None:
        """SNOMED CT Coding for a Body Part Examined defined term (PS3.16 Annex L), any case."""
        entry = self._body_site.get(term.strip().upper()) if isinstance(term, str) else None
        return coding("SCT", *entry) if entry else None

    def laterality(self, value: str) -> dict | None:
        """SNOMED CT Coding (CID 244) for Laterality / Image Laterality ``R``, ``L``, ``B``.

        ``U`` (unpaired body part) is deliberately unmapped: it means laterality does not apply.
        """
        entry = self._laterality.get(value.strip().upper()) if isinstance(value, str) else None
        return coding(*entry) if entry else None

    def view_position(self, term: str, modality: str = "DX") -> dict | None:
        """Coding (CID 4014 for MG, CID 4010 otherwise) for a View Position defined term."""
        if not isinstance(term, str):
            return None
        order = ("MG", "DX") if modality == "MG" else ("DX", "MG")
        key = term.strip().upper()
        for table in order:
            if entry := self._view_position[table].get(key):
                return coding(*entry)
        return None

    def units(self, term: str) -> dict | None:
        """UCUM Coding (CID 84) for a PET Units (0054,1001) defined term such as ``BQML``."""
        entry = self._units.get(term.strip().upper()) if isinstance(term, str) else None
        return coding("UCUM", *entry) if entry else None

    def radionuclide(self, code: str | None = None, meaning: str | None = None,
                     modality: str = "PT") -> dict | None:
        """Coding from CID 4020 (PT) or CID 18 (NM) by code / SNOMED-RT id, else by meaning."""
        return self._radionuclide["NM" if modality == "NM" else "PT"].find(code, meaning)

    def radiopharmaceutical(self, code: str | None = None, meaning: str | None = None,
                            modality: str = "PT") -> dict | None:
        """Coding from CID 4021 (PT) or CID 25 (NM) by code / SNOMED-RT id, else by meaning."""
        return self._radiopharmaceutical["NM" if modality == "NM" else "PT"].find(code, meaning)
