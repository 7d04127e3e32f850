"""A corpus of malformed inputs, made on the fly (tiny files): each must be refused with the specific error
and a message that names the problem, without changing the input. Batch tests: a failing case is a row in
summary.csv with nothing written for it, and the batch goes on."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segsentry.errors import InputError
from segsentry.runtime.io import CaseInput, collect_cases, read_case

SPACING = (0.8, 0.9, 2.0)
SHAPE = (6, 8, 9)  # z, y, x


def _array(dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(0).normal(size=SHAPE) * 100).astype(dtype)


def _write(path: Path, array: np.ndarray, *, compress: bool = False, spacing=SPACING, vector=False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
        image.SetOrigin((3.0, -4.0, 5.0))
        image.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), compress)
    return path


def _poisoned(dtype=np.float32, value=np.nan) -> np.ndarray:
    a = _array(dtype)
    a[2, 3, 4] = value
    return a


def _patch(path: Path, edits: list[tuple[int, str, tuple]]) -> Path:
    data = bytearray(path.read_bytes())
    for offset, fmt, values in edits:
        struct.pack_into("<" + fmt, data, offset, *values)
    path.write_bytes(bytes(data))
    return path


def _cut(path: Path, keep: float | int) -> Path:
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:n])
    return path


def _flip(path: Path, at: float | int) -> Path:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at) if isinstance(at, float) else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _nii(tmp: Path, name: str | None = None, **kw) -> Path:
    return _write(tmp / (name or f"{tmp.name}_0000.nii"), _array(), **kw)


def _nii_gz(tmp: Path) -> Path:
    return _write(tmp / f"{tmp.name}_0000.nii.gz", _array(), compress=True)


def _meta_header(tmp: Path, name: str, lines: dict[str, str], payload: bytes) -> Path:
    base = {"ObjectType": "Image", "NDims": "3", "BinaryData": "True", "BinaryDataByteOrderMSB": "False",
            "CompressedData": "False", "ElementSpacing": "0.8 0.9 2", "DimSize": "9 8 6",
            "ElementType": "MET_FLOAT"}
    base.update(lines)
    text = "".join(f"{k} = {v}\n" for k, v in base.items() if v is not None)
    path = tmp / name
    path.write_bytes(text.encode() + b"ElementDataFile = LOCAL\n" + payload)
    return path


def _nrrd(tmp: Path, fields: dict[str, str], payload: bytes, name: str | None = None) -> Path:
    base = {"type": "float", "dimension": "3", "space": "left-posterior-superior", "sizes": "9 8 6",
            "space directions": "(0.8,0,0) (0,0.9,0) (0,0,2)", "endian": "little", "encoding": "raw"}
    base.update(fields)
    text = "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in base.items() if v is not None) + "\n"
    path = tmp / (name or f"{tmp.name}_0000.nrrd")
    path.write_bytes(text.encode() + payload)
    return path


_RAW = _array().tobytes()


@dataclass(frozen=True)
class Malformed:
    """One corpus entry: ``make(tmp)`` writes the files and returns the case's channel files."""

    name: str
    make: Callable[[Path], list[Path]]
    fragment: str  # must appear in the message
    error: type = InputError


def _one(fn: Callable[[Path], Path]) -> Callable[[Path], list[Path]]:
    return lambda tmp: [fn(tmp)]


