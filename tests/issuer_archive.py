"""A generated archive of four studies of "the same" PatientID from different issuers (real headers:
``make_archive`` from pydicom's files, then rewritten with pydicom), for the must-support tests.

- study 1: IssuerOfPatientID HOSP_A; IssuerOfAccessionNumberSequence with an ISO OID; AdmissionID
- study 2: IssuerOfPatientID HOSP_B; IssuerOfAccessionNumberSequence with a local namespace only
- study 3: no issuer at all (a single-source archive's usual case)
- study 4: only IssuerOfPatientIDQualifiersSequence (UniversalEntityID, an ISO OID)
"""
from __future__ import annotations

import glob
import os
import warnings

import pydicom
from make_archive import make_archive
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

PATIENT_ID = "PAT00001"
ACCESSION_OID = "1.2.276.0.76.3.1.1"
QUALIFIER_OID = "1.2.276.0.76.4.2"
SYSTEMS = {"HOSP_A": "https://hosp-a.example/fhir/sid/patient-id",
           "HOSP_B": "https://hosp-b.example/fhir/sid/patient-id",
           QUALIFIER_OID: "urn:oid:" + QUALIFIER_OID}


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


CHANGES = {
    1: dict(IssuerOfPatientID="HOSP_A", AdmissionID="ADM-1",
            IssuerOfAccessionNumberSequence=Sequence([_item(
                LocalNamespaceEntityID="RIS_A", UniversalEntityID=ACCESSION_OID, UniversalEntityIDType="ISO")])),
    2: dict(IssuerOfPatientID="HOSP_B",
            IssuerOfAccessionNumberSequence=Sequence([_item(LocalNamespaceEntityID="RIS_B")])),
    3: {},
    4: dict(IssuerOfPatientIDQualifiersSequence=Sequence([_item(
        UniversalEntityID=QUALIFIER_OID, UniversalEntityIDType="ISO")])),
}


def study_files(root, number: int) -> list[str]:
    return sorted(glob.glob(os.path.join(str(root), "*", f"study{number:05d}", "*", "*.dcm")))


def make_issuer_archive(root) -> dict:
    """Writes the archive under ``root``; returns make_archive's manifest (``study_uids`` in order)."""
    manifest = make_archive(root, studies=4, series=1, instances=2, patients=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for number, changes in CHANGES.items():
            for path in study_files(root, number):
                ds = pydicom.dcmread(path)
                for keyword, value in changes.items():
                    setattr(ds, keyword, value)
                ds.save_as(path, enforce_file_format=True)
    return manifest
