"""Test helpers: real DICOM files from pydicom, and a real Beam run of the whole pipeline."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pydicom.data
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline

from beam_pipeline.run.cli import parse_args
from beam_pipeline.run.output import shard_pattern
from beam_pipeline.run.pipeline import execute

TEST_FILES = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
DICOMDIR_TREE = os.path.join(TEST_FILES, "dicomdirtests")


def pydicom_file(name: str) -> str:
    return os.path.join(TEST_FILES, name)


def run_pipeline(input_path, output_dir, *options: str) -> dict:
    """Runs the real pipeline through TestPipeline on the in-process runner; returns the summary."""
    settings, beam_args = parse_args(["--input", str(input_path), "--output", str(output_dir), *options])
    return execute(lambda: TestPipeline(runner=FnApiRunner(), options=PipelineOptions(beam_args), blocking=False),
                   settings)


def read_ndjson(output_dir, name: str) -> list[dict]:
    """The lines of every shard of ``name`` (a resource type, ``Bundle``, ``errors``, ...) wherever
    the output layout puts it."""
    lines = []
    for path in sorted(glob.glob(shard_pattern(str(output_dir), name))):
        with open(path, encoding="utf-8") as handle:
            lines.extend(json.loads(line) for line in handle if line.strip())
    return lines


def raw_lines(output_dir, name: str) -> list[str]:
    lines = []
    for path in glob.glob(shard_pattern(str(output_dir), name)):
        with open(path, encoding="utf-8") as handle:
            lines.extend(line.rstrip("\n") for line in handle if line.strip())
    return sorted(lines)


def copy_dicom(src: str, dst, **changes) -> str:
    """Copies a real DICOM file, optionally changing (or deleting, with None) attributes."""
    os.makedirs(os.path.dirname(str(dst)), exist_ok=True)
    if not changes:
        shutil.copyfile(src, dst)
        return str(dst)
    ds = with_changes(pydicom.dcmread(src), **changes)
    ds.save_as(str(dst), enforce_file_format=False)
    return str(dst)


def with_changes(ds, **changes):
    """Sets attributes of a dataset in place; None deletes one. Returns the dataset."""
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def references(value) -> list[str]:
    """Every literal ``reference`` string anywhere inside a JSON value."""
    if isinstance(value, dict):
        found = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return found + [r for item in value.values() for r in references(item)]
    if isinstance(value, list):
        return [r for item in value for r in references(item)]
    return []


@contextlib.contextmanager
def small_disk(folder, size: str):
    """A tmpfs of ``size`` (e.g. "64k") mounted on ``folder`` while the block runs (the test is
    skipped where mounting needs root and it is not)."""
    import pytest

    os.makedirs(folder, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def engine_or_skip(install, required_in_ci=False):
    """What ``install()`` returns, or a skip naming what is missing (the exact Maven coordinates for
    a job server the registry does not serve); under CI, an engine that must install is a failure."""
    import pytest

    from scripts import engines

    try:
        return install()
    except engines.EngineUnavailable as missing:
        if required_in_ci and os.environ.get("CI"):
            raise
        pytest.skip(str(missing))


def poll(condition, what: str = "the condition", timeout: float = 300):
    """``condition()``'s first true value, asked again every 0.3 s; an AssertionError naming
    ``what`` after ``timeout`` s (a bound for a stuck run, never a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} not met within {timeout} s")


def follow_ledger(out) -> list[dict]:
    """The streaming follow pipeline's closed windows (names and counts), from its ledger."""
    try:
        return [json.loads(line) for line in (Path(out) / "windows.jsonl").read_text().splitlines() if line]
    except OSError:
        return []
