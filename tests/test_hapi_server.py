"""The output loaded into a real FHIR server: HAPI FHIR's JPA server (8.8.0, R4, H2 in memory; the
Spring Boot project in fhir-server/), started once for this module on a free loopback port.

Loaded three ways, each into an empty server (system ``$expunge`` in between): (a) Bulk Data ``$import``
of manifest.json, the files served over loopback HTTP (``--manifest-base-url``); (b) the transaction
Bundles (``--bundles``); (c) a PUT per NDJSON line. Then: every resource is there (counts by type),
ImagingStudy is found by identifier, patient, started and modality, no reference dangles, and loading
a second time changes nothing (no new versions). Without ``--patients --encounters`` the server's
referential integrity check refuses the studies (the test states HAPI's answer).

Each way prints its rate (resources per second, wall time of the load as a client sees it).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from fhir_java import HapiServer, file_server, request, run_cli
from helpers import TEST_FILES, references
from make_archive import make_archive, make_modality_archive

pytestmark = pytest.mark.slow

LOAD_ORDER = ("Patient", "Encounter", "Device", "Observation", "ImagingStudy")  # referenced types first


@pytest.fixture(scope="module")
def hapi(tmp_path_factory):
    server = HapiServer(tmp_path_factory.mktemp("hapi") / "hapi-server.log")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The converted archives, served over loopback HTTP; the full output's manifest has absolute URLs."""
    root = tmp_path_factory.mktemp("hapi-load")
    inputs = root / "inputs"
    make_modality_archive(inputs / "modalities")
    make_archive(inputs / "synthetic", studies=40, series=3, instances=3)
    (root / "www").mkdir()
    with file_server(root / "www") as base:
        full, bare = root / "www" / "full", root / "www" / "bare"
        run_cli(inputs, full, "--observations", "--patients", "--encounters", "--bundles",
                "--manifest-base-url", base + "full/")
        run_cli(TEST_FILES, root / "pydicom", "--observations", "--patients", "--encounters", "--bundles")
        run_cli(inputs, bare, "--observations", "--bundles")
        yield {"full": full, "bare": bare, "pydicom": root / "pydicom", "base": base}


def _lines(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def resources(output_dir: Path) -> dict[str, list[dict]]:
    manifest = json.loads((output_dir / "manifest.json").read_text())
    by_type: dict[str, list[dict]] = {}
    for entry in manifest["output"]:
        name = entry["url"].rsplit("/", 1)[-1]
        by_type.setdefault(entry["type"], []).extend(_lines(output_dir / name))
    return by_type


def expected_counts(output_dir: Path) -> Counter:
    manifest = json.loads((output_dir / "manifest.json").read_text())
    counts = Counter()
    for entry in manifest["output"]:
        counts[entry["type"]] += entry["count"]
    return counts


def server_counts(hapi: HapiServer, types) -> Counter:
    return Counter({t: n for t in types if (n := hapi.count(t))})


def history_total(hapi: HapiServer) -> int:
    """Number of resource versions on the server (system history)."""
    status, _, body = request("GET", hapi.base + "/_history?_summary=count")
    assert status == 200, body
    return body["total"]


def bundles(output_dir: Path) -> list[dict]:
    return [b for path in sorted((output_dir / "bundles").glob("Bundle-*.ndjson")) for b in _lines(path)]


# --- the three ways ------------------------------------------------------------------------------

def bulk_import(hapi: HapiServer, output_dir: Path, timeout: float = 600) -> dict:
    """$import of every manifest output; returns the final poll answer (status, body, seconds)."""
    manifest = json.loads((output_dir / "manifest.json").read_text())
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
        {"name": "storageDetail", "part": [{"name": "type", "valueCode": "https"}]},
        *({"name": "input", "part": [{"name": "type", "valueCode": o["type"]}, {"name": "url", "valueUri": o["url"]}]}
          for o in manifest["output"])]}
    started = time.monotonic()
    status, headers, body = request("POST", hapi.base + "/$import", params, {"Prefer": "respond-async"})
    assert status == 202, body
    poll = headers["content-location"]
    while time.monotonic() - started < timeout:
        status, _, body = request("GET", poll)
        if status != 202:
            return {"status": status, "body": body, "seconds": time.monotonic() - started}
        time.sleep(0.25)
    raise TimeoutError(f"$import not done after {timeout} s: {body}")


