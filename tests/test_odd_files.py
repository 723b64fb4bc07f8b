"""Odd files and odd set-ups at archive scale (issue 7), through the real CLI: the run finishes,
every file is accounted for once, intact studies are written, problems are one error line each."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import copy_dicom, pydicom_file, read_ndjson

MR = pydicom_file("MR_small.dcm")
CT = pydicom_file("CT_small.dcm")


def cli(*args, check_exit: int | None = 0, env: dict | None = None):
    """Runs ``python -m beam_pipeline`` as a user would; returns the finished process."""
    done = subprocess.run([sys.executable, "-m", "beam_pipeline", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if check_exit is not None:
        assert done.returncode == check_exit, done.stdout + done.stderr
    return done


def summary_of(out) -> dict:
    with open(os.path.join(out, "_report", "summary.json"), encoding="utf-8") as handle:
        return json.load(handle)


def accounted(summary: dict) -> bool:
    return sum(summary["outcomes"].values()) == summary["files_matched"]


def test_a_file_name_that_is_not_utf8_is_converted_and_shown_escaped(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    good = os.path.join(os.fsencode(root), b"M\xfcller.dcm")   # Latin-1, as copied from an SMB share
    with open(MR, "rb") as src, open(good, "wb") as dst:
        dst.write(src.read())
    broken = os.path.join(os.fsencode(root), b"Gr\xf6\xdfe.dcm")
    with open(CT, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(700))                              # truncated: one error line
    cli("--input", root, "--output", tmp_path / "out")
    summary = summary_of(tmp_path / "out")
    assert summary["outcomes"]["converted"] == 1 and summary["errors_by_reason"] == {"truncated": 1}
    assert accounted(summary)
    [error] = read_ndjson(tmp_path / "out", "errors")
    assert error["path"] == str(root) + "/Gr\\xf6\\xdfe.dcm"


def test_one_stray_byte_in_a_uid_costs_one_instance_not_the_study(tmp_path):
    root = tmp_path / "in"
    study_uid, series_uid = "1.2.826.0.1.3680043.9.7.100", "1.2.826.0.1.3680043.9.7.200"
    for i in range(20):
        copy_dicom(MR, root / f"{i:02d}.dcm", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                   SOPInstanceUID=f"{series_uid}.{i + 1}", InstanceNumber=i + 1)
    data = bytearray((root / "07.dcm").read_bytes())
    at = data.index(f"{series_uid}.8".encode())
    data[at + 5] = 0xCE                                        # inside the SOPInstanceUID
    (root / "07.dcm").write_bytes(bytes(data))
    data = bytearray((root / "11.dcm").read_bytes())
    at = data.index(series_uid.encode())                       # SeriesInstanceUID: a phantom series
    data[at + 3] = ord("x")
    (root / "11.dcm").write_bytes(bytes(data))
    cli("--input", root, "--output", tmp_path / "out")
    summary = summary_of(tmp_path / "out")
    assert summary["outcomes"]["converted"] == 18
    assert summary["errors_by_reason"] == {"invalid-uid": 2}
    assert summary["studies"] == {"written": 1, "rejected": 0}
    [study] = read_ndjson(tmp_path / "out", "ImagingStudy")
    assert study["numberOfSeries"] == 1 and study["numberOfInstances"] == 18
    details = {e["detail"] for e in read_ndjson(tmp_path / "out", "errors")}
    assert all("\\x" not in d and "b'" not in d for d in details)


def test_symlinked_folders_are_followed_once_and_dangling_links_reported(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    copy_dicom(MR, elsewhere / "mr.dcm")
    root = tmp_path / "in"
    copy_dicom(CT, root / "ct.dcm")
    os.symlink(elsewhere, root / "linked")                     # a folder behind a symlink
    os.symlink(root, elsewhere / "loop")                       # a loop back to the input
    os.symlink(tmp_path / "gone.dcm", root / "dangling.dcm")
    done = cli("--input", root, "--output", tmp_path / "out")
    summary = summary_of(tmp_path / "out")
    assert summary["outcomes"]["converted"] == 2
    assert summary["errors_by_reason"] == {"dangling-symlink": 1}
    assert accounted(summary) and summary["files_matched"] == 3, done.stdout


def test_output_inside_the_input_is_not_read_back_and_stale_temp_folders_go(tmp_path):
    root = tmp_path / "in"
    copy_dicom(MR, root / "mr.dcm")
    out = root / "fhir"
    stale = out / ".temp-dicom2fhir-0123456789ab"  # what an interrupted run leaves
    stale.mkdir(parents=True)
    (stale / "half-written.ndjson").write_text("{}\n")
    cli("--input", root, "--output", out)
    cli("--input", root, "--output", out)                     # a re-run sees the first run's output
    summary = summary_of(out)
    assert summary["files_matched"] == 1 and summary["outcomes"]["converted"] == 1
    assert not [name for name in os.listdir(out) if name.startswith(".temp")]


def test_an_output_that_cannot_be_written_fails_at_once_in_one_line(tmp_path):
    copy_dicom(MR, tmp_path / "in" / "mr.dcm")
    (tmp_path / "taken").write_text("a file where the output folder should be\n")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = cli("--input", tmp_path / "in", "--output", tmp_path / "taken", check_exit=2, env={"TMPDIR": str(scratch)})
    assert done.stderr.strip().splitlines()[-1].startswith("error: --output")
    assert "Traceback" not in done.stderr
    assert list(scratch.iterdir()) == []  # no Pipeline was made, so no Beam temp folder is left behind
    done = cli("--input", tmp_path / "in", "--output", tmp_path / "taken" / "below", check_exit=2)
    assert "cannot be written" in done.stderr and "Traceback" not in done.stderr


def test_a_mistyped_option_is_an_error_not_a_warning(tmp_path):
    copy_dicom(MR, tmp_path / "in" / "mr.dcm")
    done = cli("--input", tmp_path / "in", "--output", tmp_path / "out", "--patient-id-lenght", "3",
               check_exit=2)
    assert "--patient-id-lenght" in done.stderr
    assert not (tmp_path / "out").exists()
    cli("--input", tmp_path / "in", "--output", tmp_path / "out", "--direct_num_workers", "1")  # Beam's own: fine


def test_only_our_own_hidden_folders_are_ever_removed(tmp_path):
    """A user's ".templates" beside the output, or an input folder named ".temp…", is left alone."""
    out = tmp_path / "out"
    (out / ".templates").mkdir(parents=True)
    (out / ".templates" / "letter.txt").write_text("keep me\n")
    beam_default = out / ".temp0f8fad5b-d9cb-469f-a165-70867728950e"  # Beam's own fileio name
    beam_default.mkdir()
    source = out / ".temp_scans"
    copy_dicom(MR, source / "mr.dcm")
    cli("--input", source, "--output", out)
    assert (out / ".templates" / "letter.txt").read_text() == "keep me\n"
    assert (source / "mr.dcm").exists() and not beam_default.exists()
    assert summary_of(out)["outcomes"]["converted"] == 1