# NIfTI-1 header offsets: dim 40, datatype 70, bitpix 72, pixdim 76, vox_offset 108, qform/sform codes 252/254,
# srow_x/y/z 280/296/312, magic 344
CORPUS: list[Malformed] = [
    # --- compressed NIfTI: gzip stream end to end
    Malformed("nii.gz truncated at half", _one(lambda t: _cut(_nii_gz(t), 0.5)), "gzip stream"),
    Malformed("nii.gz truncated by 10 bytes", _one(lambda t: _cut(_nii_gz(t), -10)), "corrupt or truncated"),
    Malformed("nii.gz CRC corrupted", _one(lambda t: _flip(_nii_gz(t), -6)), "CRC check failed"),
    Malformed("nii.gz length field wrong", _one(lambda t: _flip(_nii_gz(t), -2)), "Incorrect length"),
    Malformed("nii.gz deflate data corrupted", _one(lambda t: _flip(_flip(_nii_gz(t), 0.5), 0.6)),
              "corrupt or truncated"),
    Malformed("nii.gz empty file", _one(lambda t: _cut(_nii_gz(t), 0)), "header bytes"),
    Malformed("nii.gz not gzip at all", _one(lambda t: _bytes(t / f"{t.name}_0000.nii.gz", b"hello" * 100)), "corrupt"),
    Malformed("nii.gz of a truncated nii", _one(lambda t: _bytes(t / f"{t.name}_0000.nii.gz", gzip.compress(
        _cut(_nii(t), -200).read_bytes()))), "the file is truncated"),
    # --- uncompressed NIfTI: payload against the header
    Malformed("nii payload short by 100 bytes", _one(lambda t: _cut(_nii(t), -100)), "the file is truncated"),
    Malformed("nii header only", _one(lambda t: _cut(_nii(t), 352)), "holds 0 bytes"),
    Malformed("nii shorter than its header", _one(lambda t: _cut(_nii(t), 100)), "header bytes"),
    Malformed("nii header declares a larger volume", _one(lambda t: _patch(_nii(t), [(42, "h", (90,))])),
              "declares 4320 float32 values"),
    Malformed("nii zero-size axis", _one(lambda t: _patch(_nii(t), [(44, "h", (0,))])), "empty axis"),
    Malformed("nii dim[0] = 0", _one(lambda t: _patch(_nii(t), [(40, "h", (0,))])), "0 dimensions"),
    Malformed("nii dim[0] = 9", _one(lambda t: _patch(_nii(t), [(40, "h", (9,))])), "9 dimensions"),
    Malformed("nii vox_offset inside the header", _one(lambda t: _patch(_nii(t), [(108, "f", (0.0,))])),
              "vox_offset"),
    Malformed("nii sizeof_hdr garbled", _one(lambda t: _patch(_nii(t), [(0, "i", (1234,))])), "sizeof_hdr"),
    Malformed("nii magic of a header/image pair", _one(lambda t: _patch(_nii(t), [(344, "4s", (b"ni1\0",))])),
              "not a single-file NIfTI"),
    # --- refused pixel types
    Malformed("nii complex64", _one(lambda t: _patch(_nii(t), [(70, "h", (32,)), (72, "h", (64,))])), "complex"),
    Malformed("nii complex128", _one(lambda t: _patch(_nii(t), [(70, "h", (1792,)), (72, "h", (128,))])),
              "complex"),
    Malformed("nii boolean", _one(lambda t: _patch(_nii(t), [(70, "h", (1,)), (72, "h", (1,))])), "boolean"),
    Malformed("nii RGB", _one(lambda t: _patch(_nii(t), [(70, "h", (128,)), (72, "h", (24,))])), "RGB"),
    Malformed("nii float128", _one(lambda t: _patch(_nii(t), [(70, "h", (1536,)), (72, "h", (128,))])), "128-bit"),
    Malformed("nii unknown datatype", _one(lambda t: _patch(_nii(t), [(70, "h", (3,))])), "unknown datatype"),
    Malformed("nrrd complex written by ITK", _one(lambda t: _write(t / f"{t.name}_0000.nrrd", _array(np.complex64))),
              "complex pixel type"),
    Malformed("mha vector (2 components)", _one(lambda t: _write(t / f"{t.name}_0000.mha", np.stack([_array()] * 2, -1),
                                                                 vector=True)), "2 components"),
    Malformed("nii 4D time series", _one(lambda t: _write(t / f"{t.name}_0000.nii.gz", np.stack([_array()] * 2))),
              "4D image"),
    Malformed("nii one slice as a 3D volume", _one(lambda t: _write(t / f"{t.name}_0000.nii.gz", _array()[:1],
                                                                   compress=True)), "a single slice"),
    Malformed("nii 2D", _one(lambda t: _write(t / f"{t.name}_0000.nii", _array()[0], spacing=SPACING[:2])), "2D image"),
    # --- non-finite payloads (ITK zeroes NaN/inf in NIfTI)
    Malformed("nii NaN float32", _one(lambda t: _write(t / f"{t.name}_0000.nii", _poisoned())), "NaN or infinite"),
    Malformed("nii +inf float32", _one(lambda t: _write(t / f"{t.name}_0000.nii", _poisoned(value=np.inf))),
              "1 voxel(s) are NaN or infinite"),
    Malformed("nii -inf float64", _one(lambda t: _write(t / f"{t.name}_0000.nii", _poisoned(np.float64, -np.inf))),
              "NaN or infinite"),
    Malformed("nii.gz NaN", _one(lambda t: _write(t / f"{t.name}_0000.nii.gz", _poisoned(), compress=True)),
              "NaN or infinite"),
    Malformed("mha NaN", _one(lambda t: _write(t / f"{t.name}_0000.mha", _poisoned())), "NaN or infinite"),
    Malformed("mha compressed inf", _one(lambda t: _write(t / f"{t.name}_0000.mha", _poisoned(value=np.inf), compress=True)),
              "NaN or infinite"),
    Malformed("nrrd gzip NaN", _one(lambda t: _write(t / f"{t.name}_0000.nrrd", _poisoned(), compress=True)),
              "NaN or infinite"),
    # --- geometry
    Malformed("nii pixdim 0 (ITK reads 1 mm)", _one(lambda t: _patch(_nii(t), [(80, "f", (0.0,))])), "pixdim"),
    Malformed("nii pixdim NaN", _one(lambda t: _patch(_nii(t), [(84, "f", (float("nan"),))])), "pixdim"),
    Malformed("nii spacing 1e6 mm", _one(lambda t: _nii(t, spacing=(1e6, 0.9, 2.0))), "outside 0.001 to 100 mm"),
    Malformed("nii spacing 1e-5 mm", _one(lambda t: _nii(t, spacing=(0.8, 1e-5, 2.0))), "voxel spacing"),
    Malformed("mha spacing 500 mm", _one(lambda t: _meta_header(t, f"{t.name}_0000.mha", {"ElementSpacing": "0.8 0.9 500"},
                                                                _RAW)), "voxel spacing"),
    Malformed("mha sheared direction", _one(lambda t: _meta_header(
        t, f"{t.name}_0000.mha", {"TransformMatrix": "1 0 0 0.5 1 0 0 0 1"}, _RAW)), "not orthonormal"),
    Malformed("mha singular direction", _one(lambda t: _meta_header(
        t, f"{t.name}_0000.mha", {"TransformMatrix": "1 0 0 1 0 0 0 0 1"}, _RAW)), "determinant is 0"),
    Malformed("nii singular sform", _one(lambda t: _patch(_nii(t), [(252, "h", (0,)), (254, "h", (1,)),
                                                                    (280, "4f", (0.8, 0, 0, 0)),
                                                                    (296, "4f", (0.8, 0, 0, 0))])), "cannot read"),
    # --- Analyze / NIfTI pairs
    Malformed("hdr without its img", _one(lambda t: (_nii(t, name=f"{t.name}_0000.hdr"),
                                                     (t / f"{t.name}_0000.img").unlink())[0]), ".img is missing"),
    Malformed("hdr with a truncated img", _one(lambda t: (_nii(t, name=f"{t.name}_0000.hdr"),
                                                          _cut(t / f"{t.name}_0000.img", -8))[0]), ".img holds"),
    Malformed("hdr with NaN in the img", _one(lambda t: _write(t / f"{t.name}_0000.hdr", _poisoned())), "NaN or infinite"),
    Malformed("hdr with a truncated img.gz", _one(lambda t: (
        _nii(t, name=f"{t.name}_0000.hdr"), (t / f"{t.name}_0000.img.gz").write_bytes(gzip.compress((t / f"{t.name}_0000.img").read_bytes())
                                                                         [:-30]), (t / f"{t.name}_0000.img").unlink())[0]),
        ".img.gz is corrupt or truncated"),
    # --- MetaImage
    Malformed("mha raw truncated", _one(lambda t: _cut(_write(t / f"{t.name}_0000.mha", _array()), -4)), "the file is truncated"),
    Malformed("mha compressed truncated", _one(lambda t: _cut(_write(t / f"{t.name}_0000.mha", _array(), compress=True), -20)),
              "zlib stream"),
    Malformed("mha compressed stream corrupted", _one(lambda t: _flip(_write(t / f"{t.name}_0000.mha", _array(),
                                                                             compress=True), -30)), "corrupt"),
    Malformed("mhd without its raw", _one(lambda t: (_write(t / f"{t.name}_0000.mhd", _array()),
                                                     (t / f"{t.name}_0000.raw").unlink())[0]), ".raw is missing"),
    Malformed("mhd with a truncated raw", _one(lambda t: (_write(t / f"{t.name}_0000.mhd", _array()),
                                                          _cut(t / f"{t.name}_0000.raw", 0.5))[0]), ".raw holds"),
    Malformed("mhd with NaN in the raw", _one(lambda t: _write(t / f"{t.name}_0000.mhd", _poisoned())), "NaN or infinite"),
    Malformed("mhd with a LIST of data files", _one(lambda t: _patch_text(
        _write(t / f"{t.name}_0000.mhd", _array()), "ElementDataFile = " + t.name + "_0000.raw", "ElementDataFile = LIST")),
        "multi-file MetaImage"),
    Malformed("mha header without ElementDataFile", _one(lambda t: _bytes(t / f"{t.name}_0000.mha", 
        b"ObjectType = Image\nNDims = 3\n")), "no ElementDataFile"),
    Malformed("mha string element type", _one(lambda t: _meta_header(t, f"{t.name}_0000.mha", {"ElementType": "MET_STRING"},
                                                                     _RAW)), "unsupported ElementType"),
    Malformed("mha NDims disagrees with DimSize", _one(lambda t: _meta_header(t, f"{t.name}_0000.mha", {"NDims": "2"}, _RAW)),
              "NDims 2 but DimSize"),
    Malformed("mha garbled header line", _one(lambda t: _bytes(t / f"{t.name}_0000.mha", 
        b"ObjectType = Image\nthis is not a header\n")), "is not 'Key = Value'"),
    Malformed("mha ascii payload short", _one(lambda t: _meta_header(t, f"{t.name}_0000.mha", {"BinaryData": "False"},
                                                                     b"1 2 3\n")), "the file is truncated"),
    Malformed("mha ascii payload with nan", _one(lambda t: _meta_header(
        t, f"{t.name}_0000.mha", {"BinaryData": "False"}, b" ".join([b"1"] * 431 + [b"nan"]))), "NaN or infinite"),
    # --- NRRD
    Malformed("nrrd raw truncated", _one(lambda t: _cut(_write(t / f"{t.name}_0000.nrrd", _array()), -40)),
              "the file is truncated"),
    Malformed("nrrd gzip truncated", _one(lambda t: _cut(_write(t / f"{t.name}_0000.nrrd", _array(), compress=True), -40)),
              "gzip stream"),
    Malformed("nrrd gzip CRC corrupted", _one(lambda t: _flip(_write(t / f"{t.name}_0000.nrrd", _array(), compress=True), -6)),
              "CRC check failed"),
    Malformed("nrrd raw NaN", _one(lambda t: _write(t / f"{t.name}_0000.nrrd", _poisoned())), "NaN or infinite"),
    Malformed("nrrd big-endian inf", _one(lambda t: _nrrd(t, {"endian": "big"}, _poisoned(np.dtype(">f4"), np.inf)
                                                          .tobytes())), "NaN or infinite"),
    Malformed("nrrd bzip2 truncated", _one(lambda t: _nrrd(t, {"encoding": "bzip2"}, bz2.compress(_RAW)[:-20])),
              "bz2 stream"),
    Malformed("nrrd without sizes", _one(lambda t: _nrrd(t, {"sizes": None}, _RAW)), "required field"),
    Malformed("nrrd type block", _one(lambda t: _nrrd(t, {"type": "block", "block size": "4"}, _RAW)),
              "unsupported NRRD type"),
    Malformed("nrrd hex encoding", _one(lambda t: _nrrd(t, {"encoding": "hex"}, _RAW.hex().encode())),
              "encoding 'hex' is not supported"),
    Malformed("nrrd dimension disagrees with sizes", _one(lambda t: _nrrd(t, {"dimension": "4"}, _RAW)),
              "dimension 4 but sizes"),
    Malformed("nrrd bad magic", _one(lambda t: _bytes(t / f"{t.name}_0000.nrrd", b"NRRX0004\n" + _RAW)), "no NRRD000x magic"),
    Malformed("nrrd detached data file missing", _one(lambda t: _nrrd(t, {"data file": "gone.raw"}, b"")),
              "data file gone.raw is missing"),
    Malformed("nrrd detached data file truncated", _one(lambda t: (
        (t / "d.raw").write_bytes(_RAW[:-4]), _nrrd(t, {"data file": "d.raw"}, b""))[1]), "in d.raw holds"),
    Malformed("nrrd ascii with inf", _one(lambda t: _nrrd(t, {"encoding": "ascii"},
                                                          b"\n".join([b"2.5"] * 431 + [b"-inf"]))), "NaN or infinite"),
    Malformed("nrrd zlib-in-gzip corrupted", _one(lambda t: _nrrd(t, {"encoding": "gzip"},
                                                                  b"\x1f\x8b\x08\x00" + zlib.compress(_RAW)[4:])),
              "corrupt or truncated"),
    # --- not an image
    Malformed("random bytes named .nii", _one(lambda t: _bytes(t / f"{t.name}_0000.nii", b"\0" * 400)), "sizeof_hdr"),
    Malformed("text named .mha", _one(lambda t: _bytes(t / f"{t.name}_0000.mha", b"just words\n")),
              "is not 'Key = Value'"),
    Malformed("a dangling symbolic link", _one(lambda t: _link(t / f"{t.name}_0000.nii.gz", t / "gone.nii.gz")),
              "no such file"),
    Malformed("a symbolic link loop", _one(lambda t: _link(t / f"{t.name}_0000.nii.gz", t / f"{t.name}_0000.nii.gz")),
              "looping symbolic link"),
    Malformed("gipl garbage (left to ITK)", _one(lambda t: _bytes(t / f"{t.name}_0000.gipl", b"\1" * 300)), "cannot read"),
]


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _patch_text(path: Path, old: str, new: str) -> Path:
    path.write_bytes(path.read_bytes().replace(old.encode(), new.encode(), 1))
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else f"-> {p.readlink()}"
            for p in sorted(folder.iterdir()) if p.is_file() or p.is_symlink()}


