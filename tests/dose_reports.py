"""X-Ray Radiation Dose SRs generated with pydicom, following TID 10011 (CT) and TID 10001
(projection X-ray), for the dose report tests. pydicom ships no dose report of its own.

``ct_report`` and ``projection_report`` build the content tree as the templates define it (rows
the mapping does not read included, so the reader has to find its way); keyword arguments bend
it into the odd shapes real writers produce.
"""
from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

RDSR_CLASS = "1.2.840.10008.5.1.4.1.1.88.67"


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(relationship: str, value_type: str, concept: tuple[str, str, str] | Dataset) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [concept if isinstance(concept, Dataset) else code(*concept)]
    return item


def dcm(value: str, meaning: str) -> tuple[str, str, str]:
    return value, "DCM", meaning


def container(concept, children, relationship="CONTAINS") -> Dataset:
    item = _item(relationship, "CONTAINER", concept)
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = list(children)
    return item


def num(concept, value: str | None, unit: str | None, scheme: str = "UCUM", relationship="CONTAINS") -> Dataset:
    item = _item(relationship, "NUM", concept)
    measured = Dataset()
    if value is not None:
        measured.NumericValue = value
    if unit is not None:
        measured.MeasurementUnitsCodeSequence = [code(unit, scheme, unit)]
    item.MeasuredValueSequence = [measured]
    return item


def coded(concept, value: Dataset, relationship="CONTAINS") -> Dataset:
    item = _item(relationship, "CODE", concept)
    item.ConceptCodeSequence = [value]
    return item


def uidref(concept, uid: str, relationship="CONTAINS") -> Dataset:
    item = _item(relationship, "UIDREF", concept)
    item.UID = uid
    return item


def datetime_item(concept, value: str, relationship="CONTAINS") -> Dataset:
    item = _item(relationship, "DATETIME", concept)
    item.DateTime = value
    return item


def text(concept, value: str, relationship="CONTAINS") -> Dataset:
    item = _item(relationship, "TEXT", concept)
    item.TextValue = value
    return item


def _scope(study_uid: str) -> Dataset:
    scope = coded(dcm("113705", "Scope of Accumulation"), code("113014", "DCM", "Study"), "HAS OBS CONTEXT")
    scope.ContentSequence = [uidref(dcm("110180", "Study Instance UID"), study_uid, "HAS PROPERTIES")]
    return scope


def _observer() -> Dataset:
    return coded(dcm("121005", "Observer Type"), code("121007", "DCM", "Device"), "HAS OBS CONTEXT")


def ct_event(uid: str, ctdivol: str, dlp: str, started: str = "20240305101500", *, dose_container=True,
             protocol="Abdomen") -> Dataset:
    """TID 10013 CT Irradiation Event Data: one CT Acquisition container."""
    dose_values = [
        num(dcm("113830", "Mean CTDIvol"), ctdivol, "mGy"),
        coded(dcm("113835", "CTDIw Phantom Type"), code("113691", "DCM", "IEC Body Dosimetry Phantom")),
        num(dcm("113838", "DLP"), dlp, "mGy.cm"),
    ]
    children = [
        text(dcm("125203", "Acquisition Protocol"), protocol),
        coded(("123014", "DCM", "Target Region"), code("818981001", "SCT", "Abdomen")),
        coded(dcm("113820", "CT Acquisition Type"), code("116152004", "SCT", "Spiral Acquisition")),
        container(dcm("113822", "CT Acquisition Parameters"), [
            num(dcm("113824", "Exposure Time"), "6.5", "s"),
            num(dcm("113825", "Scanning Length"), "420", "mm"),
        ]),
    ]
    children += [container(dcm("113829", "CT Dose"), dose_values)] if dose_container else dose_values
    children += [uidref(dcm("113769", "Irradiation Event UID"), uid),
                 datetime_item(("111526", "DCM", "DateTime Started"), started)]
    return container(dcm("113819", "CT Acquisition"), children)


