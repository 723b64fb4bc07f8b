"""The Java side of the conformance and load tests: the reference validator harness (validator/) and a
HAPI FHIR JPA server (fhir-server/), both Maven projects built by .ci/run (``mvn -q -B package``).

Nothing here downloads anything: a project that is not built is skipped, or fails under CI.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runners import free_port

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = ROOT / "validator"
FHIR_SERVER = ROOT / "fhir-server"
PROFILE_DIRS = (ROOT / "tests" / "mii_profiles", ROOT / "tests" / "de_basisprofil")
JAVA_HEAP = "-Xmx768m"


def classpath(project: Path) -> str:
    """``target/classes`` and ``target/lib/*`` of a packaged project; skip (or fail under CI) if not built."""
    classes, lib = project / "target" / "classes", project / "target" / "lib"
    if not (classes.is_dir() and lib.is_dir() and any(lib.glob("*.jar")) and shutil.which("java")):
        message = f"{project.name}/ is not built: run (cd {project.name} && mvn -q -B package), as .ci/run does"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return f"{classes}{os.pathsep}{lib}{os.sep}*"


def run_cli(input_path, output_dir, *options: str) -> dict:
    """``python -m beam_pipeline`` on the in-process runner (one worker); returns summary.json."""
    command = [sys.executable, "-m", "beam_pipeline", "--input", str(input_path), "--output", str(output_dir),
               "--quiet", "--direct_running_mode", "in_memory", "--direct_num_workers", "1", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((Path(output_dir) / "_report" / "summary.json").read_text())


def resource_files(output_dir) -> list[Path]:
    """The resource files a loader takes (what manifest.json lists), then the Bundle files."""
    output_dir = Path(output_dir)
    manifest = json.loads((output_dir / "manifest.json").read_text())
    files = [output_dir / entry["url"] for entry in manifest["output"]]
    files += [output_dir / entry["url"] for entry in manifest.get("extension", {}).get("transactionBundles", [])]
    return files


def validate(files, report: Path) -> dict:
    """Runs the harness once (one JVM) over ``files``; returns its summary, the issues are in ``report``."""
    command = ["java", JAVA_HEAP, "-cp", classpath(VALIDATOR), "dicomfhirbeam.validator.Harness"]
    for folder in PROFILE_DIRS:
        command += ["--profiles", str(folder)]
    command += ["--report", str(report), *map(str, files)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_issues(report: Path) -> list[dict]:
    with open(report, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --- HTTP -----------------------------------------------------------------------------------------

def request(method: str, url: str, body=None, headers=None, timeout: float = 120):
    """(status, headers with lower-case names, parsed JSON body or None); HTTP errors are returned, not raised."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Accept": "application/fhir+json", **({"Content-Type": "application/fhir+json"} if data else {}),
        **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, head, raw = response.status, _lower(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, head, raw = error.code, _lower(error.headers), error.read()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    return status, head, parsed


def _lower(headers) -> dict:
    return {name.lower(): value for name, value in headers.items()}


class _NdjsonHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; NDJSON as ``application/fhir+ndjson`` (HAPI's $import refuses other types)."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".ndjson": "application/fhir+ndjson", ".json": "application/json"}

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def file_server(folder):
    """Serves ``folder`` on a free loopback port; yields the base URL (ending in /)."""
    port = free_port()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), functools.partial(_NdjsonHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class HapiServer:
    """A HAPI FHIR JPA server (R4, H2 in memory) from fhir-server/, on a free loopback port."""

    def __init__(self, log_path: Path, startup_timeout: float = 240):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.process = None
        self.loaded: str | None = None  # what a test module loaded since the last expunge (its own label)

    PORT_TAKEN = "was already in use"  # Spring Boot's words when the port is bound by then
    PORT_ATTEMPTS = 3

    def start(self) -> "HapiServer":
        """Starts the server; on another free port when its port was taken before it bound it (the
        server binds some 30 s after the port is chosen, and any loopback connection of a parallel
        test may get that port as its own local port meanwhile)."""
        for attempt in range(self.PORT_ATTEMPTS):
            try:
                return self._start()
            except RuntimeError as exc:
                if self.PORT_TAKEN not in str(exc) or attempt == self.PORT_ATTEMPTS - 1:
                    raise
                self.port = free_port()
                self.base = f"http://127.0.0.1:{self.port}/fhir"
        raise AssertionError("unreachable")

    def _start(self) -> "HapiServer":
        command = ["java", JAVA_HEAP, "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                   "-cp", classpath(FHIR_SERVER), "dicomfhirbeam.fhirserver.TestServer",
                   f"--server.port={self.port}", "--server.address=127.0.0.1"]
        if getattr(self, "_log", None):
            self._log.close()
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the HAPI server exited with {self.process.returncode}: "
                                   + self.log_path.read_text(errors="replace")[-3000:])
            with contextlib.suppress(OSError):
                status, _, body = request("GET", self.base + "/metadata", timeout=5)
                if status == 200 and body and body.get("resourceType") == "CapabilityStatement":
                    return self
            time.sleep(1)
        raise TimeoutError(f"the HAPI server was not ready within {self.startup_timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    # --- FHIR calls ---
    def count(self, resource_type: str, **params) -> int:
        query = "&".join(f"{k}={urllib.request.quote(str(v), safe=':|/')}" for k, v in params.items())
        status, _, body = request("GET", f"{self.base}/{resource_type}?_summary=count"
                                  + (f"&{query}" if query else ""))
        assert status == 200, body
        return body["total"]

    def search(self, resource_type: str, query: str) -> list[dict]:
        query = urllib.request.quote(query, safe="=&:/,._-")
        status, _, body = request("GET", f"{self.base}/{resource_type}?{query}&_count=500")
        assert status == 200, body
        return [entry["resource"] for entry in body.get("entry", ())]

    def read(self, resource_type: str, resource_id: str):
        return request("GET", f"{self.base}/{resource_type}/{resource_id}")

    def history_versions(self, resource_type: str, resource_id: str) -> int:
        status, _, body = request("GET", f"{self.base}/{resource_type}/{resource_id}/_history")
        assert status == 200, body
        return body.get("total", len(body.get("entry", ())))

    def expunge_everything(self) -> None:
        """Removes every resource and its history (system ``$expunge``), so each way of loading starts empty."""
        self.loaded = None
        status, _, body = request("POST", self.base + "/$expunge", {"resourceType": "Parameters", "parameter": [
            {"name": "expungeEverything", "valueBoolean": True}]})
        assert status == 200, body
