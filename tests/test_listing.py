"""Listing at archive scale: the pattern's root first, then each of its parts (subfolders, gs://
sub-prefixes) as its own work item behind a Reshuffle, with the same files and the same accounting
as the serial listing; the symlink rule that keeps the two equal; a part that cannot be listed is
one error line. gs:// listings are paged by the proxy as GCS pages them (the emulator does not)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from faults import Faults
from gcs_emulator import patched_environ, upload_tree
from helpers import copy_dicom, pydicom_file, run_pipeline

from benchmarks.latency_proxy import LatencyProxy
from beam_pipeline.run import convert, folder_state, listing, reading, state, transforms
from beam_pipeline.sources import files as inputs

BUCKET = "test-bucket"
REPO = Path(__file__).resolve().parent.parent
TOP_FOLDERS, SUBFOLDERS, FILES = 50, 20, 20  # 20,000 files in 1,000 leaf folders under 50 parts


@pytest.fixture(scope="module")
def deep_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deep") / "archive"
    for top in range(TOP_FOLDERS):
        for sub in range(SUBFOLDERS):
            folder = root / f"t{top:02d}" / f"s{sub:02d}"
            folder.mkdir(parents=True)
            for index in range(FILES):
                (folder / f"f{index:02d}.txt").write_bytes(b"x")
    (root / "top-level-file.txt").write_bytes(b"x")
    return root


def _fanned_out(pattern: str, expected_items, expected_counts: Counter, formed=None) -> int:
    """Runs the pipeline's listing step alone, and the unit jobs made of it; asserts its items and
    summed counts, that each unit is one job, whole (``_each_unit_once_and_whole``), and
    ``formed(units)`` of the units formed where listed; returns how many parts were listed (the
    root's own step counted as one)."""
    pipeline = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([]))
    listed, counts, _ = pipeline | transforms.ListInputFiles(pattern)
    assert_that(_items(listed), equal_to(list(expected_items)), label="items")
    assert_that(counts | "Sum" >> beam.CombineGlobally(transforms.SumCounts()), equal_to([expected_counts]),
                label="counts")
    jobs = listed | reading.ListedUnits() | beam.ParDo(reading.BatchJobsDoFn()) | "Jobs" >> beam.FlatMap(list)
    assert_that(jobs, _each_unit_once_and_whole(list(expected_items)), label="units")
    if formed is not None:
        assert_that(listed[0] | "AllFormed" >> beam.Flatten()
                    | "Formed" >> beam.FlatMap(lambda batch: [unit for unit, *_ in batch]), formed, label="formed")
    result = pipeline.run()
    result.wait_until_finish()
    parts = result.metrics().query(MetricsFilter().with_name("listing_parts_done"))["counters"]
    return sum(c.committed for c in parts)


def _each_unit_once_and_whole(expected_items):
    """A check of the unit jobs of a full run: each file in one job, each unit in one job, whole."""
    def check(jobs):
        units = Counter(unit for unit, _, _ in jobs)
        assert max(units.values(), default=1) == 1, units
        assert Counter(item for _, items, _ in jobs for item in items) == Counter(expected_items)
        for unit, items, reused in jobs:
            assert reused == ()
            assert {folder_state.unit_of(state.source_key(path)) for path, *_ in items} == {unit}
        assert set(units) == {folder_state.unit_of(state.source_key(path)) for path, *_ in expected_items}
    return check


def _items(listed):
    """The listed items of a full run's listing: those of its units' jobs and the loose ones."""
    jobs, loose = listed  # jobs: one collection of lists of jobs per listing step
    return ((*[step | f"JobItems{index}" >> beam.FlatMap(lambda jobs: [item for _, items, _ in jobs for item in items])
               for index, step in enumerate(jobs)],
             loose | "LooseItems" >> beam.FlatMap(lambda batch: batch))
            | "AllItems" >> beam.Flatten())


