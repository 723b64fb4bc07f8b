"""A nightly delta loaded into a real FHIR server (HAPI FHIR's JPA server, fhir-server/): the previous
snapshot, then the delta's resources (PUT by id) and its deletions Bundle, give the same content as
the full snapshot of the changed archive loaded into an empty server.

The night's changes: a new study, a late series in an existing study, a corrected file, a deleted
file, and a deleted study whose scanner and patient no other study has (so its Device and Patient
go too).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from fhir_java import HapiServer, request, run_cli
from helpers import pydicom_file, read_ndjson
from make_archive import make_archive
from nightly_changes import add_series, changed_file, deleted_file, new_study

pytestmark = pytest.mark.slow

LOAD_ORDER = ("Patient", "Encounter", "Device", "Observation", "ImagingStudy")  # referenced types first
OPTIONS = ("--patients", "--encounters", "--observations")


@pytest.fixture(scope="module")
def hapi(tmp_path_factory):
    server = HapiServer(tmp_path_factory.mktemp("hapi-nightly") / "hapi-server.log")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nightly-hapi")
    archive = {"root": root / "archive"}
    make_archive(archive["root"] / "main", studies=8, series=2, instances=3)
    lonely = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    lonely.DeviceSerialNumber, lonely.PatientID = "ONLY-IN-THIS-STUDY", "ONLY-THIS-PATIENT"
    (archive["root"] / "lonely").mkdir()
    lonely.save_as(archive["root"] / "lonely" / "ct.dcm", enforce_file_format=False)
    run_cli(archive["root"], root / "night1", *OPTIONS)
    for change in (new_study, add_series, changed_file, deleted_file):
        change(archive)
    shutil.rmtree(archive["root"] / "lonely")
    run_cli(archive["root"], root / "night2", "--since", str(root / "night1"), *OPTIONS)
    run_cli(archive["root"], root / "full", *OPTIONS)
    return {"night1": root / "night1", "night2": root / "night2", "full": root / "full"}


def put_all(hapi: HapiServer, output_dir: Path) -> int:
    """PUT every resource line of the snapshot by id."""
    count = 0
    for resource_type in LOAD_ORDER:
        for resource in read_ndjson(output_dir, resource_type):
            status, _, body = request("PUT", f"{hapi.base}/{resource_type}/{resource['id']}", resource)
            assert status in (200, 201), body
            count += 1
    return count


def put_delta(hapi: HapiServer, output_dir: Path) -> tuple[int, dict]:
    """PUT what ``_delta/manifest.json`` lists (referenced types first), as a loader would; returns
    the count and the deletions Bundle the manifest names."""
    manifest = json.loads((output_dir / "_delta" / "manifest.json").read_text())
    count = 0
    for entry in sorted(manifest["output"], key=lambda entry: LOAD_ORDER.index(entry["type"])):
        lines = (output_dir / entry["url"]).read_text().splitlines()
        assert len(lines) == entry["count"]
        for resource in map(json.loads, lines):
            assert resource["resourceType"] == entry["type"]
            status, _, body = request("PUT", f"{hapi.base}/{entry['type']}/{resource['id']}", resource)
            assert status in (200, 201), body
            count += 1
    (deletions,) = manifest["extension"]["deletions"]
    return count, json.loads((output_dir / deletions["url"]).read_text())


def content(hapi: HapiServer) -> dict[str, dict]:
    """Type/id -> resource as the server holds it, without what the server adds (versions, times)."""
    found = {}
    for resource_type in LOAD_ORDER:
        for resource in hapi.search(resource_type, "_count=500"):
            meta = {k: v for k, v in resource.get("meta", {}).items() if k not in ("versionId", "lastUpdated", "source")}
            resource = {**resource, "meta": meta} if meta else {k: v for k, v in resource.items() if k != "meta"}
            found[f"{resource_type}/{resource['id']}"] = resource
    return found


def test_previous_snapshot_plus_delta_equals_the_full_snapshot_on_a_fhir_server(hapi, nights):
    hapi.expunge_everything()
    loaded = put_all(hapi, nights["night1"])
    changed, deletions = put_delta(hapi, nights["night2"])
    assert changed == sum(len(read_ndjson(nights["night2"], "_delta/" + resource_type)) for resource_type in LOAD_ORDER)
    status, _, body = request("POST", hapi.base, deletions)
    assert status == 200, body
    incremental = content(hapi)

    hapi.expunge_everything()
    put_all(hapi, nights["full"])
    full = content(hapi)

    deleted = [entry["request"]["url"] for entry in deletions["entry"]]
    print(f"\nnightly delta on HAPI: {loaded} resources loaded, then {changed} changed and {len(deleted)} deleted")
    assert sorted(incremental) == sorted(full)
    assert incremental == full
    assert {"ImagingStudy", "Device", "Patient"} <= {key.split("/")[0] for key in deleted}
    assert changed < loaded / 2  # the delta is a small part of the snapshot