def test_the_corpus_is_large_and_names_are_unique():
    assert len(CORPUS) >= 60
    assert len({m.name for m in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("bad", CORPUS, ids=[m.name for m in CORPUS])
def test_malformed_input_is_refused_with_a_clear_message(bad: Malformed, tmp_path: Path):
    files = bad.make(tmp_path)
    before = _digest(tmp_path)
    with pytest.raises(bad.error) as info:
        read_case(CaseInput("c", tuple(files)), num_channels=len(files))
    message = str(info.value)
    assert bad.fragment in message, message
    assert "\n" not in message
    assert _digest(tmp_path) == before  # no input changed, nothing written beside it


@pytest.mark.parametrize("ending,compress", [(".nii", False), (".nii.gz", True), (".mha", False), (".mha", True),
                                             (".mhd", False), (".nrrd", False), (".nrrd", True), (".hdr", False)])
def test_well_formed_files_pass_and_read_exactly(ending: str, compress: bool, tmp_path: Path):
    """The checks must not refuse good files: every format round-trips the array, float and int16."""
    for dtype in (np.float32, np.int16):
        array = _array(dtype)
        path = _write(tmp_path / f"{np.dtype(dtype).name}_0000{ending}", array, compress=compress)
        loaded = read_case(CaseInput("c", (path,)), num_channels=1)
        np.testing.assert_array_equal(loaded.image[0], array.astype(np.float32))
        assert loaded.spacing == pytest.approx(SPACING[::-1], rel=1e-6)


# --- DICOM series: each folder must be refused (at collection or at reading) with the specific problem -----

def _series_refusal(folder: Path, **read_kw) -> str:
    """The message of the first case under ``folder`` that fails; fails the test if every case reads."""
    cases = collect_cases([folder], num_channels=1)
    for case in cases:
        try:
            read_case(case, num_channels=1, **read_kw)
        except InputError as exc:
            return str(exc)
    raise AssertionError(f"every case under {folder} was read: {[c.case_id for c in cases]}")


def _gap(t):
    from dicom_factory import STEP_MM, write_series
    write_series(t, positions=[i * STEP_MM for i in (0, 1, 2, 4, 5, 6)])


def _duplicate(t):
    from dicom_factory import write_series
    write_series(t, positions=[0, 2.5, 5, 5, 7.5, 10])


def _two_acquisitions(t):
    from dicom_factory import write_series
    uid = __import__("pydicom").uid.generate_uid()
    write_series(t, n=4, uid=uid, prefix="A", edit=lambda i, ds: setattr(ds, "AcquisitionNumber", 1))
    write_series(t, n=4, uid=uid, prefix="B", edit=lambda i, ds: setattr(ds, "AcquisitionNumber", 2))


def _edit_one(attribute, value, index=3):
    def make(t):
        from dicom_factory import write_series
        write_series(t, edit=lambda i, ds: setattr(ds, attribute, value) if i == index else None)
    return make


def _cropped_slice(t):
    from dicom_factory import write_series

    def edit(i, ds):
        if i == 2:
            ds.PixelData = ds.pixel_array[:64, :64].tobytes()
            ds.Rows, ds.Columns = 64, 64
    write_series(t, edit=edit)


def _tilted(t):
    from dicom_factory import write_series

    def edit(i, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + i * 0.6, z]  # 0.6 mm per 2.5 mm step: a 13.5° gantry tilt
    write_series(t, edit=edit)


def _truncated_slice(t):
    from dicom_factory import write_series
    paths = write_series(t)
    _cut(paths[2], -1000)


def _short_pixel_data(t):
    from dicom_factory import write_series
    write_series(t, edit=lambda i, ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2])
                 if i == 1 else None)


