"""Generate a deterministic synthetic DICOM archive from pydicom's real test headers.

Why not ``dcmwrite`` per file: a 16k-file archive must be written in seconds, so
each series header is encoded once with pydicom (explicit VR little endian) and
only the per-instance elements (SOP Instance UID in meta and dataset, Instance
Number) are encoded per file and spliced between the pre-encoded chunks.
Identical arguments always give identical bytes (UIDs are derived from `seed`).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import json
import math
import os
import struct
import sys
import time
import uuid

import pydicom
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import ExplicitVRLittleEndian

# (file, modality, devices (manufacturer, model, serial), body parts)
TEMPLATES = [
    ("CT_small.dcm", "CT",
     [("GE MEDICAL SYSTEMS", "LightSpeed VCT", "CT-0001"),
      ("SIEMENS", "SOMATOM Force", "CT-0002")],
     ["CHEST", "ABDOMEN", "HEAD"]),
    ("MR_small.dcm", "MR",
     [("TOSHIBA_MEC", "MRT50H1", "MR-0001"),
      ("Philips Medical Systems", "Ingenia", "MR-0002")],
     ["HEAD", "KNEE", "SPINE"]),
    ("dicomdirtests/77654033/CR1/6154", "CR",
     [("Agfa-Gevaert AG", "ADC_5146", "CR-0001")],
     ["CHEST", "HAND"]),
]
LAYOUTS = ("nested", "flat-study-dirs")
SOP_INSTANCE_UID, INSTANCE_NUMBER, PIXEL_DATA = 0x00080018, 0x00200013, 0x7FE00010
IMPLEMENTATION_UID = "2.25.229617218113651145254146543447426862017"  # fixed, made up
UID_NAMESPACE = uuid.UUID("6f1c1f1e-5b1a-4c8e-9a55-0d1c0be4c0de")  # arbitrary, fixed
BASE_DATE = dt.datetime(2021, 1, 4, 7, 30)
@functools.lru_cache(maxsize=None)
def _template(name: str) -> pydicom.Dataset:
    """Read each shipped template once (with pixels, so the header is complete); callers copy it."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name!r} not available")
    return pydicom.dcmread(path)


