"""The benchmark archive generator must write valid, deterministic DICOM with the promised UIDs."""
import io
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from make_archive import make_archive


def _files(root):
    return sorted(Path(root).rglob("*.dcm"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("archive")
    return out, make_archive(out, studies=2, series=2, instances=3, patients=2)


def test_layout_and_manifest(archive):
    out, m = archive
    files = _files(out)
    assert len(files) == m["files"] == m["instances"] == 12
    assert (m["studies"], m["series"], m["patients"]) == (2, 4, 2)
    assert {f.relative_to(out).parts[0] for f in files} == {"PAT00001", "PAT00002"}
    assert all(len(f.relative_to(out).parts) == 4 for f in files)  # patient/study/series/n.dcm


def test_headers_read_back_with_promised_uids(archive):
    out, m = archive
    by_study, sops = defaultdict(set), set()
    for f in _files(out):
        raw = f.read_bytes()
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.is_valid and uid.startswith("2.25.")
        assert ds.Modality in ("CT", "MR", "CR") and ds.DeviceSerialNumber and ds.BodyPartExamined
        assert ds.PatientID.startswith("PAT") and ds.AccessionNumber.startswith("ACC")
        assert ds.StudyDate and ds.StudyTime and 1 <= ds.InstanceNumber <= 3
        by_study[ds.StudyInstanceUID].add(ds.SeriesInstanceUID)
        sops.add(ds.SOPInstanceUID)
        # pydicom re-encodes the file to the very same bytes: the splicing is valid DICOM
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert buf.getvalue() == raw
    assert sorted(by_study) == sorted(m["study_uids"])
    assert all(len(s) == 2 for s in by_study.values())
    assert len(sops) == 12


def test_deterministic_and_seeded(tmp_path):
    kw = dict(studies=2, series=1, instances=2)
    a, b, c = (make_archive(tmp_path / n, seed=s, **kw) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert [f.relative_to(tmp_path / "a") for f in fa] == [f.relative_to(tmp_path / "b") for f in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    assert a["study_uids"] == b["study_uids"] and not set(a["study_uids"]) & set(c["study_uids"])


@pytest.mark.parametrize("pixel_bytes", [0, 4096, 2 * 300 * 7])
def test_pixel_bytes_honoured(tmp_path, pixel_bytes):
    m = make_archive(tmp_path, studies=1, series=1, instances=1, pixel_bytes=pixel_bytes)
    ds = pydicom.dcmread(_files(tmp_path)[0])
    assert len(ds.PixelData) == m["pixel_bytes"] == (pixel_bytes or 2)
    assert ds.Rows * ds.Columns * ds.BitsAllocated // 8 == len(ds.PixelData)
    assert ds.pixel_array.size == ds.Rows * ds.Columns


def test_flat_study_dirs_layout(tmp_path):
    m = make_archive(tmp_path, studies=3, series=2, instances=2, layout="flat-study-dirs")
    dirs = sorted(p for p in tmp_path.iterdir())
    assert len(dirs) == 3 and all(p.is_dir() for p in dirs)
    for d in dirs:  # one first-level folder per study, files directly inside
        files = list(d.iterdir())
        assert len(files) == 4 and all(f.is_file() for f in files)
        assert len({pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}) == 1
    assert m["files"] == 12


def test_devices_shared_across_studies(tmp_path):
    m = make_archive(tmp_path, studies=12, series=2, instances=1)
    assert 3 <= m["devices"] < 12 * 2


def test_rejects_odd_pixel_bytes(tmp_path):
    with pytest.raises(ValueError):
        make_archive(tmp_path, studies=1, series=1, instances=1, pixel_bytes=3)