def _no_position(t):
    from dicom_factory import write_series
    write_series(t, edit=lambda i, ds: delattr(ds, "ImagePositionPatient") if i == 4 else None)


def _mr_series(t):
    from dicom_factory import write_series
    write_series(t, name="MR_small.dcm")


def _dicomdir_only(t):
    from dicom_factory import write_dicomdir
    write_dicomdir(t)


def _garbage_dicom(t):
    t.mkdir(parents=True, exist_ok=True)
    (t / "IM0000.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"junk" * 10)


def _only_localizers(t):
    from dicom_factory import write_series
    write_series(t, edit=lambda i, ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))


def _two_frames(t):
    from dicom_factory import write_series

    def edit(i, ds):
        if i == 3:
            ds.NumberOfFrames = 2
            ds.PixelData = ds.PixelData * 2
    write_series(t, edit=edit)


def _single_slice(t):
    from dicom_factory import write_series
    write_series(t, n=1)


@dataclass(frozen=True)
class MalformedSeries:
    name: str
    make: Callable[[Path], None]
    fragment: str
    read_kw: tuple = ()


SERIES_CORPUS = [
    MalformedSeries("a missing slice", _gap, "irregular slice positions"),
    MalformedSeries("duplicated positions", _duplicate, "duplicated slice position"),
    MalformedSeries("two acquisitions under one UID", _two_acquisitions, "several acquisitions"),
    MalformedSeries("a slice not parallel", _edit_one("ImageOrientationPatient", [1, 0, 0, 0, 0.8, 0.6]),
                    "not parallel"),
    MalformedSeries("pixel spacing changes", _edit_one("PixelSpacing", [0.9, 0.9]), "pixel spacing changes"),
    MalformedSeries("matrix size changes", _cropped_slice, "matrix size changes"),
    MalformedSeries("a single slice", _single_slice, "a single slice"),
    MalformedSeries("only localizers", _only_localizers, "only localizer"),
    MalformedSeries("gantry tilt from positions", _tilted, "gantry tilt"),
    MalformedSeries("gantry tilt tag", _edit_one("GantryDetectorTilt", 15.0), "GantryDetectorTilt 15"),
    MalformedSeries("MR series into a CT model", _mr_series, "Modality MR, but the model was trained on CT",
                    (("expected_modality", "CT"),)),
    MalformedSeries("CT series into an MR model", _edit_one("Modality", "CT", 0), "Modality CT, but the model was "
                    "trained on MR", (("expected_modality", "MR"),)),
    MalformedSeries("mixed modalities", _edit_one("Modality", "MR"), "mixed modalities"),
    MalformedSeries("a truncated slice file", _truncated_slice, "bytes early"),
    MalformedSeries("pixel data shorter than the matrix", _short_pixel_data, "the pixel data holds"),
    MalformedSeries("a slice without ImagePositionPatient", _no_position, "lack ImagePositionPatient"),
    MalformedSeries("multi-frame", _two_frames, "multi-frame"),
    MalformedSeries("a DICOMDIR and no images", _dicomdir_only, "no image series"),
    MalformedSeries("a garbled DICOM file", _garbage_dicom, "no image series"),
]


