"""The state of a big folder: a unit's files go to lines of at most ``PART_FILES`` files (memory per
line bounded, whatever the folder's size), and a ``--since`` run reuses the lines of an unchanged
unit, reads the changed files of the others, and still writes the full run's snapshot."""
from __future__ import annotations

import json
import os

import pydicom
import pytest
from helpers import run_pipeline
from make_archive import make_archive
from nightly_changes import assert_same_snapshot, touch_later

from beam_pipeline.run import folder_state, state
from beam_pipeline.sources import files


def unit_lines(out) -> list[dict]:
    lines = []
    for path in sorted((out / "_state").glob("sources-*.jsonl")):
        lines += [state.unseal(line, "source") for line in path.read_text().splitlines() if line]
    return lines


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(folder_state, "PART_FILES", 3)


def test_a_unit_of_many_files_is_several_lines_and_a_night_reuses_the_unchanged(small_parts, tmp_path):
    root = tmp_path / "archive"
    make_archive(root / "big", studies=1, series=1, instances=48)  # one folder, ~12 files per unit
    make_archive(root / "other", studies=2, series=1, instances=4, seed=3)
    first = run_pipeline(root, tmp_path / "a", "--quiet")
    lines = unit_lines(tmp_path / "a")
    assert all(len(line["body"]["files"]) <= 3 and line["count"] == len(line["body"]["files"]) for line in lines)
    by_unit: dict[str, list] = {}
    for line in lines:
        by_unit.setdefault(line["unit"], []).append(line)
    big = [parts for unit, parts in by_unit.items() if len(parts) > 1]
    assert big, "no unit was split"
    for parts in by_unit.values():  # every part says which of how many it is, of one listing
        assert sorted(part["part"][0] for part in parts) == list(range(len(parts)))
        assert {part["part"][1] for part in parts} == {len(parts)}
        assert len({part["digest"] for part in parts}) == 1
    assert sum(line["count"] for line in lines) == first["files_matched"]

    files = sorted((root / "big").rglob("*.dcm"))
    ds = pydicom.dcmread(files[5])
    ds.SeriesDescription = "corrected"
    ds.save_as(files[5], enforce_file_format=False)
    touch_later(files[5])
    files[11].unlink()
    night = run_pipeline(root, tmp_path / "b", "--since", str(tmp_path / "a"), "--quiet")
    run_pipeline(root, tmp_path / "c", "--quiet")
    assert_same_snapshot(tmp_path / "b", tmp_path / "c")
    done = night["incremental"]
    assert done["files_read"] == 1 and done["files_gone"] == 1
    assert done["files_reused"] == first["files_matched"] - 2
    assert done["studies_rebuilt"] == 1 and done["studies_reused"] == 2
    summary = json.loads((tmp_path / "b" / "_report" / "summary.json").read_text())
    assert summary["files_matched"] == first["files_matched"] - 1


def test_parts_of_a_unit_are_consecutive_runs_of_its_sorted_files(small_parts):
    entries = [folder_state.FileEntry(f"/a/{n:02d}.dcm", "1:2", None, (), {}) for n in range(7)]
    parts = folder_state.unit_parts(entries)
    assert [[entry.key for entry in part] for part, _ in parts] == [
        [e.key for e in entries[0:3]], [e.key for e in entries[3:6]], [e.key for e in entries[6:7]]]
    assert [whole["part"] for _, whole in parts] == [[0, 3], [1, 3], [2, 3]]
    assert len({whole["digest"] for _, whole in parts}) == 1 and parts[0][1]["digest"] is not None


def test_a_kept_shard_is_merged_without_its_skipped_lines_also_in_rounds(tmp_path, monkeypatch):
    from beam_pipeline.run import external_sort

    monkeypatch.setattr(external_sort, "FAN_IN", 2)
    (tmp_path / "runs").mkdir()
    shard = tmp_path / "previous.ndjson"
    shard.write_bytes(b"a\nc\ne\ng\n")
    kept = external_sort.Run("X", str(shard), 2, 4, skip=(1, 3))  # without "c" and "g"
    new = [external_sort.write_run(str(tmp_path), "X", [line], 2) for line in (b"d", b"b", b"f")]
    assert list(external_sort.merged(str(tmp_path), [kept, *new])) == [b"a", b"b", b"d", b"e", b"f"]
    assert shard.read_bytes() == b"a\nc\ne\ng\n"  # the previous output is read, never changed