def post_bundles(hapi: HapiServer, output_dir: Path) -> tuple[list, float]:
    started = time.monotonic()
    answers = [request("POST", hapi.base, bundle) for bundle in bundles(output_dir)]
    return answers, time.monotonic() - started


def put_lines(hapi: HapiServer, output_dir: Path) -> tuple[list, float]:
    by_type = resources(output_dir)
    started = time.monotonic()
    answers = [(r, request("PUT", f"{hapi.base}/{t}/{r['id']}", r))
               for t in LOAD_ORDER for r in by_type.get(t, ())]
    return answers, time.monotonic() - started


def _rate(name: str, count: int, seconds: float) -> None:
    assert count > 0 and seconds > 0
    print(f"\nHAPI load ({name}): {count} resources in {seconds:.2f} s = {count / seconds:.1f} resources/s")


# --- checks shared by the three ways ------------------------------------------------------------

def check_present(hapi: HapiServer, output_dir: Path) -> None:
    expected = expected_counts(output_dir)
    assert server_counts(hapi, LOAD_ORDER) == expected


def check_no_dangling_references(hapi: HapiServer, output_dir: Path) -> None:
    on_server = {f"{t}/{r['id']}" for t in LOAD_ORDER for r in hapi.search(t, "_elements=id")}
    wanted = {ref for rs in resources(output_dir).values() for r in rs for ref in references(r)}
    assert wanted and wanted <= on_server, sorted(wanted - on_server)[:10]


@pytest.fixture
def imported(hapi, served):
    """The full output loaded by $import into an emptied server, for the tests that read it; loaded
    again whenever another test has emptied the server since, so the tests pass in any order."""
    if hapi.loaded != "full by $import":
        hapi.expunge_everything()
        result = bulk_import(hapi, served["full"])
        assert result["status"] == 200, result["body"]
        _rate("a: Bulk Data $import", sum(expected_counts(served["full"]).values()), result["seconds"])
        hapi.loaded = "full by $import"


def test_bulk_import_loads_everything(hapi, served, imported):
    check_present(hapi, served["full"])
    check_no_dangling_references(hapi, served["full"])


def test_manifest_urls_are_absolute_and_served(served):
    manifest = json.loads((served["full"] / "manifest.json").read_text())
    assert all(o["url"].startswith(served["base"] + "full/") for o in manifest["output"])
    status, headers, _ = request("GET", manifest["output"][0]["url"])
    assert status == 200 and headers["content-type"].startswith("application/fhir+ndjson")