@pytest.mark.parametrize("bad", SERIES_CORPUS, ids=[m.name for m in SERIES_CORPUS])
def test_malformed_dicom_series_is_refused(bad: MalformedSeries, tmp_path: Path):
    pytest.importorskip("pydicom")
    folder = tmp_path / "SE1"
    bad.make(folder)
    before = _digest(folder)
    message = _series_refusal(folder, **dict(bad.read_kw))
    assert bad.fragment in message, message
    assert "\n" not in message
    assert _digest(folder) == before


def test_corpus_size_counts_both_families():
    assert len(CORPUS) + len(SERIES_CORPUS) >= 90


# --- batches: a failing case is a row in summary.csv, nothing of it is written, the batch goes on -----------

def _summary(out: Path) -> dict[str, dict[str, str]]:
    import csv

    with (out / "summary.csv").open() as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def _case_files(out: Path, case_id: str) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(case_id))


def test_batch_records_every_malformed_case_and_goes_on(ct_pipeline, test_cases, tmp_path):
    """Truncated .nii.gz, NaN .nii, an irregular DICOM series and two same-named series folders, in one batch:
    one summary row each, only the good cases written, and patA/SE1 vs patB/SE1 both processed (not one twice)."""
    from dicom_factory import write_series
    from segsentry.runtime.batch import run_batch

    good = next(iter(test_cases["ct"].values()))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / good.name).write_bytes(good.read_bytes())
    _cut(_write(inputs / "trunc_0000.nii.gz", _array(np.int16), compress=True), 0.6)
    _write(inputs / "nan_0000.nii", _poisoned())
    write_series(tmp_path / "patA" / "SE1", n=6)
    write_series(tmp_path / "patB" / "SE1", n=6)
    write_series(tmp_path / "patC" / "gap", positions=[0, 2.5, 5, 10, 12.5, 15])
    before = {p: _digest(p) for p in (inputs, tmp_path / "patA" / "SE1", tmp_path / "patC" / "gap")}
    out = tmp_path / "out"
    result = run_batch(ct_pipeline.ood_onnx, [inputs, tmp_path / "patA" / "SE1", tmp_path / "patB" / "SE1",
                                              tmp_path / "patC" / "gap"], out, qa=False)
    rows = _summary(out)
    good_id = good.name.removesuffix("_0000.nii.gz")
    assert set(rows) == {good_id, "trunc", "nan", "patA_SE1", "patB_SE1", "gap"}
    assert {c for c, r in rows.items() if r["status"] == "ok"} == {good_id, "patA_SE1", "patB_SE1"}
    assert "gzip stream" in rows["trunc"]["error"] and "NaN or infinite" in rows["nan"]["error"]
    assert "--allow-irregular-slices" in rows["gap"]["error"]
    for failed in ("trunc", "nan", "gap"):
        assert _case_files(out, failed) == []
    uids = {json_report["input_ids"][0]["series_instance_uid"] for json_report in
            (__import__("json").loads((out / f"{c}.json").read_text()) for c in ("patA_SE1", "patB_SE1"))}
    assert len(uids) == 2
    assert result.exit_code() == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no stage folders left
    assert {p: _digest(p) for p in before} == before


