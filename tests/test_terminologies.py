"""Terminology tables: lookups, package-data loading and the reproducible build."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from terminologies import SYSTEMS, TABLES, Terminologies, read_table
from terminologies.build_terminologies import DX_VIEW_POSITION_TERMS, coding_scheme

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "dicom-terminologies"
SCT = SYSTEMS["SCT"]
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference tables not beside the repo")


@pytest.fixture(scope="module")
def terms():
    return Terminologies.load()


@pytest.mark.parametrize("term", ["HEAD", "head", "Head", " head "])
def test_body_site_is_case_insensitive(terms, term):
    assert terms.body_site(term) == {"system": SCT, "code": "69536005", "display": "Head"}


def test_body_site_unknown_and_non_string(terms):
    assert terms.body_site("NOSUCHPART") is None
    assert terms.body_site(None) is None


@pytest.mark.parametrize("value, code", [("R", "24028007"), ("L", "7771000"), ("B", "51440002"), ("r", "24028007")])
def test_laterality(terms, value, code):
    assert terms.laterality(value)["code"] == code
    assert terms.laterality(value)["system"] == SCT


def test_unpaired_laterality_is_not_unilateral(terms):
    assert terms.laterality("U") is None


def test_view_position_prefers_modality_table(terms):
    # "FB" is "caudo-cranial (from below)" in CID 4014 (MG) and "caudo-cranial" in CID 4010 (DX)
    assert terms.view_position("FB", "MG")["display"] == "caudo-cranial (from below)"
    assert terms.view_position("FB", "DX")["display"] == "caudo-cranial"
    assert terms.view_position("XCCL", "DX")["code"] == "399192008"  # falls back to the MG table
    assert terms.view_position("RPO", "CR")["code"] == "399038007"
    assert terms.view_position("UPSIDEDOWN", "DX") is None


def test_units_are_ucum(terms):
    assert terms.units("BQML") == {"system": SYSTEMS["UCUM"], "code": "Bq/ml", "display": "Becquerels/milliliter"}
    assert terms.units("NONE")["code"] == "1"
    assert terms.units("FURLONG") is None


def test_radionuclide_by_code_legacy_id_and_meaning(terms):
    expected = {"system": SCT, "code": "77004003", "display": "^18^Fluorine"}
    assert terms.radionuclide("77004003") == expected
    assert terms.radionuclide("C-111A1") == expected  # SNOMED-RT id in older headers
    assert terms.radionuclide(meaning="^18^fluorine") == expected
    assert terms.radionuclide(meaning="^99m^Technetium", modality="NM")["code"] == "72454006"
    assert terms.radionuclide(meaning="^99m^Technetium", modality="PT") is None  # not a PET nuclide


def test_dicom_defined_codes_keep_their_scheme(terms):
    scandium = terms.radionuclide("126605")
    assert scandium["system"] == SYSTEMS["DCM"]


def test_radiopharmaceutical(terms):
    fdg = terms.radiopharmaceutical(meaning="Fluorodeoxyglucose F^18^")
    assert fdg["system"] == SCT and fdg["code"] == "35321007"


def test_lookups_return_fresh_dicts(terms):
    terms.body_site("HEAD")["code"] = "changed"
    assert terms.body_site("HEAD")["code"] == "69536005"


def test_picklable(terms):
    clone = pickle.loads(pickle.dumps(terms))
    assert clone.radionuclide("77004003") == terms.radionuclide("77004003")


def test_tables_are_package_data():
    data = Path(sys.modules["terminologies"].__file__).parent / "data"
    assert sorted(p.stem for p in data.glob("*.json")) == sorted(TABLES)
    assert len(read_table("body_site")) > 300


@pytest.mark.parametrize("code, scheme", [
    ("77004003", "SCT"), ("35321007", "SCT"), ("7771000", "SCT"), ("126605", "DCM"), ("113691", "DCM"),
    ("C1943", "NCIt"), ("C2713594", "UMLS"),
])
def test_coding_scheme_heuristic(code, scheme):
    assert coding_scheme(code) == scheme


def _build(*args):
    return subprocess.run(
        [sys.executable, "-m", "terminologies.build_terminologies", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def test_build_fails_cleanly_when_offline(tmp_path):
    # port 9 (discard) on localhost refuses connections: a real offline condition, no mocking
    result = _build("--base-url", "http://127.0.0.1:9/", "--timeout", "5", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "error: cannot download" in result.stderr and "--source" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_build_fails_cleanly_on_missing_source(tmp_path):
    result = _build("--source", str(tmp_path / "absent"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


@needs_reference
def test_source_rebuild_equals_shipped_data(tmp_path):
    result = _build("--source", str(REFERENCE), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    shipped = Path(sys.modules["terminologies"].__file__).parent / "data"
    for name in TABLES:
        assert (tmp_path / f"{name}.json").read_bytes() == (shipped / f"{name}.json").read_bytes(), name


@needs_reference
def test_dx_view_terms_agree_with_reference_acr_column():
    lines = (REFERENCE / "viewposition_DX_2.csv").read_text().splitlines()[1:]
    acr = {term: meaning for meaning, term in (line.rsplit(",", 1) for line in lines) if term}
    assert acr and all(DX_VIEW_POSITION_TERMS[term] == meaning for term, meaning in acr.items())


@needs_reference
def test_every_reference_body_part_with_a_code_is_shipped(terms):
    rows = json.loads((REFERENCE / "bodysite_snomed.json").read_text())
    for row in rows:
        if row["Code Value"]:
            assert terms.body_site(row["Body Part Examined"])["code"] is not None
