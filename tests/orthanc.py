"""A real Orthanc PACS with its DICOMweb plugin, started by the tests on free loopback ports.

Nothing is installed here: ``.ci/run`` installs the Debian packages ``orthanc`` and
``orthanc-dicomweb``. The server keeps its database in a temporary folder, requires HTTP basic
authentication (so wrong credentials are answered with 401) and refuses remote access.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time

import requests

USER, PASSWORD = "dicomweb-test", "not-a-real-secret"
_BINARY_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc")
_PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*")


def find_binary() -> str | None:
    for candidate in _BINARY_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def find_plugin() -> str | None:
    for pattern in _PLUGIN_GLOBS:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[0]
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Orthanc:
    """One Orthanc process; ``url`` is its REST root, ``dicomweb_url`` the DICOMweb root."""

    def __init__(self, workdir: str, binary: str, plugin: str):
        self.workdir = workdir
        self.binary = binary
        self.plugin = plugin
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.session = requests.Session()
        self.session.auth = (USER, PASSWORD)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, attempts: int = 3) -> "Orthanc":
        for _ in range(attempts):  # a free port can be taken between probing and binding
            self.port = free_port()
            if self._start_once():
                return self
        raise RuntimeError(f"Orthanc did not start; log:\n{self.log_tail()}")

    def _start_once(self) -> bool:
        storage = os.path.join(self.workdir, "storage")
        os.makedirs(storage, exist_ok=True)
        config = {
            "Name": "dicom-fhir-beam-tests",
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "Plugins": [self.plugin],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "SaveJobs": False,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        config_path = os.path.join(self.workdir, "orthanc.json")
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        log = open(os.path.join(self.workdir, "orthanc.log"), "ab")
        self.process = subprocess.Popen([self.binary, config_path], cwd=self.workdir, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if self.session.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return True
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(os.path.join(self.workdir, "orthanc.log"), encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- content ---------------------------------------------------------------------------------

    def upload(self, path: str) -> dict | None:
        """POST one file to /instances; Orthanc's answer (``Status`` "Success" or "AlreadyStored"),
        or None when Orthanc refuses the file (not DICOM, no identifiers, ...)."""
        with open(path, "rb") as handle:
            response = self.session.post(f"{self.url}/instances", data=handle.read(), timeout=60)
        if response.status_code != 200:
            return None
        return response.json()

    def upload_all(self, paths) -> list[str]:
        """Uploads files in order; returns those Orthanc stored as a new instance.

        Orthanc keys patients on the raw PatientID (padding included), so a copy of an instance
        whose PatientID differs only by a trailing space becomes a second Orthanc study with the
        same StudyInstanceUID, which its WADO-RS then refuses (404) as ambiguous. Such a copy is
        removed again and not returned: the archive stays a valid DICOM model.
        """
        stored = []
        for path in paths:
            answer = self.upload(path)
            if answer is None or answer["Status"] != "Success":
                continue
            study = self.session.get(f"{self.url}/studies/{answer['ParentStudy']}", timeout=30).json()
            uid = study["MainDicomTags"]["StudyInstanceUID"]
            if len(self.orthanc_studies(uid)) > 1:
                self.session.delete(f"{self.url}/instances/{answer['ID']}", timeout=30).raise_for_status()
                continue
            stored.append(path)
        return stored

    def orthanc_studies(self, study_uid: str) -> list[str]:
        found = self.session.post(f"{self.url}/tools/lookup", data=study_uid, timeout=30).json()
        return [item["ID"] for item in found if item["Type"] == "Study"]

    def study_ids(self) -> list[str]:
        return self.session.get(f"{self.url}/studies", timeout=30).json()

    def delete_study(self, study_uid: str) -> None:
        ids = self.orthanc_studies(study_uid)
        assert ids, "study to delete is not in Orthanc"
        for orthanc_id in ids:
            self.session.delete(f"{self.url}/studies/{orthanc_id}", timeout=30).raise_for_status()

    def clear(self) -> None:
        """Deletes every patient, so a test starts from an empty archive."""
        for patient in self.session.get(f"{self.url}/patients", timeout=30).json():
            self.session.delete(f"{self.url}/patients/{patient}", timeout=30).raise_for_status()