def test_case_json_identifies_version_bundle_and_inputs(ct_pipeline, test_cases, tmp_path):
    import json

    import segsentry
    from segsentry.runtime.batch import run_batch

    files = next(iter(test_cases["ct"].values()))
    run_batch(ct_pipeline.ood_onnx, files, tmp_path / "o", qa=False)
    case_id = files[0].name.removesuffix("_0000.nii.gz")
    report = json.loads((tmp_path / "o" / f"{case_id}.json").read_text())
    assert report["segsentry_version"] == segsentry.__version__
    assert report["bundle_sha256"] == hashlib.sha256(ct_pipeline.ood_onnx.read_bytes()).hexdigest()
    assert report["input_ids"] == [{"path": str(files[0]), "sha256": hashlib.sha256(files[0].read_bytes()).hexdigest()}]


def test_irregular_series_runs_only_with_the_flag_and_the_report_says_so(ct_pipeline, tmp_path):
    import json

    from dicom_factory import write_series
    from typer.testing import CliRunner

    from segsentry.cli import run_app

    write_series(tmp_path / "gap", positions=[0, 2.5, 5, 10, 12.5, 15])
    refused = CliRunner().invoke(run_app, [str(ct_pipeline.ood_onnx), str(tmp_path / "gap"), "-o",
                                           str(tmp_path / "o"), "--no-qa"])
    assert refused.exit_code == 1 and not (tmp_path / "o" / "gap.json").exists()
    allowed = CliRunner().invoke(run_app, [str(ct_pipeline.ood_onnx), str(tmp_path / "gap"), "-o",
                                           str(tmp_path / "o"), "--no-qa", "--allow-irregular-slices"])
    assert allowed.exit_code in (0, 3), allowed.output
    report = json.loads((tmp_path / "o" / "gap.json").read_text())
    assert any("irregular slice positions" in w for w in report["warnings"])
    assert _summary(tmp_path / "o")["gap"]["status"] == "ok"