def test_an_input_folder_whose_own_name_is_not_utf8(tmp_path):
    root = os.path.join(os.fsencode(tmp_path), b"r\xe9seau")
    os.makedirs(os.path.join(root, b"a"))
    with open(MR, "rb") as src, open(os.path.join(root, b"a", b"mr.dcm"), "wb") as dst:
        dst.write(src.read())
    for mode in ("study", "directory"):
        out = tmp_path / f"out-{mode}"
        subprocess.run([sys.executable, "-m", "beam_pipeline", b"--input", root, "--output", str(out),
                        "--group-by", mode], check=True, capture_output=True, timeout=300)
        assert summary_of(out)["outcomes"]["converted"] == 1
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as handle:
            assert "r\\xe9seau" in json.load(handle)["request"]


@pytest.mark.parametrize("args, message", [
    (["--progress-interval", "nan"], "--progress-interval"),
    (["--patient-id-length", "0"], "--patient-id-length"),
    (["--timezone", "Mars/Base"], "--timezone"),
    (["--manifest-base-url", "https://bob:secret@example.org/x?sig=1"], "--manifest-base-url"),
    (["--direct_num_workers=abc"], "direct_num_workers"),
])
def test_usage_errors_are_one_line(tmp_path, args, message):
    copy_dicom(MR, tmp_path / "in" / "mr.dcm")
    done = cli("--input", tmp_path / "in", "--output", tmp_path / "out", *args, check_exit=2)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "secret" not in done.stderr


def test_output_equal_to_input_is_refused(tmp_path):
    copy_dicom(MR, tmp_path / "in" / "mr.dcm")
    done = cli("--input", tmp_path / "in", "--output", tmp_path / "in", check_exit=2)
    assert "--output must not be the --input folder" in done.stderr


def test_a_disk_that_fills_up_during_the_run_fails_in_one_line_and_leaves_no_temp_files(tmp_path):
    """The output check passes (a probe fits), the shards do not: one line, exit 3, nothing left."""
    from helpers import TEST_FILES, small_disk

    with small_disk(tmp_path / "tiny-disk", "64k") as disk:
        done = cli("--input", TEST_FILES, "--output", disk / "out", "--quiet", check_exit=3)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the run failed: no space left on the device of --output "), lines
        assert str(disk / "out") in lines[0] and "no _report/summary.json was written" in lines[0], lines
        assert os.listdir(disk / "out") == []
