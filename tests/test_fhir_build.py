"""The mapping as pure functions over plain records: no Beam."""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from datetime import datetime

import pytest

from beam_pipeline.fhir import build as fhir_build
from beam_pipeline.fhir import validation
from beam_pipeline.fhir.build import build_study, dicom_datetime
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.fhir.study import StudyGroup
from terminologies import Terminologies

KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")


def record(sop, series="1.2.3.1", number=None, **extra):
    rec = {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": series, "SOPInstanceUID": sop,
           "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "PatientID": "P1", "Modality": "CT"}
    if number is not None:
        rec["InstanceNumber"] = number
    rec.update(extra)
    return rec


@pytest.fixture(scope="module")
def terms():
    return Terminologies.load()


@pytest.mark.parametrize("date, time, offset, expected", [
    ("20050906", "163926", None, "2005-09-06T16:39:26+02:00"),          # Berlin summer time
    ("20050106", "163926", None, "2005-01-06T16:39:26+01:00"),          # Berlin winter time
    ("20050906", "163926.123456", None, "2005-09-06T16:39:26.123456+02:00"),
    ("20050906", "1639", None, "2005-09-06T16:39:00+02:00"),
    ("20050906", "163926", "-0500", "2005-09-06T16:39:26-05:00"),
    ("2005.09.06", "16:39:26", None, "2005-09-06T16:39:26+02:00"),       # ACR-NEMA style
    ("20050906", None, None, "2005-09-06"),
])
def test_dicom_datetime(date, time, offset, expected):
    notes = Counter()
    assert dicom_datetime(date, time, offset, "Europe/Berlin", notes, "StudyDate") == expected
    assert not notes


@pytest.mark.parametrize("date, time, note", [
    ("20051399", "120000", "unparseable:StudyDate"),
    ("2005", None, "unparseable:StudyDate"),
    ("20050906", "25xx", "unparseable:StudyTime"),
])
def test_unparseable_dates_are_counted_not_raised(date, time, note):
    notes = Counter()
    result = dicom_datetime(date, time, None, "Europe/Berlin", notes, "StudyDate")
    assert notes[note] == 1
    assert result in (None, "2005-09-06")


def test_ids_follow_the_readme_formulas(terms):
    group = StudyGroup("1.2.3").add(record("1.2.3.1.1", DeviceSerialNumber="SN1", Manufacturer="ACME"), KEYS)
    built = build_study(group, ConversionConfig(), terms)
    study = built.resources[0][1]
    assert study["id"] == hashlib.sha256(
        b"https://fhir.diz.uk-erlangen.de/identifiers/imagingstudy-id|1.2.3").hexdigest()
    assert study["subject"]["reference"] == "Patient/" + hashlib.sha256(
        b"https://fhir.diz.uk-erlangen.de/identifiers/patient-id|P1").hexdigest()
    device = built.resources[1][1]
    assert device["id"] == hashlib.sha256(b"SN1|ACME").hexdigest()
    assert study["series"][0]["performer"] == [{"actor": {"reference": "Device/" + device["id"]}}]


def test_patient_id_length_truncates_and_counts(terms):
    group = StudyGroup("1.2.3").add(record("1.2.3.1.1", PatientID="1234567890123"), KEYS)
    built = build_study(group, ConversionConfig(patient_id_length=9), terms)
    assert built.resources[0][1]["subject"]["identifier"]["value"] == "123456789"
    assert built.notes["truncated:PatientID"] == 1


def test_arrival_order_and_bundling_do_not_change_the_result(terms):
    records = [record(f"1.2.3.{s}.{i}", series=f"1.2.3.{s}", number=(i * 7) % 5, SeriesNumber=s)
               for s in (3, 1, 2) for i in range(6)]
    records.append(dict(records[0]))  # an exact duplicate
    expected = build_study(_group(records), ConversionConfig(), terms).resources
    rng = random.Random(7)
    for _ in range(5):
        shuffled = records[:]
        rng.shuffle(shuffled)
        cut = rng.randrange(1, len(shuffled))
        merged = _group(shuffled[:cut]).merge(_group(shuffled[cut:]))
        assert build_study(merged, ConversionConfig(), terms).resources == expected
    study = expected[0][1]
    assert [s["number"] for s in study["series"]] == [1, 2, 3]
    assert study["numberOfInstances"] == 18


def test_no_instances_and_no_devices(terms):
    group = StudyGroup("1.2.3").add(record("1.2.3.1.1", DeviceSerialNumber="SN1"), KEYS)
    built = build_study(group, ConversionConfig(include_instances=False, include_devices=False), terms)
    assert [t for t, _ in built.resources] == ["ImagingStudy"]
    series = built.resources[0][1]["series"][0]
    assert "instance" not in series and "performer" not in series
    assert series["numberOfInstances"] == 1


def test_body_site_and_laterality_are_snomed(terms):
    group = StudyGroup("1.2.3").add(record("1.2.3.1.1", BodyPartExamined="head", Laterality="L"), KEYS)
    series = build_study(group, ConversionConfig(), terms).resources[0][1]["series"][0]
    assert series["bodySite"]["system"] == "http://snomed.info/sct"
    assert series["bodySite"]["code"] == "69536005"
    assert series["laterality"]["code"] == "7771000"


def test_missing_patient_id_rejects_the_study(terms):
    rec = record("1.2.3.1.1")
    del rec["PatientID"]
    built = build_study(StudyGroup("1.2.3").add(rec, KEYS), ConversionConfig(), terms)
    assert built.rejection[0] == fhir_build.MISSING_PATIENT_ID
    assert not built.resources


def _group(records):
    group = StudyGroup("1.2.3")
    for rec in records:
        group.add(rec, KEYS)
    return group


def test_sampled_validation_sees_every_uid_and_each_instance_shape(terms):
    records = [record(f"1.2.3.1.{i}", number=i) for i in range(1, 40)]
    built = build_study(_group(records), ConversionConfig(), terms)
    study = built.resources[0][1]
    view = fhir_build.validation_view(study)
    assert len(view["series"][0]["instance"]) == 1          # all alike: one shape
    assert len(study["series"][0]["instance"]) == 39        # the written resource is untouched
    validator = fhir_build.Validator()
    assert validator.problem(built.resources) is None
    study["series"][0]["instance"][-1]["uid"] = "1.2.3 bad uid"   # not the sampled instance
    assert validator.problem(built.resources)[0] == "invalid-fhir"
    study["series"][0]["instance"][-1]["uid"] = "1.2.3.1.99"
    study["series"][0]["instance"][-1]["number"] = "seven"          # a new shape: validated
    assert validator.problem(built.resources)[0] == "invalid-fhir"
    assert fhir_build.Validator(full=True).problem(built.resources)[0] == "invalid-fhir"


@pytest.mark.parametrize("date, time, offset, expected, note", [
    ("09990101", None, None, "0999-01-01", None),                               # FHIR wants 4 digits
    ("20050906", "120000", "+1430", "2005-09-06T12:00:00+02:00", "unparseable:TimezoneOffsetFromUTC"),
    ("20050906", "120000", "+1400", "2005-09-06T12:00:00+14:00", None),
    ("20050906", "12.5", None, "2005-09-06", "unparseable:StudyTime"),    # a fraction needs seconds
])
def test_dates_stay_within_fhir_datetime(date, time, offset, expected, note):
    notes = Counter()
    assert dicom_datetime(date, time, offset, "Europe/Berlin", notes, "StudyDate") == expected
    assert list(notes) == ([note] if note else [])


def test_numbers_beyond_fhir_unsigned_int_are_left_out_and_counted(terms):
    group = _group([record("1.2.3.1.1", number=999999999999, SeriesNumber=20230101123),
                    record("1.2.3.1.2", number=2, SeriesNumber=20230101123)])
    built = build_study(group, ConversionConfig(), terms)
    series = built.resources[0][1]["series"][0]
    assert "number" not in series
    assert [i.get("number") for i in series["instance"]] == [2, None]
    assert built.notes["out-of-range:InstanceNumber"] == 1
    assert built.notes["out-of-range:SeriesNumber"] == 1
    assert fhir_build.Validator().problem(built.resources) is None


def test_sampled_validation_checks_every_sop_class(terms):
    records = [record(f"1.2.3.1.{i}", number=i) for i in range(1, 5)]
    records[-1]["SOPClassUID"] = "1.2.840  10008"  # two spaces: not a FHIR code
    built = build_study(_group(records), ConversionConfig(), terms)
    assert fhir_build.Validator().problem(built.resources)[0] == "invalid-fhir"
    assert fhir_build.Validator(full=True).problem(built.resources)[0] == "invalid-fhir"


def test_one_dicom_date_parser_serves_both_fhir_datetimes_and_arithmetic():
    from beam_pipeline.dicom.dates import parse_datetime

    assert parse_datetime("20240719", "120330.5") == datetime(2024, 7, 19, 12, 3, 30, 500000)
    assert parse_datetime("20240719120330+0200", "") == datetime(2024, 7, 19, 12, 3, 30)  # a DT
    assert parse_datetime("20240719", "") is None and parse_datetime("20241399", "12") is None
    assert parse_datetime("2024.07.19", "25") is None


BAD_VALUES = ["", " padded", "two  spaces", "line\x0bfeed", "2021-02-30", "2021-13-01T00:00:00Z", "not a date",
              "urn:oid:01.2", -1, 2**31, 1.5, float("nan"), True, None, "a" * 65, "ünïcode id", "x" * 3]


def _leaves(value, path=()):
    if isinstance(value, dict):
        for key, item in value.items():
            if key != "resourceType":
                yield from _leaves(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, path + (index,))
    else:
        yield path


def _replaced(resource, path, value):
    import copy

    changed = copy.deepcopy(resource)
    target = changed
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return changed


def test_a_structure_validated_once_vouches_only_for_values_that_pass_their_type(terms):
    """The per-worker verdicts by structure give pydantic's verdict, and its message, on every
    resource: one bad primitive value anywhere in a study or a Device (each of a structure accepted
    before) is found as the model would find it."""
    from pydantic import ValidationError

    records = [record(f"1.2.3.1.{i}", number=i, StudyDescription="Chest", SeriesDescription="AX",
                      StudyDate="20210104", StudyTime="073000", AccessionNumber="ACC1", BodyPartExamined="CHEST",
                      DeviceSerialNumber="SN1", Manufacturer="ACME", ManufacturerModelName="M1",
                      PixelSpacing=(0.5, 0.5), ImageType=("ORIGINAL", "PRIMARY")) for i in range(1, 4)]
    built = build_study(_group(records), ConversionConfig(), terms)
    validator = fhir_build.Validator()
    validator.verdicts.compile_after = 2  # the compiled checks too, not only the walk
    assert validator.problem(built.resources) is None  # accepts both structures
    rng = random.Random(7)
    checked = 0
    for resource_type, resource in built.resources:
        model = validator.models[resource_type]
        view = fhir_build.validation_view(resource) if resource_type == "ImagingStudy" else resource
        for path in _leaves(view):
            for bad in rng.sample(BAD_VALUES, 4):
                if "instance" in path and path[-1] in ("uid", "code") and not isinstance(bad, str):
                    continue  # built from strings only: checked_view reads them as such
                changed = _replaced(view, path, bad)
                try:
                    model.model_validate(changed)
                    expected = None
                except ValidationError as exc:
                    expected = exc.errors(include_input=False, include_url=False)[0]["msg"]
                got = validator.problem([(resource_type, changed)])
                assert (got is None) == (expected is None), (resource_type, path, bad, got, expected)
                assert got is None or expected in got[1] or "not a valid FHIR" in got[1]  # uid and sopClass: own check
                checked += 1
    assert checked > 100
    assert validator.verdicts.accepted  # the structures were kept, not validated anew each time
    assert validator.verdicts.compiled  # and the alike ones checked by compiled code


def test_a_compiled_structure_matches_only_its_own_structure(terms):
    """Once a structure is compiled, a resource of another structure (a list one longer, keys in
    another order, a value of another type, a key more) is not taken for it, and one of its
    structure with a bad value is caught: each gets the verdict the model gives it."""
    import copy

    from pydantic import ValidationError

    records = [record(f"1.2.3.1.{i}", number=i, StudyDescription="Chest", DeviceSerialNumber="SN1",
                      Manufacturer="ACME", BodyPartExamined="CHEST") for i in range(1, 4)]
    built = build_study(_group(records), ConversionConfig(), terms)
    validator = fhir_build.Validator()
    validator.verdicts.compile_after = 2
    for _ in range(3):
        assert validator.problem(built.resources) is None
    assert set(validator.verdicts.compiled) == {"ImagingStudy", "Device"}
    study = fhir_build.validation_view(built.resources[0][1])
    device = built.resources[1][1]
    longer = copy.deepcopy(study)
    longer["series"].append({**longer["series"][0], "uid": "1.2.3.9"})
    reordered = {"id": study["id"], **study}
    typed = {**study, "numberOfSeries": "1"}
    more = {**study, "language": "en"}
    bad_more = {**study, "language": "two  spaces"}
    bad_device = {**device, "status": " padded"}
    bad_id = {**study, "id": "not an id!"}  # its structure: the compiled check finds the value
    longer_device = {**device, "identifier": device["identifier"] * 2}
    verdicts = []
    for resource_type, resource in [("ImagingStudy", longer), ("ImagingStudy", reordered), ("ImagingStudy", typed),
                                    ("ImagingStudy", more), ("ImagingStudy", bad_more), ("Device", bad_device),
                                    ("Device", longer_device), ("ImagingStudy", bad_id)]:
        try:
            validator.models[resource_type].model_validate(resource)
            expected = None
        except ValidationError:
            expected = "invalid-fhir"
        got = validator.problem([(resource_type, resource)])
        assert (got and got[0]) == expected, (resource_type, resource, got)
        assert validator.problem([(resource_type, resource)]) == got  # and again, compiled or not
        verdicts.append(expected)
    assert verdicts.count(None) >= 3 and verdicts.count("invalid-fhir") >= 3
    assert validator.problem([("ImagingStudy", study)]) is None


def test_mapped_parts_kept_across_studies_give_what_each_study_maps_alone(terms):
    """A worker's ``MappedParts`` serves the alike series and instances of many studies: each
    study gets the resources and notes it gets alone; a series or instance that differs in one
    value (or in an unparseable one), or whose uptake time reads its acquisition time, is mapped
    for itself."""
    from beam_pipeline.codes import INVALID_KEY
    from beam_pipeline.fhir import keywords

    def group(uid, **values):
        records = [record(f"{uid}.1.{i}", series=f"{uid}.1", number=i, StudyInstanceUID=uid, **values)
                   for i in (1, 2)]
        built = StudyGroup(uid)
        for rec in records:
            built.add(rec, keywords.instance_keys())
        return built

    ct = dict(KVP=120.0, ExposureTime=500, Exposure=7, PixelSpacing=(0.5, 0.5), SliceThickness=1.0,
              ImageType=("ORIGINAL", "PRIMARY"), SeriesDate="20240101")
    pet = dict(Modality="PT", SeriesDate="20240101", RadiopharmaceuticalInformationSequence=(
        {"Radiopharmaceutical": "FDG", "RadiopharmaceuticalStartTime": "100000"},))
    groups = {"alike": group("1.2.3", **ct), "later": group("1.2.4", **{**ct, "SeriesDate": "20240202"}),
              "kvp": group("1.2.5", **{**ct, "KVP": 140.0}), "spacing": group("1.2.6", **{**ct, "PixelSpacing": (0.7, 0.7)}),
              "bad kvp": group("1.2.7", **{**{k: v for k, v in ct.items() if k != "KVP"}, INVALID_KEY: ("KVP",)}),
              "no kvp": group("1.2.8", **{k: v for k, v in ct.items() if k != "KVP"}),
              "pet 11h": group("1.2.9", **pet, SeriesTime="110000"), "pet 12h": group("1.2.10", **pet, SeriesTime="120000")}
    parts = fhir_build.MappedParts()
    series = {}
    for _ in range(2):
        for name, study in groups.items():
            shared = build_study(study, ConversionConfig(), terms, parts)
            alone = build_study(study, ConversionConfig(), terms)
            assert shared.resources == alone.resources and shared.notes == alone.notes, name
            series[name] = shared.resources[0][1]["series"][0]
    assert len(parts.entries) >= 4  # kept, not mapped anew per study
    assert series["alike"]["extension"] is series["later"]["extension"]  # mapped once
    assert series["kvp"]["extension"] != series["alike"]["extension"]
    assert series["spacing"]["instance"][0]["extension"] != series["alike"]["instance"][0]["extension"]
    assert series["spacing"]["extension"] is series["alike"]["extension"]
    assert series["bad kvp"]["extension"] == series["no kvp"]["extension"]
    notes = {name: build_study(groups[name], ConversionConfig(), terms, parts).notes for name in ("bad kvp", "no kvp")}
    assert notes["bad kvp"]["unparseable:KVP"] == 1 and not notes["no kvp"]["unparseable:KVP"]
    assert series["pet 11h"]["extension"] != series["pet 12h"]["extension"]  # uptake 1 h against 2 h


def test_a_compiled_structure_checks_a_none_where_its_structure_has_one(terms):
    """A structure with a None at a primitive place (pydantic takes it for an absent optional
    element) is compiled like any other: a None there is checked as the walk checks it (its type's
    validator refuses it, so pydantic decides), not passed unseen."""
    built = build_study(_group([record(f"1.2.3.1.{i}", number=i, DeviceSerialNumber="SN1",
                                       Manufacturer="ACME") for i in (1, 2)]), ConversionConfig(), terms)
    device = {**built.resources[1][1], "manufacturer": None}
    validator = fhir_build.Validator()
    validator.verdicts.compile_after = 1
    validator.models["Device"].model_validate(device)  # pydantic's verdict: valid
    for _ in range(4):
        assert validator.problem([("Device", device)]) is None
    (_, check), = validator.verdicts.compiled["Device"]
    assert check(device) is False  # matched, and its None not vouched for: pydantic asked each time


def _old_view(study: dict) -> dict:
    """validation_view as it was: a shape per instance, kept when not seen before in the study."""
    seen, memo, series_view = set(), {}, []
    for series in study.get("series", ()):
        kept = []
        for instance in series.get("instance", ()):
            found = validation.shape(instance, memo)
            if found not in seen:
                seen.add(found)
                kept.append(instance)
        series_view.append({**series, "instance": kept} if "instance" in series else series)
    return {**study, "series": series_view}


def _variant(rng: random.Random, value):
    """``value`` with a few random changes of structure or of values (shared parts kept shared)."""
    if isinstance(value, dict):
        items = list(value.items())
        roll = rng.random()
        if roll < 0.05 and items:
            items.pop(rng.randrange(len(items)))
        elif roll < 0.08 and len(items) > 1:
            items.reverse()
        elif roll < 0.1:
            items.append(("resourceType", rng.choice(["Device", "Patient"])))
        return {k: (v if k == "resourceType" or rng.random() < 0.5 else _variant(rng, v)) for k, v in items}
    if isinstance(value, list):
        if rng.random() < 0.1:
            return value + value[:1]
        return [item if rng.random() < 0.5 else _variant(rng, item) for item in value]
    return rng.choice([value, value, str(value), 7, None, 1.5, [value], {"value": value}])


def test_same_shape_is_shape_equality_and_the_view_keeps_what_it_kept(terms):
    """validation_view compares an instance with the one before it (``same_shape``, which takes
    the same object for the same shape) before it builds shapes: its view, and so every verdict,
    is the one the shape of every instance gives."""
    rng = random.Random(31)
    records = [record(f"1.2.3.1.{i}", number=i, PixelSpacing=(0.5, 0.5), ImageType=("ORIGINAL", "PRIMARY"),
                      SliceThickness=1.0) for i in range(1, 7)]
    records += [record(f"1.2.3.2.{i}", series="1.2.3.2", number=i, PixelSpacing=(0.5, 0.5)) for i in range(1, 5)]
    study = build_study(_group(records), ConversionConfig(), terms).resources[0][1]
    compared = 0
    for _ in range(300):
        one, other = _variant(rng, study), _variant(rng, study)
        for a, b in [(one, other), (one, one), (study, one)]:
            assert validation.same_shape(a, b) == (validation.shape(a, {}) == validation.shape(b, {}))
            compared += 1
        changed = {**study, "series": [{**series, "instance": [
            instance if rng.random() < 0.6 else _variant(rng, instance) for instance in series["instance"]]}
            for series in study["series"]]}
        assert fhir_build.validation_view(changed) == _old_view(changed)
    assert compared == 900
    assert len(fhir_build.validation_view(study)["series"][0]["instance"]) == 1


def test_plain_types_are_asked_without_the_cache_with_pydantics_verdict(terms):
    """The primitive types whose pydantic schema is checked in Rust alone (id, string, code, uri,
    unsignedInt...) are asked with ``isinstance_python``: the verdict ``validate_python`` gives."""
    from pydantic import ValidationError

    records = [record(f"1.2.3.1.{i}", number=i, StudyDescription="Chest", DeviceSerialNumber="SN1",
                      Manufacturer="ACME", StudyDate="20210104", StudyTime="073000") for i in (1, 2)]
    validator = fhir_build.Validator()
    assert validator.problem(build_study(_group(records), ConversionConfig(), terms).resources) is None
    plain = [adapter for adapter in validator.verdicts.adapters.values() if id(adapter) in validator.verdicts.plain]
    assert len(plain) >= 4
    values = BAD_VALUES + ["1.2.840.10008.5.1.4.1.1.2", "urn:oid:1.2.3", "a b", "a\n", "\x1c", "\x0bA", "\x0b",
                           "é", "\ud800", "x" * 300, 0, 2**31 - 1, -2**31, 1.0, b"bytes", ["list"], {"d": 1}]
    for adapter in plain:
        for value in values:
            try:
                adapter.validate_python(value)
                expected = True
            except ValidationError:
                expected = False
            assert validator.verdicts.plain[id(adapter)](value) is expected, (adapter, value)


def test_a_list_that_passed_is_skipped_only_while_it_is_the_same_list(terms):
    """The compiled check skips a list that passed whole at the same place (the extension lists
    that ``MappedParts`` shares between studies); an equal-looking list of another object is
    checked, and one with a bad value gets pydantic's verdict and message."""
    import copy

    from pydantic import ValidationError

    parts = fhir_build.MappedParts()
    validator = fhir_build.Validator()
    validator.verdicts.compile_after = 1

    def study(uid):
        records = [record(f"{uid}.1.{i}", series=f"{uid}.1", number=i, StudyInstanceUID=uid,
                          PixelSpacing=(0.5, 0.5), SliceThickness=1.0) for i in (1, 2)]
        group = StudyGroup(uid)
        for rec in records:
            group.add(rec, KEYS + ("PixelSpacing", "SliceThickness"))
        return build_study(group, ConversionConfig(), terms, parts).resources

    first, second = study("1.2.3"), study("1.2.4")
    extension = first[0][1]["series"][0]["instance"][0]["extension"]
    assert second[0][1]["series"][0]["instance"][0]["extension"] is extension  # shared by MappedParts
    for _ in range(3):
        assert validator.problem(first) is None and validator.problem(second) is None
    assert validator.verdicts.compiled["ImagingStudy"]
    bad = copy.deepcopy(second)
    leaf = bad[0][1]["series"][0]["instance"][0]["extension"][0]
    leaf["extension"][0]["valueQuantity"]["code"] = "two  spaces"  # a FHIR code: one space at most
    for instance in bad[0][1]["series"][0]["instance"]:
        instance["extension"] = [leaf]
    with pytest.raises(ValidationError) as caught:
        validator.models["ImagingStudy"].model_validate(fhir_build.validation_view(bad[0][1]))
    got = validator.problem(bad)
    assert got[0] == "invalid-fhir"
    assert caught.value.errors(include_input=False, include_url=False)[0]["msg"] in got[1]
    assert validator.problem(second) is None  # the shared list still passes


def test_the_fast_datetime_check_vouches_only_for_what_pydantic_accepts():
    """``fhir_datetime_ok`` spares pydantic the dateTime unique to each study: over a grid of
    edge values each value it passes is one fhir_core's DateTime accepts, and it passes the
    forms the builder writes."""
    import itertools

    from fhir_core.types import DateTimeType
    from pydantic import TypeAdapter, ValidationError

    adapter = TypeAdapter(DateTimeType)
    years = ["0000", "0001", "0009", "0010", "0099", "0100", "0999", "1000", "2000", "2023", "2024", "9999"]
    months, days = ["00", "01", "02", "04", "12", "13"], ["00", "01", "28", "29", "30", "31", "32"]
    times = ["", "T00:00:00", "T23:59:59", "T24:00:00", "T12:60:00", "T12:00:60", "T12:00:00.1",
             "T12:00:00.123456", "T12:00:00.1234567", "T12:00", "T1:00:00"]
    offsets = ["", "+00:00", "-00:00", "+14:00", "-14:00", "+14:01", "-13:59", "+13:60", "Z", "+1400"]
    passed = 0
    for year, month, day, time, offset in itertools.product(years, months, days, times, offsets):
        if not time and offset:
            continue
        value = f"{year}-{month}-{day}{time}{offset}"
        if validation.fhir_datetime_ok(value):
            passed += 1
            adapter.validate_python(value)  # raises if the check vouched wrongly
    for value in ["2024-02-29", "2023-02-29", "2024-11-09T11:25:00-04:00", "é024-11-09", " 2024-11-09", "2024-11-09\n",
                  2024, None, "2024", "2024-11", "2024-11-09T11:25:00"]:
        try:
            adapter.validate_python(value)
            valid = True
        except ValidationError:
            valid = False
        assert not validation.fhir_datetime_ok(value) or valid, value
    assert passed > 2000
    assert validation.fhir_datetime_ok("2024-11-09T11:25:00.5-04:00") and validation.fhir_datetime_ok("2024-02-29")
    assert not validation.fhir_datetime_ok("2023-02-29")


def test_compiled_checks_go_with_the_accepted_structures_they_came_from(terms, monkeypatch):
    """A compiled check vouches without asking whether its structure is still accepted: when the
    accepted structures are cleared (a worker met MAX_SHAPES of them), its checks go too, and a
    resource of that structure is validated by pydantic again."""
    from beam_pipeline.fhir import validation

    monkeypatch.setattr(validation, "MAX_SHAPES", 2)
    validator = fhir_build.Validator()
    validator.verdicts.compile_after = 1
    built = build_study(_group([record(f"1.2.3.1.{i}", number=i, DeviceSerialNumber="SN1") for i in (1, 2)]),
                        ConversionConfig(), terms)
    for _ in range(3):
        assert validator.problem(built.resources) is None
    assert validator.verdicts.compiled
    other = build_study(_group([record("1.2.3.1.1", StudyDescription="Chest")]), ConversionConfig(), terms)
    assert validator.problem(other.resources) is None  # a third structure: the accepted ones are cleared
    assert not validator.verdicts.compiled and len(validator.verdicts.accepted) == 1
    bad = [("ImagingStudy", {**built.resources[0][1], "status": "two  words"})]
    assert validator.problem(bad)[0] == "invalid-fhir"
    assert validator.problem(built.resources) is None


def _old_dicom_datetime(date, time, utc_offset, timezone, notes, what):
    """dicom_datetime as it was before its cache and its slicing of the usual forms."""
    import re
    from zoneinfo import ZoneInfo

    from beam_pipeline.dicom.dates import combine, parse_date, parse_time

    if not date:
        return None
    day = parse_date(date)
    if day is None:
        notes[f"unparseable:{what}"] += 1
        return None
    date_text = f"{day.year:04d}-{day.month:02d}-{day.day:02d}"
    if not time:
        return date_text
    clock = parse_time(time)
    if clock is None:
        notes[f"unparseable:{what.replace('Date', 'Time')}"] += 1
        return date_text
    moment = combine(day, clock)
    fraction = f".{clock.fraction}" if clock.fraction else ""
    text = date_text + f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}" + fraction
    if utc_offset:
        match = re.match(r"^([+-])(\d{2})(\d{2})$", utc_offset)
        if match and (int(match[2]), int(match[3])) <= (14, 0) and int(match[3]) < 60:
            return text + f"{match[1]}{match[2]}:{match[3]}"
        notes["unparseable:TimezoneOffsetFromUTC"] += 1
    minutes = int(moment.replace(tzinfo=ZoneInfo(timezone)).utcoffset().total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return text + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def test_dicom_datetime_gives_what_it_gave_before_its_cache_and_its_fast_forms():
    """The cached, sliced dicom_datetime: the same text and notes as the plain parse, on the usual
    forms and around them (days 28-31, months 00-13, year 0000, hours 23-24, fractions of 0-7
    digits, colons, ACR-NEMA dates, non-ASCII digits, offsets within and beyond 14:00), twice."""
    import itertools

    dates = ["20240101", "20240228", "20240229", "20230229", "20240431", "20241231", "20241301", "20240001",
             "00000101", "00010101", "09990615", "2024.03.31", "2024010", "202401011", "２０２４0101",
             "20240101\n", "", None, "2024-01-01", "20240310", "20241103", "20241027", "20240331"]
    times = [None, "", "000000", "235959", "240000", "236000", "235960", "120000.", "120000.1", "120000.123456",
             "120000.1234567", "12:00:00", "1200", "12", "12000", "120000\n", "12000０", "030000", "023000"]
    offsets = [None, "", "+0000", "-0400", "+1400", "+1401", "-1359", "+0560", "0400", "+04:00", "-1400", "+1359",
               "-0000", "+1460", "+٠٤٠٠", "+0400\n", " +0400"]
    checked = 0
    for _ in range(2):  # the second time from the cache
        for date, time, offset, zone in itertools.product(dates, times, offsets, ["Europe/Berlin", "America/New_York"]):
            old, new = Counter(), Counter()
            expected = _old_dicom_datetime(date, time, offset, zone, old, "SeriesDate")
            assert dicom_datetime(date, time, offset, zone, new, "SeriesDate") == expected, (date, time, offset)
            assert new == old, (date, time, offset)
            checked += 1
    assert checked > 10000


def test_probes_tell_compiled_structures_apart_and_never_refuse_their_own(terms):
    """Compiled structures of one resource type get probes where they first differ (keys of an
    object, length of a list): a resource of a structure passes all of its own check's probes, a
    resource of another is refused by a probe before the check runs, and every verdict stays
    pydantic's."""
    from pydantic import ValidationError

    from beam_pipeline.fhir import keywords

    def study(uid, modality, series=1, **values):
        group = StudyGroup(uid)
        for s in range(1, series + 1):
            for i in (1, 2):
                group.add(record(f"{uid}.{s}.{i}", series=f"{uid}.{s}", number=i, StudyInstanceUID=uid,
                                 Modality=modality, SeriesNumber=s, **values), keywords.instance_keys())
        return build_study(group, ConversionConfig(), terms).resources

    kinds = {"ct": dict(modality="CT", KVP=120.0), "mr": dict(modality="MR", EchoTime=20.0, RepetitionTime=400.0),
             "two series": dict(modality="CT", series=2, KVP=120.0), "plain": dict(modality="CR")}
    studies = {name: [study(f"1.2.{n}.{k}", **values) for k in range(3)] for n, (name, values) in enumerate(kinds.items())}
    validator = fhir_build.Validator()
    validator.verdicts.compile_after = 1
    for _ in range(2):
        for built in studies.values():
            for resources in built:
                assert validator.problem(resources) is None
    checks = validator.verdicts.compiled["ImagingStudy"]
    assert len(checks) == 4 and all(check.probes for _, check in checks)
    refused = 0
    for name, built in studies.items():
        for resources in built:
            view = fhir_build.validation_view(resources[0][1])
            mine = [check for _, check in checks if check(view) is not None]
            assert len(mine) == 1, name
            assert not any(probe(view) for probe in mine[0].probes)  # never refuses its own
            refused += sum(any(probe(view) for probe in check.probes) for _, check in checks if check is not mine[0])
    assert refused == 4 * 3 * 3  # each of the 12 told apart from the 3 other structures
    bad = {**studies["mr"][0][0][1], "status": "two  words"}
    with pytest.raises(ValidationError):
        validator.models["ImagingStudy"].model_validate(fhir_build.validation_view(bad))
    assert validator.problem([("ImagingStudy", bad)])[0] == "invalid-fhir"


def test_a_compiled_check_takes_an_objects_keys_in_any_order_and_no_other_keys(terms):
    """A compiled check tests an object's key count and looks each key up: the same keys in another
    order pass (pydantic does not look at the order), and as many keys with one of another name are
    not its structure (None: the walk and pydantic decide)."""
    from pydantic import ValidationError

    built = build_study(_group([record(f"1.2.3.1.{i}", number=i, DeviceSerialNumber="SN1", Manufacturer="ACME")
                                for i in (1, 2)]), ConversionConfig(), terms)
    device = built.resources[1][1]
    validator = fhir_build.Validator()
    validator.verdicts.compile_after = 1
    for _ in range(3):
        assert validator.problem([("Device", device)]) is None
    (_, check), = validator.verdicts.compiled["Device"]
    reordered = dict(reversed(list(device.items())))
    validator.models["Device"].model_validate(reordered)  # pydantic's verdict: valid
    assert check(reordered) is True
    renamed = {("maker" if key == "manufacturer" else key): value for key, value in device.items()}
    with pytest.raises(ValidationError):
        validator.models["Device"].model_validate(renamed)
    assert check(renamed) is None
    assert validator.problem([("Device", renamed)])[0] == "invalid-fhir"


def test_alike_instances_share_their_parts_and_count_their_notes_each(terms):
    """Instances of a series map their extensions and SOP class once while they repeat the values of
    the instance before; each still counts its notes, and the resources are those built without a
    worker's parts. Parts every study repeats (profile, modality list, SOP class) are one object."""
    from beam_pipeline.fhir import keywords

    def group(uid):
        records = [record(f"{uid}.1.{i}", series=f"{uid}.1", number=i, StudyInstanceUID=uid, PixelSpacing=(0.5, 0.5),
                          ImageType=("ORIGINAL", "NOT A TERM")) for i in (1, 2, 3)]
        records.append(record(f"{uid}.1.4", series=f"{uid}.1", number=4, StudyInstanceUID=uid, PixelSpacing=(0.7, 0.7)))
        built = StudyGroup(uid)
        for rec in records:
            built.add(rec, keywords.instance_keys())
        return built

    parts = fhir_build.MappedParts()
    first, alone = (build_study(group("1.2.3"), ConversionConfig(), terms, p) for p in (parts, None))
    assert first.resources == alone.resources and first.notes == alone.notes
    assert first.notes["unmapped:ImageType"] == 3
    instances = first.resources[0][1]["series"][0]["instance"]
    assert instances[0]["extension"] is instances[2]["extension"] != instances[3]["extension"]
    assert instances[0]["sopClass"] is instances[3]["sopClass"]
    second = build_study(group("1.2.4"), ConversionConfig(), terms, parts).resources[0][1]
    study = first.resources[0][1]
    for key in ("meta", "modality"):
        assert second[key] is study[key]
    assert second["series"][0]["instance"][0]["sopClass"] is instances[0]["sopClass"]


def test_resources_that_passed_whole_pass_in_any_order_and_a_changed_copy_is_checked(terms):
    """A compiled check knows the resources that passed it whole by id (a worker's scanners'
    Devices, each built once, alternate from study to study); an equal-looking copy with a bad
    value is another object: checked, and pydantic's verdict given."""
    devices = [fhir_build.build_device({"DeviceSerialNumber": f"SN{i}", "Manufacturer": "ACME"}) for i in (1, 2, 3)]
    validator = fhir_build.Validator()
    validator.verdicts.compile_after = 1
    for _ in range(3):
        for device in devices:
            assert validator.problem([("Device", device)]) is None
    (_, check), = validator.verdicts.compiled["Device"]
    assert all(check(device) is True for device in devices)
    bad = {**devices[0], "status": "two  words"}  # a FHIR code: one space at most
    assert check(bad) is False
    assert validator.problem([("Device", bad)])[0] == "invalid-fhir"


def test_series_heads_are_mapped_once_and_count_their_notes_in_every_study(terms):
    """A series' number, modality, description, coded terms and scanner come from a handful of its
    values (``build.SERIES_HEAD_KEYS``): alike series of many studies share them, each study counts
    their notes (a number beyond unsignedInt, an unknown body part) and gets what it gets alone; a
    series that differs in one of those values gets its own."""
    from beam_pipeline.fhir import keywords

    def group(uid, **values):
        head = {"SeriesNumber": 3_000_000_000, "BodyPartExamined": "NOT A PART", "Laterality": "L",
                "SeriesDescription": "AXIAL", "DeviceSerialNumber": "SN1", "Manufacturer": "ACME", **values}
        built = StudyGroup(uid)
        for i in (1, 2):
            built.add(record(f"{uid}.1.{i}", series=f"{uid}.1", number=i, StudyInstanceUID=uid, **head),
                      keywords.instance_keys())
        return built

    parts = fhir_build.MappedParts()
    groups = [group("1.2.3"), group("1.2.4"), group("1.2.5", SeriesDescription="CORONAL")]
    series = []
    for study in groups:
        shared, alone = (build_study(study, ConversionConfig(), terms, p) for p in (parts, None))
        assert shared.resources == alone.resources and shared.notes == alone.notes
        assert shared.notes["out-of-range:SeriesNumber"] == 1 and shared.notes["unmapped:BodyPartExamined"] == 1
        assert [kind for kind, _ in shared.resources] == ["ImagingStudy", "Device"]
        series.append(shared.resources[0][1]["series"][0])
    first, second, other = series
    assert "number" not in first and first["laterality"]["code"] == "7771000" and "bodySite" not in first
    assert first["modality"] is second["modality"] and first["performer"] is second["performer"]
    assert first["laterality"] is second["laterality"] is other["laterality"]
    assert other["description"] == "CORONAL" and other["modality"] is not first["modality"]
    assert list(first) == ["uid", "modality", "description", "numberOfInstances", "laterality", "performer",
                           "instance"]


def test_a_remembering_check_passes_only_the_same_object_again_and_asks_for_any_other():
    """The dateTime check remembers the value it passed last (a study's start, again as its series'
    start): that object passes at once; an equal or other value is checked, an invalid one refused."""
    asked = []

    def check(value):
        asked.append(value)
        return validation.fhir_datetime_ok(value)

    remembered = validation._remembering(check)
    start = "".join(["2024-01-01T12:00:00", "+01:00"])
    assert remembered(start) and remembered(start) and asked == [start]
    assert not remembered("2024-02-30T12:00:00+01:00") and remembered(start) and len(asked) == 2
    assert remembered("".join(["2024-01-01T12:00:00", "+01:00"])) and len(asked) == 3