def test_a_case_appears_all_together_or_not_at_all(ct_pipeline, test_cases, tmp_path, monkeypatch):
    """The uncertainty map fails to write after the mask was written: the case has no file in the output
    folder at all (the earlier run's outputs removed, no stage folder left); a stage folder left by a killed
    run is cleaned up when the case runs again; completed_cases only lists cases with their marker."""
    import segsentry.runtime.batch as batch

    files = next(iter(test_cases["ct"].values()))
    case_id = files[0].name.removesuffix("_0000.nii.gz")
    out = tmp_path / "o"
    batch.run_batch(ct_pipeline.ood_onnx, files, out, qa=False)
    complete = {f"{case_id}.json", f"{case_id}.nii.gz", f"{case_id}_uncertainty.nii.gz"}
    assert set(_case_files(out, case_id)) == complete
    assert set(batch.completed_cases(out)) == {case_id}

    (out / f".{case_id}.case.partial-killed").mkdir()  # what a kill -9 during publishing leaves
    (out / f".{case_id}.case.partial-killed" / f"{case_id}.nii.gz").write_bytes(b"half")
    real = batch.write_image

    def failing(array, reference, target):
        if target.name.endswith("_uncertainty.nii.gz"):
            assert (target.parent / f"{case_id}.nii.gz").exists()  # the mask is already written (staged)
            raise OSError("disk full")
        return real(array, reference, target)

    monkeypatch.setattr(batch, "write_image", failing)
    result = batch.run_batch(ct_pipeline.ood_onnx, files, out, qa=False)
    assert result.outcomes[0].status == "failed" and "disk full" in result.outcomes[0].error
    assert _case_files(out, case_id) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert batch.completed_cases(out) == {}

    monkeypatch.setattr(batch, "write_image", real)
    batch.run_batch(ct_pipeline.ood_onnx, files, out, qa=False)
    (out / f"{case_id}_uncertainty.nii.gz").unlink()  # a reader must not trust a report whose outputs are gone
    assert batch.completed_cases(out) == {}