def test_a_deep_tree_is_listed_in_parts_with_the_serial_listings_files_and_counts(deep_tree):
    pattern = inputs.resolve_pattern(str(deep_tree))
    serial = list(inputs.list_files(pattern))
    assert len(serial) == TOP_FOLDERS * SUBFOLDERS * FILES + 1
    parts = _fanned_out(pattern, serial, Counter({"files_matched": len(serial)}))
    assert parts == TOP_FOLDERS + 1  # the root's own step, then one work item per top-level folder


def test_many_small_parts_are_listed_in_groups_with_the_serial_listings_files(tmp_path):
    """A root of many small folders (patients of a few studies): its parts go to the workers in
    groups (``part_groups``), each part listed once, in order."""
    root = tmp_path / "archive"
    for top in range(700):
        for index in range(2):
            path = root / f"p{top:03d}" / f"s{index}" / "f.txt"
            path.parent.mkdir(parents=True)
            path.write_bytes(b"x")
    pattern = inputs.resolve_pattern(str(root))
    serial = list(inputs.list_files(pattern))
    assert len(serial) == 1400
    assert _fanned_out(pattern, serial, Counter({"files_matched": 1400})) == 700 + 1  # parts, in 350 groups
    for count in (1, 700, 100_000):
        groups = listing.part_groups(list(range(count)))
        assert [part for group in groups for part in group] == list(range(count))
        assert len(groups) >= min(count, listing.PART_SPREAD)
        assert max(map(len, groups)) <= listing.MAX_GROUP_PARTS
    assert len(listing.part_groups(list(range(700)))) == 350


def test_a_full_runs_listing_forms_each_unit_once_and_whole(tmp_path, monkeypatch):
    """Unit jobs formed where a folder is listed, and by a join for the rest (the root's own files,
    names that are not valid UTF-8, a folder's units that a subfolder which cannot be listed
    joins): each file in one job, each unit in one job, whole."""
    root = tmp_path / "archive"
    for top in range(3):
        for sub in range(2):
            folder = root / f"p{top}" / f"s{sub}"
            folder.mkdir(parents=True)
            for letter in "abcdefghijklmnop":  # names in 3 of a folder's 4 units
                (folder / f"{letter}.dcm").write_bytes(b"x")
    (root / "p1" / "s0" / "locked").mkdir()  # files beside a subfolder that cannot be listed (joins unit 1)
    (root / "p1" / "s0" / "locked" / "hidden.dcm").write_bytes(b"x")
    (root / "p2" / "s1" / "deeper").mkdir()  # ... beside one that can
    (root / "p2" / "s1" / "deeper" / "d.dcm").write_bytes(b"x")
    (root / "at-the-top.dcm").write_bytes(b"x")  # the root's own files: one unit a part could join, one not
    (root / "a.dcm").write_bytes(b"x")
    with open(os.path.join(os.fsencode(root / "p0" / "s1"), b"\xff.dcm"), "wb") as handle:
        handle.write(b"x")  # a name that is not valid UTF-8: a unit of its own, across folders
    scandir, locked = os.scandir, str(root / "p1" / "s0" / "locked")

    def refusing(path="."):
        if isinstance(path, (str, bytes)) and os.fsdecode(path) == locked:
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(inputs.os, "scandir", refusing)
    pattern = inputs.resolve_pattern(str(root))
    serial = list(inputs.list_files(pattern))
    assert (locked, None, None) in serial and len(serial) == 6 * 16 + 1 + 1 + 2 + 1
    top_units = {folder_state.unit_of(str(root / name)) for name in ("at-the-top.dcm", "a.dcm")}
    joinable = {folder_state.unit_of(str(root / f"p{top}")) for top in range(3)}  # a part that cannot be listed
    assert top_units & joinable and top_units - joinable

    def formed_where_listed(units):  # not joined: the units of folders listed whole
        assert {unit[len(str(root)):] for unit in units} >= {"/p0/s0|0", "/p0/s0|1", "/p0/s0|2", "/p1/s0|0"}
        assert not any(unit.startswith(str(root / "p1" / "s0") + "|1") for unit in units)  # "locked" joins it
        assert {unit for unit in units if unit in top_units} == top_units - joinable  # the root's own files

    _fanned_out(pattern, serial, Counter({"files_matched": len(serial)}), formed=formed_where_listed)


