"""Collect the instances of one study, and the multi-study guard.

A ``StudyGroup`` is built incrementally (``add``/``merge``), so Beam can pre-aggregate per study
inside each bundle before the shuffle; the result does not depend on the order of arrival:
representatives are chosen by a total order, counts are sums, conflicts are kept as sets.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field

import orjson

from beam_pipeline.codes import Reason

CONFLICTING_PATIENT_ID = Reason.CONFLICTING_PATIENT_ID
CONFLICTING_ACCESSION = Reason.CONFLICTING_ACCESSION
CONFLICTING_DUPLICATE = Reason.CONFLICTING_DUPLICATE
MULTIPLE_STUDIES_IN_DIRECTORY = Reason.MULTIPLE_STUDIES_IN_DIRECTORY
STUDY_IN_REJECTED_DIRECTORY = Reason.STUDY_IN_REJECTED_DIRECTORY

_NO_NUMBER = float("inf")
_DIGEST_MODULUS = 1 << 256


def _tagged(value):
    """orjson's fallback for record values it does not write itself: a tuple subclass (the dose
    report tuples) with its type's name, sets sorted, bytes as hex."""
    if isinstance(value, tuple):
        return [type(value).__name__, *value]
    if isinstance(value, (set, frozenset)):
        return sorted(repr(item) for item in value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not a record value")


def record_digest(record: dict) -> int:
    """A record's content as a number (keys sorted: it does not depend on the reader's order); a
    study sums those of its records, so its digest does not depend on the order its files arrive
    in (an incremental run compares it with the last run's)."""
    try:  # record keys are keywords: orjson's path for str keys only is the faster
        text = orjson.dumps(record, default=_tagged, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # a key that is not a str somewhere: the same text as ever
        text = orjson.dumps(record, default=_tagged, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return int.from_bytes(hashlib.sha256(text).digest(), "big")


def patient_issuer(record: dict) -> tuple[str, str]:
    """Who issued the record's PatientID: (IssuerOfPatientID, the first UniversalEntityID of
    IssuerOfPatientIDQualifiersSequence), "" where absent. ("", "") is "no issuer given"."""
    issuer = record.get("IssuerOfPatientID")
    qualifiers = record.get("IssuerOfPatientIDQualifiersSequence")
    universal = next((item["UniversalEntityID"] for item in qualifiers if isinstance(item, dict)
                      and isinstance(item.get("UniversalEntityID"), str)), "") if isinstance(qualifiers, tuple) else ""
    return (issuer if isinstance(issuer, str) else "", universal)


def rank(record: dict) -> tuple:
    """Total order of instances: instance number, then SOPInstanceUID (ties impossible)."""
    number = record.get("InstanceNumber")
    return (_NO_NUMBER if number is None else number, record["SOPInstanceUID"])


@dataclass
class StudyGroup:
    """Everything needed to build one ImagingStudy, without keeping whole per-instance records."""

    study_uid: str
    files: int = 0
    duplicates: int = 0
    patient_ids: set = field(default_factory=set)
    patient_issuers: set = field(default_factory=set)  # patient_issuer() of the records with a PatientID
    accession_numbers: set = field(default_factory=set)
    representative: dict | None = None            # record of the first instance by rank
    series: dict = field(default_factory=dict)    # series uid -> representative record
    instances: dict = field(default_factory=dict)  # sop uid -> (series uid, instance fields)
    conflicting_sops: set = field(default_factory=set)
    rejected_folders: set = field(default_factory=set)  # directory mode: folders rejected with this study
    content: int = 0  # sum of the records' record_digest (mod 2**256)
    # Parts counted in files and content but not loaded (a --since run's unchanged folder units):
    # references the run loads and merges only when the study is built again.
    pending: tuple = ()

    def add(self, record: dict, instance_keys: tuple[str, ...]) -> "StudyGroup":
        self.files += 1
        self.content = (self.content + record_digest(record)) % _DIGEST_MODULUS
        if "PatientID" in record:
            self.patient_ids.add(record["PatientID"])
            self.patient_issuers.add(patient_issuer(record))
        if "AccessionNumber" in record:
            self.accession_numbers.add(record["AccessionNumber"])
        order = rank(record)
        if self.representative is None or order < rank(self.representative):
            self.representative = record
        series_uid = record["SeriesInstanceUID"]
        current = self.series.get(series_uid)
        if current is None or order < rank(current):
            self.series[series_uid] = record
        self.add_instance(record, instance_keys)
        return self

    def add_instance(self, record: dict, instance_keys: tuple[str, ...]) -> None:
        """The record's instance-level values (``instances``, duplicates and conflicting SOPs): what
        ``add`` adds of it beyond counts, identifiers and representatives."""
        fields = {k: record[k] for k in instance_keys if k in record}
        self._add_instance(record["SOPInstanceUID"], record["SeriesInstanceUID"], fields)

    def _add_instance(self, sop: str, series_uid: str, fields: dict) -> None:
        seen = self.instances.get(sop)
        if seen is None:
            self.instances[sop] = (series_uid, fields)
            return
        self.duplicates += 1
        if seen[0] != series_uid:
            self.conflicting_sops.add(sop)
        elif sorted(fields.items()) < sorted(seen[1].items()):
            self.instances[sop] = (series_uid, fields)  # keep a deterministic copy

    def merge(self, other: "StudyGroup") -> "StudyGroup":
        self.files += other.files
        self.content = (self.content + other.content) % _DIGEST_MODULUS
        self.duplicates += other.duplicates
        self.patient_ids |= other.patient_ids
        self.patient_issuers |= other.patient_issuers
        self.accession_numbers |= other.accession_numbers
        self.conflicting_sops |= other.conflicting_sops
        self.rejected_folders |= other.rejected_folders
        self.pending += other.pending
        if other.representative is not None and (
            self.representative is None or rank(other.representative) < rank(self.representative)
        ):
            self.representative = other.representative
        for uid, record in other.series.items():
            current = self.series.get(uid)
            if current is None or rank(record) < rank(current):
                self.series[uid] = record
        for sop, (series_uid, fields) in other.instances.items():
            self._add_instance(sop, series_uid, fields)
        return self

    def __reduce__(self):
        """Pickled as the class and its values in field order: smaller and faster both ways than the
        default (a dict of attribute names), and the shuffle carries one per study."""
        return StudyGroup, (self.study_uid, self.files, self.duplicates, self.patient_ids, self.patient_issuers,
                            self.accession_numbers, self.representative, self.series, self.instances,
                            self.conflicting_sops, self.rejected_folders, self.content, self.pending)

    def digest(self) -> str:
        """What the study is built from: its records (as a multiset) and the folders rejected with it."""
        text = f"{self.content:064x}|{self.files}|{'|'.join(sorted(self.rejected_folders))}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def rejection(self) -> tuple[str, str] | None:
        """(reason, detail) when the study must not be converted. Details never carry identifiers."""
        if self.rejected_folders:  # writing the rest would be an incomplete study
            return STUDY_IN_REJECTED_DIRECTORY, (
                f"part of the study is in {len(self.rejected_folders)} folder(s) rejected for holding "
                f"several studies: {', '.join(sorted(self.rejected_folders))}")
        if len(self.patient_ids) > 1:
            return CONFLICTING_PATIENT_ID, f"{len(self.patient_ids)} distinct PatientID values in one study"
        if len(self.patient_issuers) > 1:
            return CONFLICTING_PATIENT_ID, (f"{len(self.patient_issuers)} distinct issuers of the PatientID "
                                            "(IssuerOfPatientID, its qualifiers) in one study")
        if len(self.accession_numbers) > 1:
            return CONFLICTING_ACCESSION, f"{len(self.accession_numbers)} distinct AccessionNumber values in one study"
        if self.conflicting_sops:
            sops = sorted(self.conflicting_sops)
            return CONFLICTING_DUPLICATE, (
                f"{len(sops)} SOPInstanceUID(s) appear in more than one series, e.g. {sops[0]}"
            )
        return None


def add_to_directory(groups: dict, record: dict, instance_keys: tuple[str, ...]) -> dict:
    """Directory mode accumulator: study uid -> StudyGroup for one first-level folder."""
    uid = record["StudyInstanceUID"]
    group = groups.get(uid)
    if group is None:
        group = groups[uid] = StudyGroup(uid)
    group.add(record, instance_keys)
    return groups


def merge_directories(accumulators) -> dict:
    merged: dict = {}
    for groups in accumulators:
        for uid, group in groups.items():
            if uid in merged:
                merged[uid].merge(group)
            else:
                merged[uid] = group
    return merged


def dump_groups(groups: dict) -> bytes:
    """Compact bytes for the shuffle: the runner then moves opaque blobs instead of decoding objects."""
    return pickle.dumps(groups, protocol=pickle.HIGHEST_PROTOCOL)


def load_groups(blob: bytes) -> dict:
    return pickle.loads(blob)
