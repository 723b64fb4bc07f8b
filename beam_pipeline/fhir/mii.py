"""MII imaging profile ("Modul Bildgebung") extensions from DICOM header records.

One declarative table: each extension is a list of rows ``(DICOM path, sub-extension url, value
kind, argument)``, the value kind being the converter function itself (so a misspelt kind fails at
import, as pydicom maps VRs to converter functions); adding a sub-extension is adding a row. Pure functions over plain record dicts
(see ``beam_pipeline.dicom.fields``): no Beam, no pydicom. Values that are present but cannot be mapped
are counted in ``notes`` (``unparseable:<Keyword>``, ``unmapped:<Keyword>``, ``uncoded:<Keyword>``
for free text kept without a code) and left out; nothing here raises on bad header values.

DICOM paths: ``Keyword``; ``Keyword[i]`` for the i-th value of a multi-valued element;
``Sequence.Keyword`` for the first item of the sequence that has it; ``a|b`` tries ``a`` first and
falls back to ``b`` when ``a`` is absent or cannot be mapped.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from datetime import datetime
from decimal import Decimal
from typing import Callable, Mapping, NamedTuple

from beam_pipeline.codes import INVALID_KEY, MII_BASE, MII_STRUCTURE, V2_0203, sha256_id
from beam_pipeline.dicom.dates import parse_datetime
from beam_pipeline.fhir.config import ConversionConfig
from terminologies import SYSTEMS, Terminologies

EXT = MII_STRUCTURE + "mii-ex-bildgebung-"
CS = MII_BASE + "CodeSystem/mii-cs-bildgebung-"
UCUM = SYSTEMS["UCUM"]

# Codes of the MII code systems that the bound value sets allow (the abstract grouping codes such
# as PDC/MSC of the image-type system are not selectable, so they are not listed).
MII_CODES = {
    CS + "scanning-sequence": frozenset("SE IR GR EP RM".split()),
    CS + "scanning-sequence-variant": frozenset("SK MTC SS TRSS SP MP OSP NONE".split()),
    CS + "series-type": frozenset("STATIC DYNAMIC GATED WHOLEBODY IMAGE REPROJECTION".split()),
    CS + "transducer-type": frozenset(
        "SECTOR_PHASED SECTOR_MECH SECTOR_ANNULAR LINEAR CURVED_LINEAR SINGLE_CRYSTAL SPLIT_XTAL_CWD "
        "IV_PHASED IV_ROT_XTAL IV_ROT_MIRROR ENDOCAV_PA ENDOCAV_MECH ENDOCAV_CLA ENDOCAV_AA ENDOCAV_LINEAR "
        "VECTOR_PHASED".split()),
    CS + "instance-image-type": frozenset(
        "ORIGINAL DERIVED PRIMARY SECONDARY AXIAL LOCALIZER DENSITYMAP DIFFUSIONMAP IMAGEADDITION "
        "MODULUSSUBTRACT MPR OTHER PHASEMAP PHASESUBTRACT PROJECTIONIMAGE T1MAP T2MAP VELOCITYMAP STATIC "
        "DYNAMIC GATED WHOLEBODY TOMO GATEDTOMO RECONTOMO RECONGATEDTOMO ABDOMINAL BREAST CHEST ENDOCAVITARY "
        "ENDORECTAL ENDOVAGINAL EPICARDIAL FETAL_HEART GYNECOLOGY INTRACARDIAC INTRAOPERATIVE INTRAVASCULAR "
        "MUSCULOSKELETAL NEONATAL_HEAD OBSTETRICAL OPHTHALMIC PEDIATRIC PELVIC RETROPERITONEAL SCROTAL "
        "SMALL_PARTS TEE THYROID TRANSCRANIAL TTE US_BIOPSY VASCULAR EMISSION TRANSMISSION 0001 0002 0004 "
        "0008 0010 0020 0040 0100 0200 0400".split()),
}

# Contrast/Bolus Agent texts that state that no contrast was given (seen in practice, DE/EN).
NO_CONTRAST = frozenset({"NONE", "NO", "N", "0", "-", "KEIN", "KEINE", "KEIN KM", "OHNE", "OHNE KM", "NO CONTRAST"})

# Keywords read from any item of a code sequence (PS3.3 Table 8.8-1 basic code attributes).
CODE_ITEM_KEYWORDS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning", "LongCodeValue")

# Read by value kinds beyond their row's own path (tracer uptake time needs the acquisition time).
ACQUISITION_KEYWORDS = ("SeriesDate", "SeriesTime", "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime")

UNKNOWN_DATE = "19000101"  # placeholder day for bare DICOM times

MM = ("millimeter", "mm")
MS = ("milliseconds", "ms")
SECONDS = ("Seconds", "s")


class Row(NamedTuple):
    """One sub-extension (or simple extension value): where it comes from and how it is coded."""

    source: str      # DICOM path, see module docstring
    url: str         # sub-extension url (the extension url for simple extensions)
    kind: Callable   # the value kind: (value, arg, ctx) -> {"value[x]": ...}, None or {}
    arg: object = None  # (UCUM unit, UCUM code) | code system url | terminology name


class Complex(NamedTuple):
    url: str
    rows: tuple[Row, ...]
    required: tuple[str, ...] = ()  # sub-extensions with min 1: without them the extension is left out


class Context(NamedTuple):
    """What a value kind may consult besides the value: the record, tables and the notes."""

    record: Mapping
    terms: Terminologies
    notes: Counter
    keyword: str


# --- value kinds: (value, arg, ctx) -> {"value[x]": ...}, None (cannot map) or {} (nothing to emit) --

def _number(value) -> float | int | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def quantity_value(value, unit_code: tuple[str, str]) -> dict | None:
    number = _number(value)
    if number is None:
        return None
    unit, code = unit_code
    return {"valueQuantity": {"value": number, "unit": unit, "system": UCUM, "code": code}}


def _quantity(value, arg, ctx):
    """Measured header quantities are positive; DICOM writers put 0 where the value is unknown."""
    number = _number(value)
    return quantity_value(number, arg) if number is not None and number > 0 else None


def _string(value, arg, ctx):
    parts = value if isinstance(value, tuple) else (value,)
    text = "\\".join(p for p in parts if isinstance(p, str) and p)  # DICOM's own value separator
    return {"valueString": text} if text else None


def _distinct_text(values, arg, ctx):
    unique = list(dict.fromkeys(v for v in values if isinstance(v, str) and v))
    return {"valueString": "; ".join(unique)} if unique else None


def _yes_no(value, arg, ctx):
    flag = {"YES": True, "NO": False}.get(value.strip().upper()) if isinstance(value, str) else None
    return None if flag is None else {"valueBoolean": flag}


def _nonzero(value, arg, ctx):
    return None if _number(value) is None else {"valueBoolean": value != 0}


def _mii_code(value, system: str, ctx):
    """Each DICOM value becomes one coding; spaces are '_' (FETAL HEART) or dropped (WHOLE BODY)."""
    allowed = MII_CODES[system]
    codes, dropped = [], 0
    for raw in value if isinstance(value, tuple) else (value,):
        term = raw.strip().upper() if isinstance(raw, str) else ""
        code = next((c for c in (term, term.replace(" ", "_"), term.replace(" ", "")) if c in allowed), None)
        if code is None:
            dropped += 1
        elif code not in codes:
            codes.append(code)
    if not codes:
        return None
    if dropped:
        ctx.notes[f"unmapped:{ctx.keyword}"] += dropped
    return {"valueCodeableConcept": {"coding": [{"system": system, "code": c} for c in codes]}}


def code_item_coding(item: Mapping) -> dict | None:
    """A Coding for a DICOM code sequence item whose scheme has a FHIR system, else None."""
    scheme, meaning = item.get("CodingSchemeDesignator"), item.get("CodeMeaning")
    code = item.get("CodeValue") or item.get("LongCodeValue")
    if not isinstance(scheme, str) or scheme not in SYSTEMS or not isinstance(code, str):
        return None
    coding = {"system": SYSTEMS[scheme], "code": code}
    if isinstance(meaning, str) and meaning:
        coding["display"] = meaning
    return coding


def _first_item(value) -> Mapping | None:
    return next((i for i in value if isinstance(i, Mapping)), None) if isinstance(value, tuple) else None


def _coded(value, table: str, ctx):
    """CodeableConcept from a code sequence (table lookup, then the item's own scheme) or free text."""
    lookup = getattr(ctx.terms, table)
    modality = ctx.record.get("Modality")
    item = _first_item(value)
    if item is not None:
        code, meaning = item.get("CodeValue") or item.get("LongCodeValue"), item.get("CodeMeaning")
        coding = lookup(code=code, modality=modality) or code_item_coding(item) or lookup(meaning=meaning,
                                                                                          modality=modality)
        text = meaning if isinstance(meaning, str) else None
    elif isinstance(value, str):
        coding, text = lookup(meaning=value, modality=modality), value
    else:
        return None
    if coding is None and text is None:
        return None
    if coding is None:
        ctx.notes[f"uncoded:{ctx.keyword}"] += 1
    concept = {"coding": [coding]} if coding else {}
    if text:
        concept["text"] = text
    return {"valueCodeableConcept": concept}


def _view_position(value, arg, ctx):
    item = _first_item(value)
    if item is not None:
        coding = code_item_coding(item)
        coding = coding if coding and coding["system"] == SYSTEMS["SCT"] else None
    else:
        coding = ctx.terms.view_position(value, ctx.record.get("Modality") or "DX")
    return {"valueCodeableConcept": {"coding": [coding]}} if coding else None


def _units(value, arg, ctx):
    coding = ctx.terms.units(value)
    return {"valueCodeableConcept": {"coding": [coding]}} if coding else None


def _contrast_given(value, arg, ctx):
    if not isinstance(value, str):
        return None
    return {"valueBoolean": value.strip().upper() not in NO_CONTRAST}


def _contrast_agent(value, arg, ctx):
    """The agent's name as a display-only reference: the profile has no coded agent element."""
    if not isinstance(value, str):
        return None
    if value.strip().upper() in NO_CONTRAST:
        return {}  # deliberately nothing: no agent was given
    return {"valueReference": {"display": value}}


def _acquisition_start(record: Mapping) -> tuple[datetime | None, bool]:
    """When the series was acquired, and whether its date is known (else only the time of day)."""
    for date, time in ((record.get("SeriesDate"), record.get("SeriesTime")),
                       (record.get("AcquisitionDateTime"), ""),
                       (record.get("AcquisitionDate"), record.get("AcquisitionTime"))):
        if date and time is not None and (moment := parse_datetime(date, time)):
            return moment, True
    for time in (record.get("SeriesTime"), record.get("AcquisitionTime")):
        if time and (moment := parse_datetime(UNKNOWN_DATE, time)):
            return moment, False
    return None, False


def _seconds_of_day(moment: datetime) -> float:
    return moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6


def _seconds_since(value, unit_code, ctx):
    """Uptake time: series acquisition minus radiopharmaceutical injection.

    With dates on both sides the difference is exact (delayed NM scans span days); with a bare
    injection time it is taken modulo one day (injection before midnight, scan after).
    """
    if not isinstance(value, str):
        return None
    end, end_dated = _acquisition_start(ctx.record)
    dated = ctx.keyword.endswith("DateTime")
    start = parse_datetime(value, "") if dated else parse_datetime(UNKNOWN_DATE, value)
    if end is None or start is None:
        return None
    if dated and end_dated:
        seconds = (end - start).total_seconds()
    else:
        seconds = (_seconds_of_day(end) - _seconds_of_day(start)) % 86400
    return quantity_value(round(seconds, 3), unit_code) if seconds >= 0 else None


ALL_MATCHES_KINDS = frozenset({_distinct_text})  # these receive every match (all sequence items)


# --- the mapping table ---------------------------------------------------------------------------

RADIO = "RadiopharmaceuticalInformationSequence."
UPTAKE_SEQUENCE = RADIO[:-1]  # its uptake time is the only row reading ACQUISITION_KEYWORDS
X_RAY_ROWS = (
    Row("KVP", "KVP", _quantity, ("kilovolt", "kV")),
    Row("ExposureTime|ExposureTimeInms", "exposureTime", _quantity, MS),
    Row("Exposure|ExposureInmAs", "exposure", _quantity, ("milliampere second", "mA.s")),
    Row("XRayTubeCurrent|XRayTubeCurrentInmA", "xRayTubeCurrent", _quantity, ("milliampere", "mA")),
)


def _nuclear_rows(total_dose_unit: tuple[str, str]) -> tuple[Row, ...]:
    """PT and NM share the isotope rows; only the dose unit differs (PET: Bq, NM: MBq, as in DICOM)."""
    return (
        Row(f"{RADIO}RadiopharmaceuticalCodeSequence|{RADIO}Radiopharmaceutical", "radiopharmaceutical",
            _coded, "radiopharmaceutical"),
        Row(f"{RADIO}RadionuclideCodeSequence", "radionuclide", _coded, "radionuclide"),
        Row(f"{RADIO}RadiopharmaceuticalStartDateTime|{RADIO}RadiopharmaceuticalStartTime", "tracerExposureTime",
            _seconds_since, SECONDS),
        Row("Units", "units", _units),
        Row(f"{RADIO}RadionuclideTotalDose", "radionuclideTotalDose", _quantity, total_dose_unit),
        Row(f"{RADIO}RadionuclideHalfLife", "radionuclideHalfLife", _quantity, SECONDS),
    )


CT = Complex(EXT + "modalitaet-ct", (
    Row("CTDIvol", "CTDIvol", _quantity, ("milligray", "mGy")),
    *X_RAY_ROWS,
    Row("ConvolutionKernel", "convolutionalKernel", _string),
))
MG_CR_DX = Complex(EXT + "modalitaet-mg-cr-dx", (
    *X_RAY_ROWS,
    Row("ViewCodeSequence|ViewPosition", "viewPosition", _view_position),
))
MR = Complex(EXT + "modalitaet-mr", (
    Row("MagneticFieldStrength", "magneticFieldStrength", _quantity, ("tesla", "T")),
    Row("ScanningSequence", "scanningSequence", _mii_code, CS + "scanning-sequence"),
    Row("SequenceVariant", "scanningSequenceVariant", _mii_code, CS + "scanning-sequence-variant"),
    Row("EchoTime", "echoTime", _quantity, MS),
    Row("RepetitionTime", "repetitionTime", _quantity, MS),
    Row("InversionTime", "inversionTime", _quantity, MS),
    Row("FlipAngle", "flipAngle", _quantity, ("plane angle degree", "deg")),
))
PT = Complex(EXT + "modalitaet-pt", (
    *_nuclear_rows(("Becquerel", "Bq")),
    Row("SeriesType", "seriesType", _mii_code, CS + "series-type"),
))
NM = Complex(EXT + "modalitaet-nm", _nuclear_rows(("Megabecquerel", "MBq")))
US = Complex(EXT + "modalitaet-us", (
    Row("TransducerType", "transducerType", _mii_code, CS + "transducer-type"),
    Row("SequenceOfUltrasoundRegions.TransducerFrequency", "transducerFrequency", _quantity, ("kilohertz", "kHz")),
    Row("SequenceOfUltrasoundRegions.PulseRepetitionFrequency", "pulseRepetitionFrequency", _quantity,
        ("hertz", "Hz")),
    Row("UltrasoundColorDataPresent", "ultrasoundColor", _nonzero),
))
KONTRASTMITTEL = Complex(EXT + "kontrastmittel", (
    Row("ContrastBolusAgent", "contrastBolus", _contrast_given),
    Row("ContrastBolusAgent", "contrastBolusDetails", _contrast_agent),
), required=("contrastBolus",))
INSTANZ_DETAILS = Complex(EXT + "instanz-details", (
    # PixelSpacing is (row spacing, column spacing): X (across a row) is the 2nd value. Projection
    # radiographs often carry only the detector-plane ImagerPixelSpacing.
    Row("PixelSpacing[1]|ImagerPixelSpacing[1]", "pixelSpacingX", _quantity, MM),
    Row("PixelSpacing[0]|ImagerPixelSpacing[0]", "pixelSpacingY", _quantity, MM),
    Row("SliceThickness", "sliceThickness", _quantity, MM),
    Row("ImageType", "imageType", _mii_code, CS + "instance-image-type"),
    Row("BurnedInAnnotation", "burnedInAnnotation", _yes_no),
))
SCHICHTDICKE = Row("SliceThickness", EXT + "serie-schichtdicke", _quantity, MM)
BILDGEBUNGSGRUND = Row("RequestAttributesSequence.ReasonForTheRequestedProcedure|ReasonForTheRequestedProcedure",
                       EXT + "bildgebungsgrund", _distinct_text)

MODALITY_EXTENSIONS = {"CT": CT, "MR": MR, "MG": MG_CR_DX, "CR": MG_CR_DX, "DX": MG_CR_DX, "PT": PT, "NM": NM,
                       "US": US}


class Vital(NamedTuple):
    """A body measurement from the study header that becomes a vital-sign Observation."""

    keyword: str
    extension_url: str
    profile: str
    loinc: tuple[str, str]
    snomed: tuple[str, str]
    unit: tuple[str, str]  # UCUM (unit, code) of the Observation value
    plausible_max: float  # DICOM units; larger values are typically cm/g written by mistake
    decimal_shift: int = 0  # powers of ten from the DICOM unit to ``unit`` (m -> cm: 2)


VITALS = (
    Vital("PatientWeight", EXT + "gewicht", "http://fhir.de/StructureDefinition/observation-de-vitalsign-koerpergewicht",
          ("29463-7", "Body weight"), ("27113001", "Body weight"), ("kg", "kg"), 700.0),
    Vital("PatientSize", EXT + "groesse", "http://fhir.de/StructureDefinition/observation-de-vitalsign-koerpergroesse",
          ("8302-2", "Body height"), ("50373000", "Body height measure"), ("cm", "cm"), 3.0, decimal_shift=2),
)
# DICOM PatientSize is in metres; the R4 vital-signs bodyheight profile (applied by validators to
# every LOINC 8302-2 Observation) allows only UCUM ``cm`` or ``[in_i]``.

PROCEDURE_CODE_SOURCE = "ProcedureCodeSequence"
ADMISSION_ID = "AdmissionID"


# --- DICOM paths ---------------------------------------------------------------------------------

class _Path(NamedTuple):
    keywords: tuple[str, ...]
    index: int | None


def _parse_path(text: str) -> _Path:
    match = re.fullmatch(r"([A-Za-z0-9.]+)(?:\[(\d+)\])?", text)
    if match is None:
        raise ValueError(f"bad DICOM path {text!r}")
    return _Path(tuple(match.group(1).split(".")), int(match.group(2)) if match.group(2) else None)


def _alternatives(source: str) -> tuple[_Path, ...]:
    return tuple(_parse_path(p) for p in source.split("|"))


def _invalid(container: Mapping) -> tuple:
    keywords = container.get(INVALID_KEY, ())
    return keywords if isinstance(keywords, tuple) else ()


def _matches(container: Mapping, keywords: tuple[str, ...]) -> tuple[list, bool]:
    """All values at ``keywords`` (across sequence items, in order) and whether one was unparseable."""
    head, rest = keywords[0], keywords[1:]
    value = container.get(head)
    if value is None:
        return [], head in _invalid(container)
    if not rest:
        return [value], False
    found, invalid = [], False
    for item in value if isinstance(value, tuple) else ():
        if isinstance(item, Mapping):
            values, bad = _matches(item, rest)
            found.extend(values)
            invalid = invalid or bad
    return found, invalid


def _pick(value, index: int | None):
    if index is None:
        return value
    return value[index] if isinstance(value, tuple) and len(value) > index else None


SERIES_ROWS = (*(row for spec in (*dict.fromkeys(MODALITY_EXTENSIONS.values()), KONTRASTMITTEL) for row in spec.rows),
               SCHICHTDICKE)
ALL_ROWS = (*SERIES_ROWS, *INSTANZ_DETAILS.rows, BILDGEBUNGSGRUND)
PATHS = {row.source: _alternatives(row.source) for row in ALL_ROWS}  # parsed once, at import




def row_value(row: Row, record: Mapping, terms: Terminologies, notes: Counter) -> dict | None:
    """The value[x] entry for one row: the first path alternative that is present and maps."""
    convert = row.kind
    problem = None
    for path in PATHS[row.source]:
        keyword = path.keywords[-1]
        values, invalid = _matches(record, path.keywords)
        if invalid and problem is None:
            problem = f"unparseable:{keyword}"
        if not values:
            continue
        ctx = Context(record, terms, notes, keyword)
        if row.kind in ALL_MATCHES_KINDS:
            result = convert([_pick(v, path.index) for v in values], row.arg, ctx)
        else:
            picked = _pick(values[0], path.index)
            result = None if picked is None else convert(picked, row.arg, ctx)
        if result is not None:
            return result
        problem = problem or f"unmapped:{keyword}"
    if problem:
        notes[problem] += 1
    return None


def complex_extension(spec: Complex, record: Mapping, terms: Terminologies, notes: Counter) -> dict | None:
    """A complex extension with the rows that map, or None if none (or a required one) maps."""
    subs = [{"url": row.url, **value} for row in spec.rows if (value := row_value(row, record, terms, notes))]
    urls = {sub["url"] for sub in subs}
    if not subs or any(url not in urls for url in spec.required):
        return None
    return {"url": spec.url, "extension": subs}


def simple_extension(row: Row, record: Mapping, terms: Terminologies, notes: Counter) -> dict | None:
    value = row_value(row, record, terms, notes)
    return {"url": row.url, **value} if value else None


# --- public API ----------------------------------------------------------------------------------

def series_extensions(series: Mapping, terms: Terminologies, include_instances: bool, notes: Counter) -> list[dict]:
    """Modality extension (by Modality), kontrastmittel, and serie-schichtdicke without instances."""
    modality = series.get("Modality")
    specs = [MODALITY_EXTENSIONS.get(modality) if isinstance(modality, str) else None, KONTRASTMITTEL]
    out = [ext for spec in specs if spec and (ext := complex_extension(spec, series, terms, notes))]
    if not include_instances and (thickness := simple_extension(SCHICHTDICKE, series, terms, notes)):
        out.append(thickness)
    return out


def instance_extensions(instance: Mapping, terms: Terminologies, notes: Counter) -> list[dict]:
    """``mii-ex-bildgebung-instanz-details`` when any of its values is present."""
    ext = complex_extension(INSTANZ_DETAILS, instance, terms, notes)
    return [ext] if ext else []


def procedure_codes(study: Mapping, notes: Counter) -> list[dict]:
    """CodeableConcepts from Procedure Code Sequence; unknown coding schemes keep only the text."""
    concepts = []
    items = study.get(PROCEDURE_CODE_SOURCE)
    for item in items if isinstance(items, tuple) else ():
        if not isinstance(item, Mapping):
            continue
        coding = code_item_coding(item)
        parts = (item.get("CodeMeaning"),) if isinstance(item.get("CodeMeaning"), str) else (
            item.get("CodingSchemeDesignator"), item.get("CodeValue"))
        text = " ".join(p for p in parts if isinstance(p, str) and p)
        if coding:
            concepts.append({"coding": [coding]})
        elif text:
            notes[f"uncoded:{PROCEDURE_CODE_SOURCE}"] += 1
            concepts.append({"text": text})
        else:
            notes[f"unmapped:{PROCEDURE_CODE_SOURCE}"] += 1
    return concepts


def encounter_reference(admission_id: str, system: str) -> dict:
    """Reference to the Encounter whose visit number is the DICOM Admission ID."""
    return {
        "reference": f"Encounter/{sha256_id(system, admission_id)}",
        "identifier": {
            "type": {"coding": [{"system": V2_0203, "code": "VN", "display": "Visit number"}]},
            "system": system,
            "value": admission_id,
        },
    }


def shift_decimal(value: float | int, places: int) -> float | int:
    """``value * 10**places`` without binary noise (1.81 m -> 181 cm, not 181.00000000000003).

    DICOM DS values have at most 16 characters, so ``repr`` of the parsed float is the written decimal.
    """
    if not places:
        return value
    shifted = Decimal(repr(value)).scaleb(places)
    return int(shifted) if shifted == shifted.to_integral_value() else float(shifted)


class VitalContext(NamedTuple):
    """What a vital-sign Observation takes from its study."""

    study_uid: str = ""
    subject: dict | None = None
    started: str | None = None


def vital_observation(vital: Vital, value: float, config: VitalContext) -> dict:
    """A vital-sign Observation (HL7/DE vital-signs shape); id is a hash of study UID and LOINC code."""
    observation = {
        "resourceType": "Observation",
        "id": sha256_id(config.study_uid, vital.loinc[0]),
        "meta": {"profile": [vital.profile]},
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs", "display": "Vital Signs"}]}],
        "code": {"coding": [
            {"system": SYSTEMS["LN"], "code": vital.loinc[0], "display": vital.loinc[1]},
            {"system": SYSTEMS["SCT"], "code": vital.snomed[0], "display": vital.snomed[1]},
        ]},
    }
    if config.subject:
        observation["subject"] = dict(config.subject)
    if config.started:
        observation["effectiveDateTime"] = config.started
    value = shift_decimal(value, vital.decimal_shift)  # DICOM unit -> the Observation's unit
    observation["valueQuantity"] = quantity_value(value, vital.unit)["valueQuantity"]
    return observation


def _vitals(study: Mapping, config: VitalContext, notes: Counter) -> tuple[list[dict], list[dict]]:
    extensions, observations = [], []
    for vital in VITALS:
        if vital.keyword in _invalid(study):
            notes[f"unparseable:{vital.keyword}"] += 1
        if vital.keyword not in study:
            continue
        value = _number(study[vital.keyword])
        if value is None or not 0 < value <= vital.plausible_max:  # 0 is the usual "unknown" filler
            notes[f"unmapped:{vital.keyword}"] += 1
            continue
        observation = vital_observation(vital, value, config)
        observations.append(observation)
        extensions.append({"url": vital.extension_url, "valueReference": {"reference": f"Observation/{observation['id']}"}})
    return extensions, observations


def study_elements(study: Mapping, config: ConversionConfig, terms: Terminologies, notes: Counter, *,
                   study_uid: str = "", subject: dict | None = None, started: str | None = None) -> dict:
    """Study-level MII elements: extensions, encounter, procedureCode and vital-sign Observations."""
    out = {}
    if study.keys().isdisjoint(_STUDY_SOURCES if config.observations else _STUDY_SOURCES_WITHOUT_VITALS):
        return out  # most studies: none of the values these are made from (nothing to note either)
    extensions = [ext for ext in (simple_extension(BILDGEBUNGSGRUND, study, terms, notes),) if ext]
    observations = []
    if config.observations:
        vital_extensions, observations = _vitals(study, VitalContext(study_uid, subject, started), notes)
        extensions += vital_extensions
    if extensions:
        out["extension"] = extensions
    admission = study.get(ADMISSION_ID)
    if isinstance(admission, str) and admission:
        out["encounter"] = encounter_reference(admission, config.encounter_id_system)
    if codes := procedure_codes(study, notes):
        out["procedureCode"] = codes
    if observations:
        out["observations"] = observations
    return out


# --- what the reader must extract (derived from the table, so it cannot drift) --------------------

def _top_keywords(rows, extra=()) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*extra, *(path.keywords[0] for row in rows for path in PATHS[row.source])]))