@pytest.mark.parametrize("glob, listed", [
    ("**/*.dcm", True),     # files under it could match: one error line
    ("*/*/*.dcm", True),    # its depth is the pattern's
    ("p*/s*/*.dcm", True),
    ("p*/**.dcm", True),    # a ** in the files' part crosses folders too
    ("p1?s0/*.dcm", True),  # so does a ? (it matches the / of p1/s0, as Beam reads globs)
    ("*/*.dcm", False),     # the pattern cannot reach into it: nothing to tell
    ("q*/s*/*.dcm", False),
], ids=["any-depth", "its-depth", "its-names", "files-part", "question-mark", "too-deep", "other-names"])
def test_a_folder_that_cannot_be_listed_under_a_glob_is_listed_when_it_could_hide_matches(
        tmp_path, monkeypatch, glob, listed):
    """A folder whose own name does not match the files' pattern is still an error line (a
    "file" of its parent) when the pattern could match files under it, in the serial listing and
    the fanned-out one; not when the pattern cannot reach into it."""
    root = tmp_path / "archive"
    for top in range(2):
        (root / f"p{top}").mkdir(parents=True)
        (root / f"p{top}" / "a.dcm").write_bytes(b"x")
    locked = root / "p1" / "s0"
    locked.mkdir()
    (locked / "hidden.dcm").write_bytes(b"x")
    scandir = os.scandir

    def refusing(path="."):
        if isinstance(path, (str, bytes)) and os.fsdecode(path) == str(locked):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(inputs.os, "scandir", refusing)
    pattern = inputs.resolve_pattern(str(root / glob))
    serial = list(inputs.list_files(pattern))
    assert ((str(locked), None, None) in serial) is listed
    _fanned_out(pattern, serial, Counter({"files_matched": len(serial)}))


def test_the_rule_for_symlinks_keeps_parts_and_serial_listing_equal(tmp_path):
    """Links to folders inside the input are not followed (their files are listed once, under
    their real path); links to folders outside it are followed, in each part that has one."""
    outside = tmp_path / "outside"
    (outside / "deeper").mkdir(parents=True)
    (outside / "deeper" / "o.txt").write_bytes(b"o")
    (outside / "back-in").symlink_to(tmp_path / "in")      # a loop back into the input: not followed
    (outside / "self").symlink_to(outside)                 # loops outside it: each folder once a part
    (outside / "deeper" / "again").symlink_to(outside / "deeper")
    root = tmp_path / "in"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / f"{name}.txt").write_bytes(b"x")
    (root / "a" / "to-b").symlink_to(root / "b")           # inside: not followed
    (root / "a" / "to-outside").symlink_to(outside)        # outside: followed
    (root / "b" / "to-outside").symlink_to(outside)        # ... from this part too
    (root / "to-a").symlink_to(root / "a")                 # a top-level link inside: not a part
    (root / "ext").symlink_to(outside)                     # a top-level link outside: a part
    (root / "dangling.txt").symlink_to(tmp_path / "gone")  # listed: the reader reports it
    pattern = inputs.resolve_pattern(str(root))
    serial = list(inputs.list_files(pattern))
    assert sorted(path for path, *_ in serial) == sorted(str(root / p) for p in (
        "a/a.txt", "a/to-outside/deeper/o.txt", "b/b.txt", "b/to-outside/deeper/o.txt",
        "ext/deeper/o.txt", "dangling.txt"))
    files, parts = inputs.list_top(pattern)
    assert parts == [str(root / "a"), str(root / "b"), str(root / "ext")]
    _fanned_out(pattern, serial, Counter({"files_matched": len(serial)}))


