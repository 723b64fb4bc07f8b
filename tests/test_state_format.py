"""The state's format (docs/state.md): instance records as plain JSON values, given back equal to the
reader's (tuples as tuples, dose reports as their named tuples); every line sealed by a checksum of
its bytes; a state of the pickled format 1 is refused in one line."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from helpers import TEST_FILES, run_pipeline
from make_archive import make_archive

from beam_pipeline.dicom.records import DoseItem, DoseReport
from beam_pipeline.run import core, state


def records_of_the_sample() -> list[dict]:
    reader = core.FileReader()
    paths = sorted(glob.glob(os.path.join(TEST_FILES, "**", "*"), recursive=True))
    outcomes = core.process_files([(path, os.path.getsize(path)) for path in paths if os.path.isfile(path)], reader)
    return [outcome.result.record for outcome in outcomes if outcome.error is None and outcome.result.record]


def assert_same_types(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_types(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        for x, y in zip(a, b, strict=True):
            assert_same_types(x, y)


def test_records_come_back_equal_with_their_types():
    dose = DoseReport(("DCM", "113704", "Projection X-Ray"),
                      (DoseItem("113813", "1.5", "Gy.m2", "UCUM", "113811", "", ""),), ("a problem",))
    records = records_of_the_sample() + [{"SOPInstanceUID": "1.2", "DoseReport": dose, "Seen": {"b", "a"},
                                          "Raw": b"\x00\xff", "Seq": ({"CodeValue": "1"},)}]
    assert len(records) > 50
    line = state.source_line("some/file.dcm", "12:34", records, [], {"instances_read": len(records)})
    entry = state.read_source_line(line)
    back, errors, counts = entry.outcome()
    assert back == records and errors == [] and counts["instances_read"] == len(records)
    for got, want in zip(back, records):
        assert_same_types(got, want)
    assert '{"\\u0000DoseReport":[["DCM","113704"' in line  # a documented tag, not a pickle


def test_a_line_is_sealed_by_a_checksum_of_its_bytes():
    line = state.source_line("a.dcm", "1:2", [{"SOPInstanceUID": "1"}], [], {})
    assert state.read_source_line(line).key == "a.dcm"
    for damaged in (line.replace('"1:2"', '"1:3"'), line[:-3], "{}", "not json at all, not json at all"):
        with pytest.raises(state.StateError, match="damaged"):
            state.read_source_line(damaged)


@pytest.mark.parametrize("older", [1, 2, 3])
def test_a_state_of_an_older_format_is_refused_in_one_line(tmp_path, older):
    """Format 1 pickled the records, format 2 held every study's resources, format 3 had unit lines
    without a head: refused, never misread."""
    make_archive(tmp_path / "archive", studies=1, series=1, instances=2)
    run_pipeline(tmp_path / "archive", tmp_path / "a", "--quiet")
    header = tmp_path / "a" / "_state" / "state.json"
    document = json.loads(header.read_text())
    assert document["format"] == state.FORMAT == 4
    document["format"] = older
    header.write_text(json.dumps(document))
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", "--quiet", "--input", str(tmp_path / "archive"),
                           "--output", str(tmp_path / "b"), "--since", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"its state has format {older}, this converter reads format 4" in lines[0], lines


def test_the_streaming_follow_state_is_a_sealed_json_line_with_the_records_types(tmp_path):
    """``--follow-mode stream`` keeps each study's records in the same encoding (no pickle): read
    back equal with their types, an undecodable path as bytes; a damaged entry reads as none."""
    from beam_pipeline.run import stream

    dose = DoseReport(("DCM", "113704", "Projection X-Ray"), (), ("a problem",))
    records = records_of_the_sample()[:5] + [{"SOPInstanceUID": "1.2", "DoseReport": dose, "Seq": ({"a": "1"},)}]
    entry = {"uid": "1.2.3", "files": {"a/b.dcm": ((12, 1.5), tuple(records)), b"\xff.dcm": ((3, 2.0), None)},
             "sent": None, "version": 2, "counts": {"studies_written": 1}, "pending": False}
    where = stream.state_path(str(tmp_path), "study", "1.2.3")
    stream.write_whole(where, stream.dump(entry))
    assert where.endswith(".json") and b"pickle" not in open(where, "rb").read()
    back = stream.load(where)
    assert back == entry
    for got, want in zip(back["files"]["a/b.dcm"][1], records, strict=True):
        assert_same_types(got, want)
    with open(where, "r+b") as handle:
        handle.seek(20)
        handle.write(b"#")
    assert stream.load(where) is None