def test_a_unit_listed_in_pieces_is_joined_and_reused_by_its_whole_digest(tmp_path):
    """A gs:// listing can interleave a folder's files with a subfolder's: the unit then comes in
    several pieces, joined by folder, and its digest is computed over all of them."""
    from beam_pipeline.run.listing import UnitListingsDoFn
    from beam_pipeline.run.nightly import ChooseUnitsDoFn
    from beam_pipeline.run.steps import COUNTS, REUSED

    names = [f"f{n}.dcm" for n in range(12)]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.dcm").write_bytes(b"y")
    paths = [str(tmp_path / name) for name in names]
    unit = folder_state.unit_of(paths[0])
    mine = [path for path in paths if folder_state.unit_of(path) == unit]
    assert len(mine) >= 2
    listing = UnitListingsDoFn()
    listing.start_bundle()
    interleaved = [(mine[0], None, None), (str(tmp_path / "sub" / "g.dcm"), None, None)] + [
        (path, None, None) for path in mine[1:]]
    pieces = list(listing.process(interleaved))
    pieces += [value.value for value in listing.finish_bundle()]
    ours = [listed for folder, units in pieces if folder == str(tmp_path) for listed in units if listed[0] == unit]
    assert len(ours) == 2  # the unit in two pieces, each with its own digest
    entries = [folder_state.FileEntry(path, state_stamp, None, (), {"files_matched": 1})
               for path, state_stamp in sorted((path, files.stamp(path)) for path in mine)]
    [(part, whole)] = folder_state.unit_parts(entries)
    line = folder_state.unit_line(unit, part, {}, whole).encode()
    before = folder_state.read_unit_line(line, ("shard", 0))
    assert before.digest == whole["digest"] and before.files == len(mine)
    choose = ChooseUnitsDoFn()
    choose.setup()
    out = list(choose.process((str(tmp_path), {"now": [[listed] for listed in ours], "before": [[before.plain()]]})))
    reused = [o.value for o in out if getattr(o, "tag", None) == REUSED]
    counts = [o.value for o in out if getattr(o, "tag", None) == COUNTS]
    assert reused == [before] and counts[0]["incremental:files_reused"] == len(mine)


def test_a_files_difference_from_its_series_representative_rebuilds_it_in_order():
    base = {"SOPInstanceUID": "1.1", "InstanceNumber": 1, "ImageType": ("ORIGINAL",), "KVP": 120.0, "Rows": 2}
    record = {"SOPInstanceUID": "1.2", "InstanceNumber": 2, "ImageType": ("ORIGINAL",), "KVP": float("nan"),
              "SliceThickness": 5.0}
    diff, dropped = folder_state.record_difference(record, base)
    assert list(diff) == ["SOPInstanceUID", "InstanceNumber", "KVP", "SliceThickness"]  # the record's order
    assert dropped == ["Rows"]
    rebuilt = {k: v for k, v in base.items() if k not in dropped}
    rebuilt.update(diff)
    assert list(rebuilt.items())[:2] == list(record.items())[:2] and set(rebuilt) == set(record)
    assert rebuilt["ImageType"] == record["ImageType"] and rebuilt["SliceThickness"] == 5.0
    assert folder_state.record_difference(base, base) == ({}, [])
    assert folder_state.record_difference(dict(base), base) == ({}, [])
    # the same keys in the same order (most files of a series) and in another order: the same difference
    same_keys = {**base, "SOPInstanceUID": "1.3", "KVP": 121.0}
    assert folder_state.record_difference(same_keys, base) == ({"SOPInstanceUID": "1.3", "KVP": 121.0}, [])
    reordered = dict(reversed(same_keys.items()))
    assert folder_state.record_difference(reordered, base) == ({"KVP": 121.0, "SOPInstanceUID": "1.3"}, [])
    assert list(folder_state.record_difference(reordered, base)[0]) == ["KVP", "SOPInstanceUID"]