def test_the_whole_corpus_in_one_ood_run(ct_pipeline, tmp_path):
    """Every corpus entry, file and DICOM families, in one ``ood-run`` beside one good case: exit 1, one failed
    row per entry whose error names the problem, nothing written for any of them, no input changed, the good
    case written."""
    from typer.testing import CliRunner

    from segsentry.cli import run_app

    inputs: list[Path] = []
    expected: dict[str, str] = {}
    for i, bad in enumerate(CORPUS):
        folder = tmp_path / "in" / f"m{i:03d}"
        folder.mkdir(parents=True)
        inputs += bad.make(folder)
        expected[folder.name] = bad.fragment
    for i, bad in enumerate(SERIES_CORPUS):
        if bad.read_kw:  # the modality entries need another model's channels: covered above
            continue
        folder = tmp_path / "in" / f"s{i:03d}"
        bad.make(folder)
        inputs.append(folder)
        expected[folder.name] = bad.fragment
    good = _write(tmp_path / "in" / "good_0000.nii.gz", (np.random.default_rng(1).normal(-300, 200, (12, 80, 70))
                                                        ).astype(np.int16), compress=True, spacing=(0.8, 0.75, 4.0))
    before = _tree_digest(tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(run_app, [str(ct_pipeline.ood_onnx), *map(str, inputs), str(good), "-o", str(out),
                                          "--no-qa"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert (out / "summary.csv").exists(), result.output
    rows = _summary(out)
    assert rows.pop("good")["status"] == "ok"
    assert set(rows) == set(expected)
    for case_id, fragment in expected.items():
        assert rows[case_id]["status"] == "failed"
        assert fragment in rows[case_id]["error"], (case_id, rows[case_id]["error"])
    assert sorted(p.name for p in out.iterdir()) == ["good.json", "good.nii.gz", "good_uncertainty.nii.gz",
                                                     "summary.csv"]
    assert _tree_digest(tmp_path / "in") == before


def _tree_digest(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else f"-> {p.readlink()}"
            for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_dangling_links_in_a_folder_are_failed_rows(ct_pipeline, test_cases, tmp_path):
    """A dangling link and a link loop inside an input folder are cases that fail (rows), not skipped files."""
    from segsentry.runtime.batch import run_batch

    good = next(iter(test_cases["ct"].values()))[0]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / good.name).symlink_to(good)
    (folder / "dangling_0000.nii.gz").symlink_to(tmp_path / "moved_away.nii.gz")
    (folder / "loop_0000.nii.gz").symlink_to(folder / "loop_0000.nii.gz")
    run_batch(ct_pipeline.ood_onnx, [folder], tmp_path / "o", qa=False)
    rows = _summary(tmp_path / "o")
    assert rows[good.name.removesuffix("_0000.nii.gz")]["status"] == "ok"
    assert "no such file" in rows["dangling"]["error"] and "no such file" in rows["loop"]["error"]


def test_a_volume_with_nothing_left_after_resampling_is_a_clear_error(ct_pipeline, tmp_path):
    from segsentry.runtime.batch import run_batch

    thin = _write(tmp_path / "thin_0000.nii.gz", np.full((2, 80, 70), 40, np.int16), compress=True,
                  spacing=(0.8, 0.75, 0.5))  # 1 mm of content at the model's 2.5 mm: round(0.4) = 0 slices
    (outcome,) = run_batch(ct_pipeline.ood_onnx, [thin], tmp_path / "o", qa=False).outcomes
    assert outcome.status == "failed" and "thinner than one voxel at the model's spacing" in outcome.error