def test_a_folder_walked_again_through_a_link_to_an_ancestor_is_walked_once_a_part(tmp_path):
    """A link in a folder of the input to a folder that holds the input (outside it: followed)
    leads back to the folder itself: each folder, reached under any path, is walked once in a part,
    as every folder's identity (``stat``) is checked, not only those reached through a link."""
    root = tmp_path / "in"
    for name in ("p", "q"):
        (root / name).mkdir(parents=True)
        (root / name / f"{name}.dcm").write_bytes(b"x")
    (root / "p" / "up").symlink_to(tmp_path)  # holds the input: p again, under p/up/in/p
    pattern = inputs.resolve_pattern(str(root))
    serial = list(inputs.list_files(pattern))
    assert sorted(path for path, *_ in serial) == sorted(str(root / p) for p in (
        "p/p.dcm", "q/q.dcm", "p/up/in/q/q.dcm"))  # q is another part's: its files again, under the link
    _fanned_out(pattern, serial, Counter({"files_matched": len(serial)}))


def test_a_bind_mount_of_the_input_inside_it_is_walked_once_a_part(tmp_path):
    """A folder mounted again inside itself (a bind mount: no link to tell) is entered once a part."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here (util-linux) for a bind mount of its own")
    root = tmp_path / "in"
    (root / "p" / "again").mkdir(parents=True)
    (root / "p" / "p.dcm").write_bytes(b"x")
    listing_code = ("import sys; from beam_pipeline.sources import files as f; "
                    "print(sorted(p for p, *_ in f.list_files(f.resolve_pattern(sys.argv[1]))))")
    done = subprocess.run(  # in a mount namespace of its own: the mount goes with the process
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount --bind "$1/p" "$1/p/again" && exec "{sys.executable}" -c "{listing_code}" "$1"', "sh", str(root)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode and "beam_pipeline" not in done.stderr:
        pytest.skip(f"no bind mount here (unshare/mount): {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == repr([str(root / "p" / "p.dcm")])


def test_a_whole_run_accounts_as_the_serial_path_does(tmp_path):
    """Same summary counts as the in-process conversion over the serial listing."""
    root = tmp_path / "in"
    for top in range(6):
        copy_dicom(pydicom_file("CT_small.dcm"), root / f"p{top}" / "ct.dcm", SOPInstanceUID=f"1.2.3.{top}")
        copy_dicom(pydicom_file("MR_small.dcm"), root / f"p{top}" / "sub" / "mr.dcm", SOPInstanceUID=f"1.2.4.{top}")
        (root / f"p{top}" / "notes.txt").write_text("not DICOM")
    shutil.copy(pydicom_file("CT_small.dcm"), root / "at-the-top.dcm")
    (root / "p0" / "empty.dcm").write_bytes(b"")
    summary = run_pipeline(root, tmp_path / "out")
    serial = convert.convert_files([item[0] for item in inputs.list_files(inputs.resolve_pattern(str(root)))])
    assert summary["files_matched"] == serial.counts["files_matched"] == 6 * 3 + 2
    assert {k: v for k, v in summary["outcomes"].items() if v} == dict(serial.outcomes)
    assert summary["errors_by_reason"] == {"empty-file": 1}


# --- gs:// ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gs_tree(gcs_client, tmp_path_factory) -> list[str]:
    """330 objects under 30 prefixes, a few at the top."""
    root = tmp_path_factory.mktemp("gs-tree")
    for top in range(30):
        for index in range(11):
            path = root / f"p{top:02d}" / ("deep/" if index % 3 else "") / f"f{index:02d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    for index in range(3):
        (root / f"top{index}.txt").write_bytes(b"x")
    return upload_tree(gcs_client, root, BUCKET, "listing")


def test_a_paged_gs_listing_in_parts_lists_every_object_once(gs_tree, gcs_emulator):
    with LatencyProxy(gcs_emulator.url, delay_ms=0, list_page_size=7) as proxy, \
            patched_environ({"STORAGE_EMULATOR_HOST": proxy.url}):
        pattern = f"gs://{BUCKET}/listing/**"
        serial = list(inputs.list_files(pattern))
        parts = _fanned_out(pattern, serial, Counter({"files_matched": len(gs_tree)}))
        pages = proxy.counts.snapshot()["requests"]
    assert sorted(path for path, *_ in serial) == sorted(gs_tree)
    assert all(size == 1 for _, size, _ in serial)
    assert parts == 30 + 1
    assert pages == 2 * (1 + 30 * 2)  # twice: the top page, then 11 objects a part in pages of 7


def test_a_part_whose_listing_fails_past_the_deadline_is_one_error_line_and_exit_4(gs_tree, gcs_emulator, tmp_path):
    broken = "listing%2Fp07%2F"  # every list page of this part answers 503
    faults = Faults(outage=(0.0, 1000.0, 2000.0), only=f"prefix={broken}")
    with LatencyProxy(gcs_emulator.url, delay_ms=0, list_page_size=50, fault=faults) as proxy:
        done = subprocess.run(
            [sys.executable, "-m", "beam_pipeline", "--input", f"gs://{BUCKET}/listing/", "--output",
             str(tmp_path / "out"), "--quiet", "--retry-deadline", "1"],
            capture_output=True, text=True, timeout=300, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "STORAGE_EMULATOR_HOST": proxy.url})
    assert faults.injected > 0
    assert done.returncode == 4, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out/_report/summary.json").read_text())
    in_broken = [p for p in gs_tree if p.startswith(f"gs://{BUCKET}/listing/p07/")]
    assert summary["files_matched"] == len(gs_tree) - len(in_broken) + 1
    assert summary["errors_by_reason"] == {"unavailable": 1}
    errors = [json.loads(line) for path in (tmp_path / "out/_report").glob("errors*.jsonl")
              for line in path.read_text().splitlines()]
    assert [(e["reason"], e["path"]) for e in errors] == [("unavailable", f"gs://{BUCKET}/listing/p07/")]
    assert "still after 1 s of retries" in errors[0]["detail"]


def test_a_failing_part_in_a_group_is_one_error_line_and_its_group_is_listed(gs_tree, gcs_emulator, monkeypatch):
    monkeypatch.setattr(listing, "PART_SPREAD", 8)  # 30 parts in groups of 3: p07 with p06 and p08
    faults = Faults(outage=(0.0, 1000.0, 2000.0), only="prefix=listing%2Fp07%2F")
    with LatencyProxy(gcs_emulator.url, delay_ms=0, list_page_size=50, fault=faults) as proxy, \
            patched_environ({"STORAGE_EMULATOR_HOST": proxy.url}):
        pattern = f"gs://{BUCKET}/listing/**"
        pipeline = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([]))
        listed, counts, errors = pipeline | transforms.ListInputFiles(pattern, retry_deadline=1)
        kept = [path for path in gs_tree if not path.startswith(f"gs://{BUCKET}/listing/p07/")]
        assert_that(_items(listed) | "Paths" >> beam.Map(lambda item: item[0]), equal_to(kept), label="items")
        assert_that(counts | "Sum" >> beam.CombineGlobally(transforms.SumCounts()),
                    equal_to([Counter({"files_matched": len(kept) + 1, "outcome:error": 1, "error:unavailable": 1})]),
                    label="counts")
        assert_that(errors | "Where" >> beam.Map(lambda error: (error["reason"], error["path"])),
                    equal_to([("unavailable", f"gs://{BUCKET}/listing/p07/")]), label="errors")
        pipeline.run().wait_until_finish()
    assert faults.injected > 0