def test_a_unit_line_gives_back_its_groups_and_records_whole(tmp_path):
    """A unit line keeps each file's record once (as a difference from its series' representative),
    not its instance-level values again in the groups: loading its part of a study adds them back,
    duplicates and conflicting SOPs included, and gives the group that reading made."""
    from beam_pipeline.fhir import keywords, study

    def record(sop, series, number, **more):
        return {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "SOPInstanceUID": sop, "PatientID": "P1",
                "StudyInstanceUID": "1.9", "SeriesInstanceUID": series, "InstanceNumber": number,
                "ImageType": ("ORIGINAL", "PRIMARY"), **more}

    records = [record("1.9.1.1", "1.9.1", 2, SliceThickness=5.0), record("1.9.1.2", "1.9.1", 1),
               record("1.9.1.1", "1.9.1", 2, SliceThickness=1.0),  # a duplicate, with other values
               record("1.9.1.2", "1.9.2", 1, PatientWeight=70.0),   # the same SOP in another series
               record("1.9.2.3", "1.9.2", 3)]
    entries = [folder_state.FileEntry(f"/a/{n}.dcm", "1:2", rec, (), {"instances_read": 1})
               for n, rec in enumerate(records)] + [folder_state.FileEntry("/a/x.txt", "3:4", None, (), {})]
    keys = keywords.instance_keys()
    made = study.StudyGroup("1.9")
    for rec in records:
        made.add(rec, keys)
    assert made.duplicates == 2 and made.conflicting_sops == {"1.9.1.2"}
    [(part, whole)] = folder_state.unit_parts(entries)
    line = folder_state.unit_line("/a|0", part, {"1.9": {"1.9": made}}, whole)
    assert "instances" not in state.unseal(line, "source")["body"]["groups"][0][2]
    shard = tmp_path / "sources.jsonl"
    shard.write_text("\n" + line + "\n")
    unit = folder_state.read_unit_line(line.encode(), (str(shard), 1))
    assert [entry.record for entry in unit.entries()] == records + [None]
    [[light]] = [groups.values() for groups in unit.light().values()]
    loaded = folder_state.load_pending(light)
    assert loaded == made
    assert loaded.instances["1.9.1.1"][1]["SliceThickness"] == 1.0  # the smaller copy, as reading kept


def test_a_unit_line_keeps_two_folders_groups_of_one_study_and_series_apart(tmp_path):
    """Directory mode: a unit of names that are not valid UTF-8 spans folders, so one line can hold
    the groups of two folders with the same study and series; each comes back as reading made it."""
    from beam_pipeline.fhir import keywords
    from beam_pipeline.run import reading

    def record(sop, number):
        return {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "SOPInstanceUID": sop, "PatientID": "P1",
                "StudyInstanceUID": "1.9", "SeriesInstanceUID": "1.9.1", "InstanceNumber": number}

    keys = keywords.instance_keys()
    files = [(state.source_key(os.fsencode("/r/A/x\udce9.dcm")), record("1.9.1.1", 1)),
             (state.source_key(os.fsencode("/r/B/y\udce9.dcm")), record("1.9.1.2", 2))]
    entries = sorted((folder_state.FileEntry(key, "1:2", rec, (), {"instances_read": 1}) for key, rec in files),
                     key=lambda entry: entry.key)
    partials, group_keys = {}, []
    for entry in entries:
        group_keys.append(reading.add_partial(partials, entry.record, entry.key, "directory", "/r", keys))
    assert sorted(partials) == ["/r/A", "/r/B"]
    [(part, whole)] = folder_state.unit_parts(entries)
    line = folder_state.unit_line("|0", part, partials, whole, group_keys)
    shard = tmp_path / "sources.jsonl"
    shard.write_text("\n" + line + "\n")
    unit = folder_state.read_unit_line(line.encode(), (str(shard), 1))
    for key, groups in unit.light().items():
        made = partials[key]["1.9"]
        assert folder_state.load_pending(groups["1.9"]) == made
        assert list(made.instances) == (["1.9.1.1"] if key == "/r/A" else ["1.9.1.2"])