def _dataset(study_uid, series_uid, sop_uid, patient_id, template, content, **header) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RDSR_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = RDSR_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate, ds.StudyTime = "20240305", "101000"
    ds.ContentDate, ds.ContentTime = "20240305", "103000"
    ds.AccessionNumber = ""
    ds.Modality = "SR"
    ds.Manufacturer = "Example Medical"
    ds.PatientName = "Dose^Test"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.DeviceSerialNumber = "CT-0042"
    ds.ManufacturerModelName = "Scanner 64"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code("113701", "DCM", "X-Ray Radiation Dose Report")]
    ds.ContinuityOfContent = "SEPARATE"
    template_item = Dataset()
    template_item.MappingResource, template_item.TemplateIdentifier = "DCMR", template
    ds.ContentTemplateSequence = [template_item]
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentSequence = content
    for keyword, value in header.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def ct_report(study_uid="1.2.826.0.1.3680043.8.498.1", series_uid=None, sop_uid=None, patient_id="DOSE-1", *,
              events=(("1.2.826.0.1.3680043.8.498.11", "12.5", "525.3"),
                      ("1.2.826.0.1.3680043.8.498.12", "8.25", "310")),
              dlp_total="835.3", event_count=None, start="20240305101500+0100", accumulated=None,
              extra=(), **header) -> Dataset:
    """A CT Radiation Dose report (TID 10011); ``accumulated`` replaces the accumulated container's items."""
    series_uid = series_uid or generate_uid()
    sop_uid = sop_uid or generate_uid()
    if accumulated is None:
        accumulated = [num(dcm("113812", "Total Number of Irradiation Events"),
                           str(len(events)) if event_count is None else event_count, "{events}"),
                       num(dcm("113813", "CT Dose Length Product Total"), dlp_total, "mGy.cm")]
    content = [
        coded(dcm("121058", "Procedure reported"), code("77477000", "SCT", "Computerized tomography"),
              "HAS CONCEPT MOD"),
        _observer(),
        _scope(study_uid),
    ]
    if start:
        content += [datetime_item(dcm("113809", "Start of X-Ray Irradiation"), start, "HAS OBS CONTEXT"),
                    datetime_item(dcm("113810", "End of X-Ray Irradiation"), start, "HAS OBS CONTEXT")]
    content += [container(dcm("113811", "CT Accumulated Dose Data"), accumulated)]
    content += [ct_event(uid, ctdi, dlp) if isinstance(uid, str) else uid for uid, ctdi, dlp in events]
    content += list(extra)
    content += [coded(dcm("113854", "Source of Dose Information"), code("113856", "DCM", "Automated Data Collection"))]
    return _dataset(study_uid, series_uid, sop_uid, patient_id, "10011", content, **header)


def accumulated_xray(plane=("113622", "Single Plane"), *, dap="0.00123", fluoro_dap="0.0008", fluoro_time="95.5",
                     dose_rp="0.0451", acquisition_dap="0.00043", items=None) -> Dataset:
    """TID 10002 Accumulated X-Ray Dose Data with TID 10004 (fluoroscopy and acquisition totals)."""
    if items is None:
        items = [
            num(dcm("113722", "Dose Area Product Total"), dap, "Gy.m2"),
            num(dcm("113725", "Dose (RP) Total"), dose_rp, "Gy"),
            num(dcm("113726", "Fluoro Dose Area Product Total"), fluoro_dap, "Gy.m2"),
            num(dcm("113728", "Fluoro Dose (RP) Total"), "0.03", "Gy"),
            num(dcm("113730", "Total Fluoro Time"), fluoro_time, "s"),
            num(dcm("113727", "Acquisition Dose Area Product Total"), acquisition_dap, "Gy.m2"),
            num(dcm("113729", "Acquisition Dose (RP) Total"), "0.0151", "Gy"),
            num(dcm("113855", "Total Acquisition Time"), "12", "s"),
        ]
    head = [coded(dcm("113764", "Acquisition Plane"), code(plane[0], "DCM", plane[1]), "HAS CONCEPT MOD")]
    return container(dcm("113702", "Accumulated X-Ray Dose Data"), head + list(items))


def xray_event(uid: str, plane=("113622", "Single Plane"), dap="0.0002") -> Dataset:
    """TID 10003 Irradiation Event X-Ray Data (not mapped: the mapping takes the totals)."""
    return container(dcm("113706", "Irradiation Event X-Ray Data"), [
        coded(dcm("113764", "Acquisition Plane"), code(plane[0], "DCM", plane[1]), "HAS CONCEPT MOD"),
        uidref(dcm("113769", "Irradiation Event UID"), uid),
        datetime_item(("111526", "DCM", "DateTime Started"), "20240305102000"),
        coded(dcm("113721", "Irradiation Event Type"), code("P5-06000", "SRT", "Fluoroscopy")),
        num(("122130", "DCM", "Dose Area Product"), dap, "Gy.m2"),
        num(dcm("113738", "Dose (RP)"), "0.004", "Gy"),
    ])


def projection_report(study_uid="1.2.826.0.1.3680043.8.498.2", series_uid=None, sop_uid=None, patient_id="DOSE-2",
                      *, accumulated=None, events=("1.2.826.0.1.3680043.8.498.21",), **header) -> Dataset:
    """A Projection X-Ray Radiation Dose report (TID 10001)."""
    series_uid = series_uid or generate_uid()
    sop_uid = sop_uid or generate_uid()
    accumulated = [accumulated_xray()] if accumulated is None else list(accumulated)
    content = [
        coded(dcm("121058", "Procedure reported"), code("113704", "DCM", "Projection X-Ray"), "HAS CONCEPT MOD"),
        _observer(),
        _scope(study_uid),
        *accumulated,
        *(xray_event(uid) for uid in events),
        coded(dcm("113854", "Source of Dose Information"), code("113856", "DCM", "Automated Data Collection")),
    ]
    header.setdefault("DeviceSerialNumber", "XA-0007")
    return _dataset(study_uid, series_uid, sop_uid, patient_id, "10001", content, **header)


def write(ds: Dataset, path) -> str:
    path = str(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def read(path) -> Dataset:
    return pydicom.dcmread(str(path))
