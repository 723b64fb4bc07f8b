"""DICOM study → FHIR R4 ImagingStudy, Device (and Observation) dicts: pure functions, no Beam.

Identifier and reference rules follow the converter we grow from (see docs/mapping.md): ids are sha256 hex
digests of ``"<system>|<value>"``, so the same study always gets the same ids.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from beam_pipeline.codes import (
    DCM_SYSTEM,
    DEVICE_PROFILE,
    DOSE_REPORT_KEY,
    IMAGING_STUDY_PROFILE,
    INVALID_KEY,
    V2_0203,
    Reason,
    sha256_id,
)
from beam_pipeline.dicom.dates import Clock, combine, parse_date, parse_time
from beam_pipeline.fhir import dose, mii, references, validation
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.fhir.referenced import service_request
from beam_pipeline.fhir.study import StudyGroup, rank

MISSING_PATIENT_ID = Reason.MISSING_PATIENT_ID
MISSING_MODALITY = Reason.MISSING_MODALITY
UNKNOWN_PATIENT_ID_ISSUER = Reason.UNKNOWN_PATIENT_ID_ISSUER


@dataclass
class BuiltStudy:
    """Resources of one study (ImagingStudy first), or why the study was rejected."""

    resources: list = field(default_factory=list)    # (resource type, resource dict)
    notes: Counter = field(default_factory=Counter)  # values left out or changed, by kind
    rejection: tuple[str, str] | None = None


def imaging_study_id(config: ConversionConfig, study_uid: str) -> str:
    return sha256_id(config.study_id_system, study_uid)


# Parts every study repeats are one object, shared by the resources (which nothing changes once
# built): a compiled check (``validation``) skips a list that passed before as a whole.
_MR_TYPE = {"coding": [{"system": V2_0203, "code": "MR"}]}


def patient_reference(config: ConversionConfig, patient_id: str, system: str | None = None) -> dict:
    """``subject``: the id hashes the system (the issuer's, see ``references``) with the PatientID."""
    system = system or config.patient_id_system
    return {
        "reference": "Patient/" + sha256_id(system, patient_id),
        "identifier": {"type": _MR_TYPE, "system": system, "value": patient_id},
    }


def device_id(serial: str, manufacturer: str) -> str:
    return sha256_id(serial, manufacturer)


# ---------------------------------------------------------------------------------------------
# Dates and times


_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")
# The valid offsets in ASCII digits, to their FHIR form: found without parsing (others: ``_OFFSET``)
_OFFSETS = {f"{sign}{hours:02d}{minutes:02d}": f"{sign}{hours:02d}:{minutes:02d}"
            for sign in "+-" for hours in range(15) for minutes in range(60) if (hours, minutes) <= (14, 0)}


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def dicom_datetime(date: str | None, time: str | None, utc_offset: str | None,
                   timezone: str, notes: Counter, what: str) -> str | None:
    """FHIR dateTime from DICOM DA/TM; the offset comes from TimezoneOffsetFromUTC or the zone.

    Returns None (and counts it) when the date does not parse; a bad time keeps the date only.
    """
    if not date:
        return None
    try:
        text, problems = _datetime_text(date, time or None, utc_offset or None, timezone)
    except TypeError:  # an unhashable value: not cached (it does not parse either)
        text, problems = _datetime_text.__wrapped__(date, time or None, utc_offset or None, timezone)
    for problem in problems:  # "date", "time" or "offset"
        if problem == "date":
            notes[f"unparseable:{what}"] += 1
        elif problem == "time":
            notes[f"unparseable:{what.replace('Date', 'Time')}"] += 1
        else:
            notes["unparseable:TimezoneOffsetFromUTC"] += 1
    return text


@lru_cache(maxsize=1024)
def _datetime_text(date: str, time: str | None, utc_offset: str | None, timezone: str) -> tuple:
    """(the FHIR dateTime or None, what did not parse): a pure function of its values, cached, as
    a series mostly repeats its study's date and time."""
    plain = _plain_text(date, time)
    if plain is not None:  # the usual YYYYMMDD and HHMMSS[.F]: read by slicing
        date_text, text = plain
        if text is None:
            return date_text, ()
        day = None
    else:
        day = parse_date(date)
        if day is None:
            return None, ("date",)
        date_text = f"{day.year:04d}-{day.month:02d}-{day.day:02d}"  # strftime drops zeros of years < 1000
        if not time:
            return date_text, ()
        clock = parse_time(time)
        if clock is None:
            return date_text, ("time",)
        fraction = f".{clock.fraction}" if clock.fraction else ""
        text = f"{date_text}T{clock.hour:02d}:{clock.minute:02d}:{clock.second:02d}{fraction}"
    if utc_offset:
        suffix = _OFFSETS.get(utc_offset) if type(utc_offset) is str else None
        if suffix is not None:
            return text + suffix, ()
        match = _OFFSET.match(utc_offset)
        if match and (int(match[2]), int(match[3])) <= (14, 0) and int(match[3]) < 60:  # FHIR: up to 14:00
            return f"{text}{match[1]}{match[2]}:{match[3]}", ()
        problems = ("offset",)
    else:
        problems = ()
    if day is None:
        day = datetime(int(date[:4]), int(date[4:6]), int(date[6:]))
        clock = Clock(int(time[:2]), int(time[2:4]), int(time[4:6]), time[7:])
    # the microseconds added here never carry into the second: the clock's fields are the moment's
    moment = combine(day, clock)
    minutes = int(moment.replace(tzinfo=_zone(timezone)).utcoffset().total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}", problems


# ASCII YYYYMMDD of a day 01-28 of a month 01-12 of a year from 0001 (always a real day), and
# HHMMSS or HHMMSS.F{1,6}: the forms read by slicing (anything else ``dates`` parses).
_PLAIN_DATE = re.compile(r"(?!0000)[0-9]{4}(?:0[1-9]|1[0-2])(?:0[1-9]|1[0-9]|2[0-8])")
_PLAIN_TIME = re.compile(r"(?:[01][0-9]|2[0-3])[0-5][0-9][0-5][0-9](?:\.[0-9]{1,6})?")


def _plain_text(date: str, time: str | None) -> tuple | None:
    """(FHIR date, FHIR dateTime without its offset, or None without a time) of the plain forms
    (``_PLAIN_DATE``, ``_PLAIN_TIME``); None for anything else (they agree: tests compare them)."""
    if type(date) is not str or _PLAIN_DATE.fullmatch(date) is None:
        return None
    date_text = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    if not time:
        return date_text, None
    if type(time) is not str or _PLAIN_TIME.fullmatch(time) is None:
        return None
    return date_text, f"{date_text}T{time[:2]}:{time[2:4]}:{time[4:]}"


_ABSENT = object()  # what MappedParts' keys hold for a keyword the record lacks
# What ``series_head`` reads of a series' record (its number, modality, description, coded terms, scanner)
SERIES_HEAD_KEYS = ("SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined", "Laterality",
                    "ImageLaterality", "DeviceSerialNumber", "Manufacturer", "ManufacturerModelName")


class MappedParts:
    """The MII extensions of series and of instances by the DICOM values they are mapped from
    (and the Devices of scanners).

    Instances of a series, and series of alike scanners and protocols across studies, repeat
    them: each distinct set of values is mapped once, its notes counted again wherever it occurs.
    One per worker (built with its ``Terminologies``), or one per study by default. The lists
    are shared by the resources built from them, which nothing changes after building.
    """

    # A series' acquisition time is read only for an uptake time (``mii.UPTAKE_SEQUENCE``): such a
    # series is mapped directly, and the others are not told apart by when they were acquired.
    SERIES_KEYS = (*(k for k in mii.KEYWORDS["series"] if k not in mii.ACQUISITION_KEYWORDS), INVALID_KEY)
    INSTANCE_KEYS = (*mii.KEYWORDS["instance"], INVALID_KEY)
    _SERIES_ABSENT = (_ABSENT,) * len(SERIES_KEYS)  # the defaults of ``get`` for each key
    _INSTANCE_ABSENT = (_ABSENT,) * len(INSTANCE_KEYS)
    _HEAD_ABSENT = (_ABSENT,) * len(SERIES_HEAD_KEYS)
    MAX_ENTRIES = 4096  # cleared when full (values of a few scanners' protocols: small)

    def __init__(self):
        self.entries: dict = {}

    def series(self, record: dict, terms, include_instances: bool, notes: Counter) -> list:
        if mii.UPTAKE_SEQUENCE in record:
            return mii.series_extensions(record, terms, include_instances, notes)
        key = ("series", include_instances, *map(record.get, self.SERIES_KEYS, self._SERIES_ABSENT))
        return self._mapped(key, lambda delta: mii.series_extensions(record, terms, include_instances, delta), notes)

    def instance_key(self, fields: dict) -> tuple:
        """What an instance's extensions are mapped from: equal keys, equal extensions and notes."""
        return ("instance", *map(fields.get, self.INSTANCE_KEYS, self._INSTANCE_ABSENT))

    def instance(self, key: tuple, fields: dict, terms) -> tuple[list, Counter]:
        """(extensions, notes to count) of an instance whose ``instance_key`` is ``key``."""
        return self._hit(key, lambda delta: mii.instance_extensions(fields, terms, delta))

    def series_head(self, record: dict, terms, include_devices: bool, notes: Counter) -> tuple:
        """``series_head`` of a series: the series of a scanner and protocol repeat it study after study."""
        key = ("head", include_devices, *map(record.get, SERIES_HEAD_KEYS, self._HEAD_ABSENT))
        return self._mapped(key, lambda delta: series_head(record, terms, include_devices, delta, self), notes)

    def device(self, record: dict) -> dict | None:
        """``build_device`` of a series' scanner: a scanner serves many studies, its Device is built once."""
        key = ("device", record.get("DeviceSerialNumber"), record.get("Manufacturer", ""),
               record.get("ManufacturerModelName"))
        try:
            hit = self.entries.get(key, _ABSENT)
        except TypeError:  # an unhashable value: built directly
            return build_device(record)
        if hit is _ABSENT:
            if len(self.entries) >= self.MAX_ENTRIES:
                self.entries.clear()
            hit = self.entries[key] = build_device(record)
        return hit

    def shared(self, key: tuple, make):
        """A part many studies repeat (a profile list, a modality list, a scanner's performer, a
        SOP class, a body site's coding), made once: one object in all of them, which a compiled
        check skips as a whole where it passed before. ``key``: the values that decide ``make()``."""
        try:
            hit = self.entries.get(key, _ABSENT)
        except TypeError:  # an unhashable value: made directly
            return make()
        if hit is _ABSENT:
            if len(self.entries) >= self.MAX_ENTRIES:
                self.entries.clear()
            hit = self.entries[key] = make()
        return hit

    def _mapped(self, key: tuple, mapping, notes: Counter) -> list:
        extensions, delta = self._hit(key, mapping)
        if delta:
            notes.update(delta)
        return extensions

    def _hit(self, key: tuple, mapping) -> tuple[list, Counter]:
        """(what ``mapping(notes)`` returns, the notes it counts), mapped once per key."""
        try:
            hit = self.entries.get(key)
        except TypeError:  # an unhashable value (a sequence of items): mapped directly
            delta: Counter = Counter()
            return mapping(delta), delta
        if hit is None:
            delta = Counter()
            hit = (mapping(delta), delta)
            if len(self.entries) >= self.MAX_ENTRIES:
                self.entries.clear()
            self.entries[key] = hit
        return hit


# ---------------------------------------------------------------------------------------------
# Resources


def build_study(group: StudyGroup, config: ConversionConfig, terms, parts: MappedParts | None = None) -> BuiltStudy:
    """All resources for one grouped study, or a rejection with a reason code. ``parts``: a
    worker's ``MappedParts`` (else one for this study)."""
    parts = MappedParts() if parts is None else parts
    built = BuiltStudy()
    built.rejection = group.rejection()
    if built.rejection:
        return built
    study = group.representative
    patient_ids = sorted(group.patient_ids)
    if not patient_ids:
        built.rejection = (MISSING_PATIENT_ID, "no instance of the study carries a PatientID")
        return built
    patient_id = patient_ids[0]
    issuer = min(group.patient_issuers, default=("", ""))  # one at most: more is a rejection above
    patient_system, known_issuer = references.patient_id_system(issuer, config)
    if patient_system is None:
        built.rejection = (UNKNOWN_PATIENT_ID_ISSUER, references.unknown_issuer_detail(issuer))
        return built
    if not known_issuer:
        built.notes["unmapped:IssuerOfPatientID"] += 1
    if config.patient_id_length and len(patient_id) > config.patient_id_length:
        patient_id = patient_id[: config.patient_id_length]
        built.notes["truncated:PatientID"] += 1
    no_modality = [uid for uid, rec in group.series.items() if "Modality" not in rec]
    if no_modality:
        built.rejection = (MISSING_MODALITY, f"series {min(no_modality)} has no Modality")
        return built

    notes = built.notes
    subject = patient_reference(config, patient_id, patient_system)
    offset = study.get("TimezoneOffsetFromUTC")
    started = dicom_datetime(study.get("StudyDate"), study.get("StudyTime"), offset,
                             config.timezone, notes, "StudyDate")
    study_extras = mii.study_elements(study, config, terms, notes, study_uid=group.study_uid,
                                      subject=subject, started=started)

    by_series: dict[str, list] = {uid: [] for uid in group.series}
    dose_reports = False
    for sop, (series_uid, fields) in group.instances.items():
        # the fields carry their SOPInstanceUID (``keywords.instance_keys``): no copy to rank them
        ranked = fields if fields.get("SOPInstanceUID") == sop else {"SOPInstanceUID": sop, **fields}
        by_series[series_uid].append((rank(ranked), sop, fields))
        if DOSE_REPORT_KEY in fields:
            dose_reports = True

    devices: dict[str, dict] = {}
    series_list = []
    for series_uid, record in sorted(group.series.items(), key=_series_order):
        instances = sorted(by_series[series_uid])
        series_list.append(_series(series_uid, record, instances, study, config, terms, notes, devices, parts))

    meta = parts.shared(("meta", config.source), lambda: _study_meta(config.source))
    resource = {"resourceType": "ImagingStudy", "id": imaging_study_id(config, group.study_uid), "meta": meta}
    if study_extras.get("extension"):
        resource["extension"] = study_extras["extension"]
    accession = _accession_identifier(group, config, notes)
    resource["identifier"] = ([accession] if accession else []) + [
        {"system": "urn:dicom:uid", "value": "urn:oid:" + group.study_uid}]
    resource["status"] = "available"
    modalities = tuple(sorted({rec["Modality"] for rec in group.series.values()}))
    resource["modality"] = parts.shared(("modality", modalities),
                                        lambda: [{"system": DCM_SYSTEM, "code": code} for code in modalities])
    resource["subject"] = subject
    if study_extras.get("encounter"):
        resource["encounter"] = study_extras["encounter"]
    if started:
        resource["started"] = started
    based_on = references.based_on(accession, config.service_requests) if accession else None
    if based_on:
        resource["basedOn"] = [based_on]
    endpoint = references.endpoint(config.wado_rs_base) if config.wado_rs_base else None
    if endpoint:
        resource["endpoint"] = [{"reference": "Endpoint/" + endpoint["id"]}]
    resource["numberOfSeries"] = len(series_list)
    resource["numberOfInstances"] = len(group.instances)
    if study_extras.get("procedureCode"):
        resource["procedureCode"] = study_extras["procedureCode"]
    if study.get("StudyDescription"):
        resource["description"] = study["StudyDescription"]
    resource["series"] = series_list

    built.resources.append(("ImagingStudy", resource))
    if devices:
        built.resources.extend(("Device", device) for _, device in sorted(devices.items()))
    if study_extras.get("observations"):
        built.resources.extend(("Observation", obs) for obs in study_extras["observations"])
    if config.dose_reports and dose_reports:  # most studies: no dose report, nothing to sort
        built.resources.extend(("Observation", obs) for obs in _dose_observations(
            group, by_series, resource["id"], subject, started, study, config, notes))
    if endpoint:
        built.resources.append(("Endpoint", endpoint))
    if based_on and config.service_requests and (request := service_request(based_on, subject)):
        built.resources.append(("ServiceRequest", request))
    return built


def _study_meta(source: str | None) -> dict:
    meta = {"source": source} if source else {}
    meta["profile"] = [IMAGING_STUDY_PROFILE]
    return meta


def _dose_observations(group, by_series, study_id, subject, started, study, config, notes) -> list[dict]:
    """Observations of the study's radiation dose reports, in series and instance order."""
    def to_datetime(date, time, offset, what):
        return dicom_datetime(date, time, offset or study.get("TimezoneOffsetFromUTC"), config.timezone, notes, what)

    observations = []
    for series_uid, record in sorted(group.series.items(), key=_series_order):
        reports = [(sop, fields[DOSE_REPORT_KEY]) for _, sop, fields in sorted(by_series[series_uid])
                   if DOSE_REPORT_KEY in fields]
        if not reports:
            continue
        device = build_device(record) if config.include_devices else None
        for sop, report in reports:
            context = dose.DoseContext(sop, group.study_uid, "ImagingStudy/" + study_id, subject, started,
                                       "Device/" + device["id"] if device else None, to_datetime)
            observations.extend(dose.dose_observations(report, context, notes))
    return observations


def _series_order(item):
    uid, record = item
    number = record.get("SeriesNumber")
    return (float("inf") if number is None else number, uid)


def _accession_identifier(group: StudyGroup, config: ConversionConfig, notes: Counter) -> dict | None:
    """The ACSN identifier (also ``basedOn``'s), system from the issuer or ``accession_id_system``."""
    accessions = sorted(group.accession_numbers)
    if not accessions:
        return None
    return references.accession_identifier(accessions[0],
                                           references.accession_system(group.representative, config, notes))


def _series(uid, record, instances, study, config, terms, notes, devices, parts: MappedParts) -> dict:
    series: dict = {}
    extensions = parts.series(record, terms, config.include_instances, notes)
    if extensions:
        series["extension"] = extensions
    series["uid"] = uid
    head, coded, device, performer = parts.series_head(record, terms, config.include_devices, notes)
    series.update(head)
    series["numberOfInstances"] = len(instances)
    series.update(coded)
    started = dicom_datetime(record.get("SeriesDate") or (study.get("StudyDate") if record.get("SeriesTime") else None),
                             record.get("SeriesTime"), study.get("TimezoneOffsetFromUTC"),
                             config.timezone, notes, "SeriesDate")
    if started:
        series["started"] = started
    if device:
        devices[device["id"]] = device
        series["performer"] = performer
    if config.include_instances:
        series["instance"] = _instances(instances, terms, notes, parts)
    return series


def series_head(record: dict, terms, include_devices: bool, notes: Counter, parts: MappedParts) -> tuple:
    """What a series element is built from its record's plain values (``SERIES_HEAD_KEYS``): (number,
    modality and description; bodySite and laterality; its scanner's Device and the performer
    naming it, or None)."""
    head: dict = {}
    if _unsigned_int(record.get("SeriesNumber"), notes, "SeriesNumber"):
        head["number"] = record["SeriesNumber"]
    head["modality"] = {"system": DCM_SYSTEM, "code": record["Modality"]}
    if record.get("SeriesDescription"):
        head["description"] = record["SeriesDescription"]
    coded: dict = {}
    for element, keywords in _SERIES_CODED:
        term = None
        for keyword in keywords:
            term = record.get(keyword)
            if term:
                break
        if term:
            lookup = terms.body_site if element == "bodySite" else terms.laterality
            coding = parts.shared((element, term), lambda: lookup(term))
            if coding:
                coded[element] = coding
            else:
                notes[f"unmapped:{keywords[0]}"] += 1
    device = parts.device(record) if include_devices else None
    performer = None
    if device:
        performer = parts.shared(("performer", device["id"]),
                                 lambda: [{"actor": {"reference": "Device/" + device["id"]}}])
    return head, coded, device, performer


_SERIES_CODED = (("bodySite", ("BodyPartExamined",)), ("laterality", ("Laterality", "ImageLaterality")))


def _unsigned_int(value, notes: Counter, keyword: str) -> bool:
    """FHIR unsignedInt is 0..2^31-1; DICOM IS allows more (some writers put timestamps there)."""
    if value is None:
        return False
    if 0 <= value <= 2_147_483_647:
        return True
    notes[f"out-of-range:{keyword}"] += 1
    return False


def _instances(instances: list, terms, notes: Counter, parts: MappedParts) -> list[dict]:
    """The instances of a series, in order. Alike instances (most of a series) repeat their mapped
    extensions and SOP class: each is looked up again only where it differs from the one before."""
    out = []
    key = mapped = class_uid = sop_class = None
    for _, sop, fields in instances:
        instance_key = parts.instance_key(fields)
        if mapped is None or instance_key != key:
            key, mapped = instance_key, parts.instance(instance_key, fields, terms)
        extensions, delta = mapped
        if delta:
            notes.update(delta)
        instance: dict = {"extension": extensions} if extensions else {}
        instance["uid"] = sop
        if sop_class is None or fields["SOPClassUID"] != class_uid:
            class_uid = fields["SOPClassUID"]
            sop_class = parts.shared(("sopClass", class_uid),
                                     lambda: {"system": "urn:ietf:rfc:3986", "code": "urn:oid:" + class_uid})
        instance["sopClass"] = sop_class
        if _unsigned_int(fields.get("InstanceNumber"), notes, "InstanceNumber"):
            instance["number"] = fields["InstanceNumber"]
        out.append(instance)
    return out


def build_device(record: dict) -> dict | None:
    """The scanner of a series, or None without a DeviceSerialNumber (no stable identity)."""
    serial = record.get("DeviceSerialNumber")
    if not serial:
        return None
    manufacturer = record.get("Manufacturer", "")
    device = {"resourceType": "Device", "id": device_id(serial, manufacturer),
              "meta": {"profile": [DEVICE_PROFILE]},
              "identifier": [{"value": serial}], "status": "active"}
    if manufacturer:
        device["manufacturer"] = manufacturer
    if record.get("ManufacturerModelName"):
        device["deviceName"] = [{"name": record["ManufacturerModelName"], "type": "model-name"}]
    return device


_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_FHIR_CODE = re.compile(r"^[^\s]+( [^\s]+)*$")


def validation_view(study: dict) -> dict:
    """The ImagingStudy with, per series, only instances of a shape not seen before in the study."""
    return checked_view(study, check_ids=False)[1]


def checked_view(study: dict, check_ids: bool = True) -> tuple[str | None, dict]:
    """(the first per-instance value a shape cannot vouch for that is not valid, or None; the view
    of the ImagingStudy that is validated: per series only instances of a shape not seen before in
    the study), in one pass over the instances.

    Instances are built by one code path from typed values, so pydantic's verdict on one instance
    holds for every instance of the same shape; validating 50,000 alike instances one by one would
    cost seconds and gigabytes. The primitives that vary freely, the instance uid (FHIR ``id``) and
    the SOP class code (FHIR ``code``), are checked for every instance (a sopClass object once: the
    instances of a series share one, ``MappedParts.shared``). Numbers are kept in range when built.
    """
    seen: set | None = None  # shapes of the kept instances, made only when an instance differs from the one before
    memo: dict = {}  # valid while the study holds its lists: ids are not reused before we return
    kept_all: list = []
    before = None  # the instance before: kept, or of a kept one's shape
    checked = None  # the sopClass checked last
    series_view = []
    for series in study.get("series", ()):
        kept = []
        for instance in series.get("instance", ()):
            if check_ids:
                if not _FHIR_ID.match(instance["uid"]):
                    return "series.instance.uid: not a valid FHIR id (DICOM UID expected)", study
                sop_class = instance["sopClass"]
                if sop_class is not checked:
                    if not _FHIR_CODE.match(sop_class["code"]):
                        return "series.instance.sopClass.code: not a valid FHIR code", study
                    checked = sop_class
            if before is not None and validation.same_shape(instance, before):
                before = instance
                continue  # mostly: alike instances share their extension lists, compared at once
            before = instance
            if kept_all:
                if seen is None:
                    seen = {validation.shape(old, memo) for old in kept_all}
                found = validation.shape(instance, memo)
                if found in seen:
                    continue
                seen.add(found)
            kept.append(instance)
            kept_all.append(instance)
        series_view.append({**series, "instance": kept} if "instance" in series else series)
    return None, {**study, "series": series_view}


class _Models(dict):
    """Resource type -> its fhir.resources R4B model, imported when first asked for (a run without
    Observations, Endpoints or ServiceRequests does not load them)."""

    MODULES = {"ImagingStudy": "imagingstudy", "Device": "device", "Observation": "observation",
               "Endpoint": "endpoint", "ServiceRequest": "servicerequest"}

    def __missing__(self, resource_type: str):
        import importlib

        module = importlib.import_module(f"fhir.resources.R4B.{self.MODULES[resource_type]}")
        model = self[resource_type] = getattr(module, resource_type)
        return model


class Validator:
    """Checks resources against the fhir.resources R4B models (FHIR R4-compatible); built once per worker.

    ``full=False`` (default) validates every resource, with the instance level of an ImagingStudy
    reduced to one instance per distinct shape (see ``validation_view``), and a structure pydantic
    has accepted before only value by value (see ``validation``): the same verdicts, once per
    structure instead of once per study.
    """

    def __init__(self, full: bool = False):
        self.full = full
        self.models = _Models()
        self.verdicts = None if full else validation.ShapeVerdicts()
        from pydantic import ValidationError  # not at every study (an import statement costs a lookup chain)

        self.invalid = ValidationError

    def problem(self, resources) -> tuple[str, str] | None:
        """(Reason.INVALID_FHIR, where and what) for the first invalid resource; values are not quoted."""
        for resource_type, resource in resources:
            if resource_type == "ImagingStudy" and not self.full:
                bad_uid, resource = checked_view(resource)
                if bad_uid:
                    return Reason.INVALID_FHIR, f"ImagingStudy: {bad_uid}"
            model = self.models[resource_type]
            if self.verdicts is not None:
                vouched, shape = self.verdicts.vouches(model, resource_type, resource)
                if vouched:
                    continue
            try:
                model.model_validate(resource)
            except self.invalid as exc:
                errors = exc.errors(include_input=False, include_url=False)
                where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:3])
                return Reason.INVALID_FHIR, f"{resource_type}: {where}"
            if self.verdicts is not None:
                self.verdicts.accept(shape)
        return None