def _uid(seed: int, *parts) -> str:
    """Name-based (SHA-1, v5) UUID as a 2.25 UID: deterministic, unlike generate_uid(prefix=None)."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '/'.join(map(str, (seed, *parts)))).int}"


def _elem(tag: int, vr: str, value: bytes) -> bytes:
    """Encode one explicit-VR little-endian element (even length, DICOM padding)."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "OW") else b" "
    if vr in ("OB", "OW", "UN", "SQ", "UT", "UC", "UR", "OD", "OF", "OL", "OV"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _file_meta(sop_class: str, sop_instance: str) -> bytes:
    body = b"".join([
        _elem(0x00020001, "OB", b"\0\1"),
        _elem(0x00020002, "UI", sop_class.encode()),
        _elem(0x00020003, "UI", sop_instance.encode()),
        _elem(0x00020010, "UI", ExplicitVRLittleEndian.encode()),
        _elem(0x00020012, "UI", IMPLEMENTATION_UID.encode()),
        _elem(0x00020013, "SH", b"BEAMBENCH_1"),
    ])
    return b"\0" * 128 + b"DICM" + _elem(0x00020000, "UL", struct.pack("<I", len(body))) + body


def _pixel_geometry(pixel_bytes: int) -> tuple[int, int]:
    """Rows x Columns of a 16-bit image holding `pixel_bytes` (both must fit in US)."""
    pixels = max(pixel_bytes // 2, 1)
    cols = next(d for d in range(math.isqrt(pixels), 0, -1) if pixels % d == 0)
    rows = pixels // cols
    if rows > 0xFFFF:
        raise ValueError(f"pixel_bytes={pixel_bytes} cannot be an image of US rows/columns; "
                         "use a size of 2*rows*columns")
    return rows, cols


def _series_chunks(ds: pydicom.Dataset) -> tuple[bytes, bytes, bytes, bytes]:
    """Encode ds (minus SOP UID, Instance Number, Pixel Data) as 4 chunks split at those tags."""
    chunks = [DicomBytesIO() for _ in range(4)]
    for fp in chunks:
        fp.is_little_endian, fp.is_implicit_VR = True, False
    cuts = (SOP_INSTANCE_UID, INSTANCE_NUMBER, PIXEL_DATA)
    for elem in ds:
        if elem.tag in cuts:
            continue
        write_data_element(chunks[sum(elem.tag > c for c in cuts)], elem, ds._character_set)
    return tuple(fp.getvalue() for fp in chunks)


def _series_dataset(tpl, modality, device, body_part, patient, study, series, seed, rows_cols):
    """Template copy carrying all patient/study/series-level attributes."""
    ds = copy.deepcopy(tpl)
    ds.pop("OtherPatientIDsSequence", None)  # the template's ids would be shared by everybody
    pat_no, st_no, se_no = patient + 1, study + 1, series + 1
    when = BASE_DATE + dt.timedelta(days=study, minutes=7 * study % 600)
    ser_when = when + dt.timedelta(minutes=5 * series)
    ds.PatientID = f"PAT{pat_no:05d}"
    ds.PatientName = f"Synthetic^Patient{pat_no:05d}"
    ds.PatientBirthDate = f"{1940 + pat_no % 60}0{1 + pat_no % 9}15"
    ds.PatientSex = "FM"[pat_no % 2]
    ds.StudyInstanceUID = _uid(seed, "study", study)
    ds.SeriesInstanceUID = _uid(seed, "series", study, series)
    ds.FrameOfReferenceUID = _uid(seed, "for", study, series)
    ds.AccessionNumber = f"ACC{st_no:07d}"
    ds.StudyID = str(st_no)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.InstanceCreationDate = ds.StudyDate
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ds.InstanceCreationTime = ser_when.strftime("%H%M%S")
    ds.StudyDescription = f"Synthetic {modality} study {st_no}"
    ds.SeriesDescription = f"{body_part} {modality} series {se_no}"
    ds.SeriesNumber = se_no
    ds.Modality = modality
    ds.Manufacturer, ds.ManufacturerModelName, ds.DeviceSerialNumber = device
    ds.StationName = device[2]
    ds.InstitutionName = "Synthetic Hospital"
    ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = rows_cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 16, 12, 11, 1
    return ds


def make_archive(out_dir, studies=40, series=4, instances=100, pixel_bytes=0, seed=0,
                 patients=None, layout="nested") -> dict:
    """Write studies x series x instances files under out_dir; return a manifest dict.

    pixel_bytes=0 writes a 1x1 16-bit image (2 bytes of PixelData); otherwise PixelData
    is exactly pixel_bytes (an even number) with Rows/Columns to match.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    if pixel_bytes % 2:
        raise ValueError("pixel_bytes must be even (DICOM values have even length)")
    patients = patients or max(1, (studies + 2) // 3)
    t0 = time.perf_counter()
    rows_cols = _pixel_geometry(pixel_bytes or 2)
    n_pix = rows_cols[0] * rows_cols[1] * 2
    pixels = (bytes(range(256)) * (n_pix // 256 + 1))[:n_pix]
    pixel_elem = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n_pix)  # header only
    study_uids, devices, files, total_bytes = [], set(), 0, 0
    for st in range(studies):
        patient = st % patients
        pat_dir = f"PAT{patient + 1:05d}"
        st_dir = f"study{st + 1:05d}"
        for se in range(series):
            # every 5th study mixes modalities (e.g. a CR scout in a CT study)
            t_idx = (st + (se if st % 5 == 4 else 0)) % len(TEMPLATES)
            name, modality, devs, parts = TEMPLATES[t_idx]
            device = devs[(st + se) % len(devs)]
            devices.add(device)
            ds = _series_dataset(_template(name), modality, device, parts[st % len(parts)],
                                 patient, st, se, seed, rows_cols)
            if se == 0:
                study_uids.append(ds.StudyInstanceUID)
            head, mid, rest, tail = _series_chunks(ds)
            if layout == "nested":
                folder = os.path.join(out_dir, pat_dir, st_dir, f"series{se + 1:03d}")
            else:
                folder = os.path.join(out_dir, st_dir)
            os.makedirs(folder, exist_ok=True)
            for k in range(instances):
                sop = _uid(seed, "sop", st, se, k)
                data = b"".join([
                    _file_meta(ds.SOPClassUID, sop), head,
                    _elem(SOP_INSTANCE_UID, "UI", sop.encode()), mid,
                    _elem(INSTANCE_NUMBER, "IS", str(k + 1).encode()), rest,
                    pixel_elem, pixels, tail,
                ])
                fname = f"{k + 1:06d}.dcm" if layout == "nested" else f"s{se + 1:03d}_{k + 1:06d}.dcm"
                with open(os.path.join(folder, fname), "wb") as fh:
                    fh.write(data)
                files += 1
                total_bytes += len(data)
    return {
        "out_dir": str(out_dir), "layout": layout, "seed": seed,
        "files": files, "studies": studies, "series": studies * series,
        "instances": files, "patients": min(patients, studies),
        "devices": len(devices), "pixel_bytes": n_pix, "bytes": total_bytes,
        "study_uids": study_uids, "seconds": round(time.perf_counter() - t0, 3),
    }


# --- one study per modality ------------------------------------------------------------------
# Real headers of pydicom's test files; PT, DX, MG, XA and RF and the fuller NM/US cases start from a
# real header and set the attributes those modalities carry (as tests/test_mii_conformance.py does).
# Every study has body weight and height (Observations) and an AdmissionID (Encounter).

def _item(**attributes) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(scheme: str, value: str, meaning: str) -> pydicom.Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _seq(*items) -> pydicom.Sequence:
    return pydicom.Sequence(list(items))


CR_HEADER = "dicomdirtests/77654033/CR3/6278"
# study label -> series: (template, changes); a study may mix modalities (PET/CT)
MODALITY_STUDIES = {
    "CT": [("CT_small.dcm", dict(BodyPartExamined="CHEST", ContrastBolusAgent="Iomeprol", ContrastBolusVolume="80"))],
    "MR": [("MR_small.dcm", dict(BodyPartExamined="HEAD", MagneticFieldStrength="3")),
           ("examples_overlay.dcm", dict(BodyPartExamined="HEAD"))],
    "PT": [("CT_small.dcm", dict(
        Modality="PT", Units="BQML", SeriesType=["WHOLE BODY", "IMAGE"], ContrastBolusAgent=None,
        SOPClassUID="1.2.840.10008.5.1.4.1.1.128", BodyPartExamined="WHOLEBODY",
        RadiopharmaceuticalInformationSequence=_seq(_item(
            Radiopharmaceutical="FDG", RadiopharmaceuticalStartTime="100000",
            RadionuclideTotalDose="350000000", RadionuclideHalfLife="6586.2",
            RadiopharmaceuticalCodeSequence=_seq(_code("SCT", "35321007", "Fluorodeoxyglucose F^18^")),
            RadionuclideCodeSequence=_seq(_code("SCT", "77004003", "^18^Fluorine")))))),
           ("CT_small.dcm", dict(BodyPartExamined="WHOLEBODY", ContrastBolusAgent=None))],
    "NM": [("JPEG2000.dcm", dict(RadiopharmaceuticalInformationSequence=_seq(_item(
        Radiopharmaceutical="Tc-99m MDP", RadiopharmaceuticalStartDateTime="19970806090000",
        RadionuclideTotalDose="740", RadionuclideHalfLife="21624",
        RadionuclideCodeSequence=_seq(_code("SRT", "C-163A8", "^99m^Technetium"))))))],
    "US": [("examples_palette.dcm", dict(
        ContrastBolusAgent="NONE", BurnedInAnnotation="YES", BodyPartExamined="ABDOMEN",
        SequenceOfUltrasoundRegions=_seq(_item(RegionSpatialFormat=1),
                                         _item(TransducerFrequency=3500, PulseRepetitionFrequency=4000))))],
    "CR": [(CR_HEADER, dict(BodyPartExamined="CHEST"))],
    "DX": [(CR_HEADER, dict(Modality="DX", SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1", ViewPosition="PA", KVP="125",
                            Exposure="4", ExposureTime="10", XRayTubeCurrent="400", BodyPartExamined="CHEST"))],
    "MG": [(CR_HEADER, dict(Modality="MG", SOPClassUID="1.2.840.10008.5.1.4.1.1.1.2", ViewPosition="MLO", KVP="28",
                            ImageLaterality="L", BodyPartExamined="BREAST",
                            ViewCodeSequence=_seq(_code("SCT", "399368009", "medio-lateral oblique"))))],
    "XA": [("CT_small.dcm", dict(Modality="XA", SOPClassUID="1.2.840.10008.5.1.4.1.1.12.1", BodyPartExamined="HEART",
                                 ContrastBolusAgent="Iopromide"))],
    "RF": [("CT_small.dcm", dict(Modality="RF", SOPClassUID="1.2.840.10008.5.1.4.1.1.12.2", BodyPartExamined="ABDOMEN",
                                 ContrastBolusAgent=None))],
    "OT": [("SC_rgb_gdcm_KY.dcm", {})],
    "SEG": [("liver_1frame.dcm", {})],
    "SR": [("reportsi.dcm", {})],
    "RTDOSE": [("rtdose.dcm", {})],
    "ECG": [("waveform_ecg.dcm", {})],
}


def make_modality_archive(out_dir, instances: int = 2, seed: int = 0) -> dict:
    """One study per modality of ``MODALITY_STUDIES`` under ``out_dir/<modality>/``: real headers
    with new UIDs, PatientID, AccessionNumber, AdmissionID, weight and height; ``instances`` files
    per series. Returns a manifest (studies, files, modalities, study_uids)."""
    files, study_uids, modalities = 0, {}, set()
    for st, (label, series_list) in enumerate(MODALITY_STUDIES.items()):
        study_uid = _uid(seed, "modality-study", label)
        study_uids[label] = study_uid
        when = BASE_DATE + dt.timedelta(days=st)
        for se, (template, changes) in enumerate(series_list):
            ds = copy.deepcopy(_template(template))
            ds.pop("OtherPatientIDsSequence", None)
            ds.PatientID = f"MOD{st + 1:04d}"
            ds.PatientName = f"Synthetic^Modality{st + 1:04d}"
            ds.PatientWeight, ds.PatientSize = f"{60 + st}", f"1.{60 + st}"
            ds.AdmissionID = f"VISIT{st + 1:05d}"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = _uid(seed, "modality-series", label, se)
            ds.AccessionNumber = f"MACC{st + 1:05d}"
            ds.StudyDate = ds.SeriesDate = when.strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = when.strftime("%H%M%S")
            ds.StudyDescription = f"Synthetic {label} study"
            ds.SeriesNumber = se + 1
            for keyword, value in changes.items():
                if value is None:
                    ds.pop(keyword, None)
                else:
                    setattr(ds, keyword, value)
            if "SOPClassUID" in changes:
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            modalities.add(ds.Modality)
            folder = os.path.join(out_dir, label, f"series{se + 1:02d}")
            os.makedirs(folder, exist_ok=True)
            for k in range(instances):
                ds.SOPInstanceUID = _uid(seed, "modality-sop", label, se, k)
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.InstanceNumber = k + 1
                ds.save_as(os.path.join(folder, f"{k + 1:04d}.dcm"), enforce_file_format=False)
                files += 1
    return {"out_dir": str(out_dir), "studies": len(MODALITY_STUDIES), "files": files,
            "modalities": sorted(modalities), "study_uids": study_uids}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--series", type=int, default=4)
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--pixel-bytes", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patients", type=int, default=None)
    p.add_argument("--layout", choices=LAYOUTS, default="nested")
    p.add_argument("--manifest", help="also write the manifest JSON here (keep it outside out_dir)")
    a = p.parse_args(argv)
    m = make_archive(a.out_dir, a.studies, a.series, a.instances, a.pixel_bytes, a.seed,
                     a.patients, a.layout)
    if a.manifest:
        with open(a.manifest, "w") as fh:
            json.dump(m, fh, indent=1)
    summary = {k: v for k, v in m.items() if k != "study_uids"}
    print(json.dumps(summary), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