KEYWORDS: dict[str, tuple[str, ...]] = {
    "study": _top_keywords([BILDGEBUNGSGRUND], (ADMISSION_ID, PROCEDURE_CODE_SOURCE, *(v.keyword for v in VITALS))),
    "series": _top_keywords(SERIES_ROWS, ("Modality", *ACQUISITION_KEYWORDS)),
    "instance": _top_keywords(INSTANZ_DETAILS.rows),
}
# A study without any of these has no study elements (without Observations, vital signs make none)
_STUDY_SOURCES = frozenset((*KEYWORDS["study"], INVALID_KEY))
_STUDY_SOURCES_WITHOUT_VITALS = frozenset((*_top_keywords([BILDGEBUNGSGRUND], (ADMISSION_ID, PROCEDURE_CODE_SOURCE)),
                                           INVALID_KEY))


def _item_keywords() -> dict[str, tuple[str, ...]]:
    items: dict[str, set] = {}
    for path in (path for paths in PATHS.values() for path in paths):
        for parent, child in zip(path.keywords, path.keywords[1:]):
            items.setdefault(parent, set()).add(child)
    names = {*items, *(c for children in items.values() for c in children), *(k for ks in KEYWORDS.values() for k in ks)}
    for name in names:
        if name.endswith("CodeSequence"):  # coded items: read the basic code attributes
            items.setdefault(name, set()).update(CODE_ITEM_KEYWORDS)
    return {name: tuple(sorted(children)) for name, children in sorted(items.items())}


SEQUENCE_ITEM_KEYWORDS: dict[str, tuple[str, ...]] = _item_keywords()
