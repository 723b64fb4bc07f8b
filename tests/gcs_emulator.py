"""A real GCS emulator (``gcp-storage-emulator`` from PyPI) on a free loopback port, for tests and
benchmarks. It serves the JSON API google-cloud-storage and Beam's GcsIO use, including the batch
copy/delete requests of Beam's rename (fake-gcs-server answers a batched copy with an empty
multipart body, so Beam's write step fails against it).

Everything that could make a Google client reach the internet is pointed at loopback:
``STORAGE_EMULATOR_HOST`` at the emulator, the metadata server at a closed loopback port (a stray
credentials lookup fails at once instead of trying 169.254.169.254), and no credentials file.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def closed_loopback_address() -> str:
    """host:port on loopback where nothing listens (connections are refused at once)."""
    return f"{LOOPBACK}:{free_port()}"


def is_loopback_url(url: str) -> bool:
    host = urlparse(url if "://" in url else "http://" + url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def offline_environment(emulator_url: str) -> dict[str, str]:
    """Environment variables that keep every Google client on loopback."""
    if not is_loopback_url(emulator_url):
        raise RuntimeError(f"refusing a GCS emulator that is not on loopback: {emulator_url}")
    closed = closed_loopback_address()
    return {
        "STORAGE_EMULATOR_HOST": emulator_url,
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "GOOGLE_APPLICATION_CREDENTIALS": "",
        "NO_GCE_CHECK": "true",  # google-auth: do not probe the metadata server at all
    }


class GcsEmulator:
    """The emulator in a subprocess, in-memory; ``url`` is http://127.0.0.1:PORT."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._process: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 15.0) -> "GcsEmulator":
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", LOOPBACK,
             "--port", str(self.port), "--in-memory", "--quiet"],
            stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"GCS emulator exited: {self._log.read()[-2000:].decode(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"GCS emulator did not answer within {timeout} s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test-project", method="POST",
            data=('{"name": "%s"}' % name).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def patched_environ(values: dict[str, str]):
    """Sets environment variables (empty string = unset) and restores them afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value:
                os.environ[key] = value
            else:
                os.environ.pop(key, None)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def anonymous_client():
    """A google-cloud-storage client for the emulator: anonymous, never looks up credentials."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if not is_loopback_url(os.environ.get("STORAGE_EMULATOR_HOST", "")):
        raise RuntimeError("STORAGE_EMULATOR_HOST must point at a loopback emulator")
    return storage.Client(project="test-project", credentials=AnonymousCredentials())


def upload_tree(client, local_root, bucket: str, prefix: str) -> list[str]:
    """Uploads every file under local_root to gs://bucket/prefix/...; returns the gs:// paths."""
    local_root = Path(local_root)
    uploaded = []
    bucket_ref = client.bucket(bucket)
    for path in sorted(p for p in local_root.rglob("*") if p.is_file()):
        name = f"{prefix.strip('/')}/{path.relative_to(local_root).as_posix()}"
        bucket_ref.blob(name).upload_from_filename(str(path))
        uploaded.append(f"gs://{bucket}/{name}")
    return uploaded