def test_imaging_study_search_parameters(hapi, served, imported):
    studies = resources(served["full"])["ImagingStudy"]
    for study in studies[:: max(1, len(studies) // 10)]:
        uid = next(i for i in study["identifier"] if i.get("system") == "urn:dicom:uid")
        by_identifier = hapi.search("ImagingStudy", f"identifier=urn:dicom:uid|{uid['value']}")
        assert [s["id"] for s in by_identifier] == [study["id"]]
        by_patient = {s["id"] for s in hapi.search("ImagingStudy", f"patient={study['subject']['reference']}")}
        assert study["id"] in by_patient
        expected_same_patient = {s["id"] for s in studies if s["subject"] == study["subject"]}
        assert by_patient == expected_same_patient
        day = study["started"][:10]
        by_started = {s["id"] for s in hapi.search("ImagingStudy", f"started={day}")}
        assert study["id"] in by_started
    for code in ("CT", "MR", "PT", "NM", "US", "CR", "DX", "MG"):
        expected = {s["id"] for s in studies if any(m["code"] == code for m in s.get("modality", ()))}
        assert expected, code
        found = {s["id"] for s in hapi.search("ImagingStudy", f"modality=http://dicom.nema.org/resources/ontology/DCM|{code}")}
        assert found == expected, code
    assert hapi.search("ImagingStudy", "started=gt2099-01-01") == []


def test_bulk_import_twice_changes_nothing(hapi, served, imported):
    versions = history_total(hapi)
    again = bulk_import(hapi, served["full"])
    assert again["status"] == 200, again["body"]
    check_present(hapi, served["full"])
    assert history_total(hapi) == versions  # no new versions: the same content is no update


def test_transaction_bundles(hapi, served):
    hapi.expunge_everything()
    answers, seconds = post_bundles(hapi, served["full"])
    assert all(status == 200 for status, _, _ in answers), [b for s, _, b in answers if s != 200][:3]
    entries = sum(len(b["entry"]) for b in bundles(served["full"]))
    _rate("b: transaction Bundles", entries, seconds)
    check_present(hapi, served["full"])
    check_no_dangling_references(hapi, served["full"])
    versions = history_total(hapi)
    again, _ = post_bundles(hapi, served["full"])
    assert all(status == 200 for status, _, _ in again)
    assert {e["response"]["status"] for _, _, body in again for e in body["entry"]} == {"200 OK"}
    assert history_total(hapi) == versions


def test_put_per_line(hapi, served):
    hapi.expunge_everything()
    answers, seconds = put_lines(hapi, served["full"])
    assert {status for _, (status, _, _) in answers} == {201}, [b for _, (s, _, b) in answers if s != 201][:3]
    _rate("c: PUT per NDJSON line", len(answers), seconds)
    check_present(hapi, served["full"])
    check_no_dangling_references(hapi, served["full"])
    versions = history_total(hapi)
    again, _ = put_lines(hapi, served["full"])
    assert {status for _, (status, _, _) in again} == {200}
    assert history_total(hapi) == versions
    assert all(r["meta"]["versionId"] == "1" for _, (_, _, r) in again)


def test_pydicom_files_load(hapi, served):
    """pydicom's own test files (odd headers, several patients) load with every reference resolved."""
    hapi.expunge_everything()
    answers, _ = put_lines(hapi, served["pydicom"])
    assert {status for _, (status, _, _) in answers} == {201}, [b for _, (s, _, b) in answers if s != 201][:3]
    check_present(hapi, served["pydicom"])
    check_no_dangling_references(hapi, served["pydicom"])


def test_without_patients_and_encounters_the_server_refuses_dangling_references(hapi, served):
    """HAPI checks references on write (its default): without --patients/--encounters (and without a
    patient pipeline that loaded them first), every ImagingStudy and Observation is refused with 400
    "HAPI-1094: Resource Patient/… not found, specified in path: ImagingStudy.subject" (or the Encounter,
    ImagingStudy.encounter); Devices load. A transaction Bundle fails as a whole."""
    hapi.expunge_everything()
    answers, _ = put_lines(hapi, served["bare"])
    by_type = Counter()
    for resource, (status, _, body) in answers:
        by_type[resource["resourceType"], status] += 1
        if status != 201:
            text = json.dumps(body)
            assert status == 400 and "HAPI-1094" in text and "not found" in text, text[:500]
            assert "ImagingStudy.subject" in text or "ImagingStudy.encounter" in text or "Observation.subject" in text
    assert by_type[("Device", 201)] == len(resources(served["bare"])["Device"])
    assert by_type[("ImagingStudy", 400)] == len(resources(served["bare"])["ImagingStudy"])
    assert by_type[("Observation", 400)] == len(resources(served["bare"])["Observation"])
    status, _, body = request("POST", hapi.base, bundles(served["bare"])[0])
    assert status == 400 and "not found" in json.dumps(body)  # a transaction fails as a whole
    assert hapi.count("ImagingStudy") == 0



def test_a_server_whose_port_was_taken_before_it_bound_it_starts_on_another(tmp_path):
    """The server binds its port some 30 s after it is chosen; a parallel test's loopback connection may
    take it as its own local port meanwhile (CI once saw 'Port ... was already in use'): another port."""
    import socket

    server = HapiServer(tmp_path / "hapi-server.log")
    taken = server.port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        try:
            server.start()
            assert server.port != taken
            status, _, body = request("GET", server.base + "/metadata", timeout=30)
            assert status == 200 and body["resourceType"] == "CapabilityStatement"
        finally:
            server.stop()
