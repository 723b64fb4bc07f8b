"""What Dataflow workers install (``--setup_file``): the package, its terminology tables, and the
compiled element loop where a C compiler exists -- and a working package where none does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(out: Path, **env) -> zipfile.ZipFile:
    """A wheel built from a fresh copy of the sources (no build/ folder of an earlier build)."""
    source = out / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("beam_pipeline", "terminologies"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    wheels = list(out.glob("dicom_fhir_beam-*.whl"))
    assert len(wheels) == 1
    return zipfile.ZipFile(wheels[0])


@pytest.mark.slow
def test_without_a_compiler_the_wheel_is_pure_python_and_complete(tmp_path):
    wheel = build_wheel(tmp_path, CC="/bin/false", CXX="/bin/false")
    names = wheel.namelist()
    assert not [name for name in names if name.endswith((".so", ".pyd"))]
    assert "beam_pipeline/dicom/fast_header.py" in names
    assert {f"terminologies/data/{n}.json" for n in ("body_site", "laterality", "units")} <= set(names)


@pytest.mark.slow
def test_with_a_compiler_the_wheel_carries_the_compiled_loop(tmp_path):
    if not os.environ.get("CI"):
        pytest.skip("only CI promises a C compiler")
    names = build_wheel(tmp_path).namelist()
    assert [name for name in names if name.startswith("beam_pipeline/dicom/_walk.") and name.endswith(".so")]
