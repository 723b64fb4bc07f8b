"""Same input, same NDJSON lines: whatever the runner mode or number of workers."""
from __future__ import annotations

import pytest
from helpers import raw_lines, run_pipeline
from make_archive import make_archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    make_archive(root, studies=5, series=3, instances=8)
    return root


def test_in_memory_and_two_process_runs_write_identical_lines(archive, tmp_path):
    one = run_pipeline(archive, tmp_path / "one", "--direct_running_mode", "in_memory", "--direct_num_workers", "1")
    two = run_pipeline(archive, tmp_path / "two", "--direct_running_mode", "multi_processing",
                       "--direct_num_workers", "2")
    for name in ("ImagingStudy", "Device", "errors"):
        assert raw_lines(tmp_path / "one", name) == raw_lines(tmp_path / "two", name), name
    assert len(raw_lines(tmp_path / "one", "ImagingStudy")) == 5
    assert one["outcomes"] == two["outcomes"]
    assert one["outcomes"]["converted"] == 5 * 3 * 8
    assert one["resources"] == two["resources"]


def test_rerun_into_the_same_directory_replaces_the_output(archive, tmp_path):
    run_pipeline(archive, tmp_path / "out")
    first = raw_lines(tmp_path / "out", "ImagingStudy")
    run_pipeline(archive, tmp_path / "out")
    assert raw_lines(tmp_path / "out", "ImagingStudy") == first


def test_fast_reader_writes_what_pydicom_alone_writes(tmp_path):
    """Every file pydicom ships, read by the fast scanner and by pydicom only: same output."""
    from helpers import TEST_FILES

    fast = run_pipeline(TEST_FILES, tmp_path / "fast")
    slow = run_pipeline(TEST_FILES, tmp_path / "slow", "--pydicom-only")
    for name in ("ImagingStudy", "Device", "errors"):
        assert raw_lines(tmp_path / "fast", name) == raw_lines(tmp_path / "slow", name), name
    assert fast["outcomes"] == slow["outcomes"]
    assert fast["outcomes"]["converted"] > 100
