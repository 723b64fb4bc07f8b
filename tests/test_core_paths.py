"""The Beam path and the in-process path share one core: same lines, notes and Devices."""
from __future__ import annotations

import copy
import os
import pickle

import pytest
from helpers import copy_dicom, pydicom_file, raw_lines, run_pipeline

from beam_pipeline.fhir import study
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.run.convert import convert_files
from beam_pipeline.run.transforms import MergeGroupsFn, ReadHeaderDoFn, SumCounts

CT = pydicom_file("CT_small.dcm")


@pytest.fixture(scope="module")
def tricky(tmp_path_factory):
    root = tmp_path_factory.mktemp("tricky")
    for i in range(3):  # one series, three files with an unparseable KVP
        path = root / f"kvp{i}.dcm"
        copy_dicom(CT, path, KVP="1234", SOPInstanceUID=f"1.2.826.0.1.3680043.9.7.5.{i}", InstanceNumber=i + 1)
        kvp = b"\x18\x00\x60\x00DS\x04\x00"  # (0018,0060) DS, 4 bytes
        path.write_bytes(path.read_bytes().replace(kvp + b"1234", kvp + b"12kV"))
    for name, model in (("a", "Model Zeta"), ("b", "Model Alpha")):  # one scanner, two model names
        copy_dicom(CT, root / f"dev-{name}.dcm", StudyInstanceUID=f"1.2.826.0.1.3680043.9.7.6.{ord(name)}",
                   SeriesInstanceUID=f"1.2.826.0.1.3680043.9.7.7.{ord(name)}", DeviceSerialNumber="SN-42",
                   Manufacturer="ACME", ManufacturerModelName=model)
    (root / "empty.dcm").write_bytes(b"")
    return root


def test_convert_files_and_the_pipeline_agree(tricky, tmp_path):
    summary = run_pipeline(tricky, tmp_path / "out")
    paths = sorted(os.path.join(tricky, name) for name in os.listdir(tricky))
    result = convert_files(paths, ConversionConfig(source=tricky.as_uri()))  # the pipeline's meta.source
    assert summary["notes"] == dict(result.notes)
    assert summary["notes"]["unparseable:KVP"] == 1  # once, by the mapping (one series), not per file too
    assert raw_lines(tmp_path / "out", "Device") == sorted(result.lines["Device"])
    assert raw_lines(tmp_path / "out", "ImagingStudy") == sorted(result.lines["ImagingStudy"])
    assert summary["outcomes"] == {k: result.outcomes.get(k, 0) for k in summary["outcomes"]}
    [device] = result.resources["Device"]
    assert device["deviceName"][0]["name"] == "Model Alpha"  # the smallest line, on both paths


def _group(uid: str, sop: str, patient: str) -> study.StudyGroup:
    record = {"StudyInstanceUID": uid, "SeriesInstanceUID": uid + ".1", "SOPInstanceUID": sop,
              "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "PatientID": patient, "Modality": "CT"}
    return study.StudyGroup(uid).add(record, ("SOPInstanceUID", "SOPClassUID"))


def test_combine_fns_never_change_their_inputs():
    """Runners may hand the same input object to several calls: inputs must stay as they were."""
    inputs = [_group("1.2.3", f"1.2.3.1.{i}", "P") for i in range(3)] + [_group("1.2.3", "1.2.3.1.9", "Q")]
    before = [pickle.dumps(g) for g in inputs]
    fn = MergeGroupsFn()
    accumulators = [fn.add_input(fn.create_accumulator(), g) for g in inputs[:2]]
    accumulators.append(fn.add_input(fn.add_input(fn.create_accumulator(), inputs[2]), inputs[3]))
    merged = fn.extract_output(fn.merge_accumulators(accumulators))
    assert merged.files == 4 and merged.patient_ids == {"P", "Q"}
    assert [pickle.dumps(g) for g in inputs] == before

    from collections import Counter

    counts = [Counter({"a": 1}), Counter({"a": 2, "b": 1})]
    frozen = copy.deepcopy(counts)
    sums = SumCounts()
    total = sums.extract_output(sums.merge_accumulators(
        [sums.add_input(sums.create_accumulator(), c) for c in counts]))
    assert total == Counter({"a": 3, "b": 1}) and counts == frozen


def test_a_study_group_travels_whole_through_the_shuffle():
    """StudyGroup pickles as its values in field order: every field must come back, and the
    representative stay the record of its series (one object, not a copy)."""
    import dataclasses

    group = _group("1.2.3", "1.2.3.1.1", "P").merge(_group("1.2.3", "1.2.3.1.1", "P"))
    group.conflicting_sops.add("1.2.3.1.7")
    group.rejected_folders.add("/a")
    group.accession_numbers.add("A1")
    group.pending = (("shard", 10, "1.2.3", 2, 5),)
    defaults = study.StudyGroup("1.2.3")
    assert all(getattr(group, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(group)
               if f.name != "study_uid")
    [loaded] = study.load_groups(study.dump_groups({"1.2.3": group})).values()
    assert loaded == group
    assert loaded.representative is loaded.series["1.2.3.1"]


def test_the_read_pool_is_one_per_worker_process():
    """Beam unpickles one DoFn per bundle thread: they share one pool, so --read-concurrency bounds
    a worker process's reads in flight however many threads it runs."""
    first = ReadHeaderDoFn(read_concurrency=8)
    copies = [pickle.loads(pickle.dumps(first)) for _ in range(3)]
    for dofn in copies:
        dofn.setup()
    assert copies[0].pool is copies[1].pool is copies[2].pool
    assert copies[0].pool._max_workers == 8
    assert list(copies[0].pool.map(abs, [-1, -2])) == [1, 2]
    for dofn in copies:
        dofn.teardown()
    serial = ReadHeaderDoFn(read_concurrency=1)
    serial.setup()
    assert serial.pool is None


def test_a_records_digest_keeps_its_value():
    """Study digests compare with the last run's (``--since``): a record's digest is the SHA-256 of
    its orjson text with sorted keys, whichever path of orjson writes it."""
    import hashlib

    import orjson

    from beam_pipeline.dicom.records import DoseItem, DoseReport

    report = DoseReport(("DCM", "113704", "x"), (DoseItem("113813", "1.5", "mGy", "UCUM", "", "", ""),), ())
    for record in ({"SOPInstanceUID": "1.2", "ImageType": ("A", "B"), "_dose_report": report,
                    "Seq": ({"CodeValue": "1"},), "KVP": 120.0},
                   {"SOPInstanceUID": "1.2", "Odd": {3: "a non-str key"}}):
        text = orjson.dumps(record, default=study._tagged, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        assert study.record_digest(record) == int.from_bytes(hashlib.sha256(text).digest(), "big")
