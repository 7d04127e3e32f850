"""Input checks that SimpleITK does not make: the file's own header against its payload, end to end.

ITK 5.4 zero-fills a truncated ``.nii.gz`` (and an uncompressed payload shorter than its header says) and
turns NaN/inf NIfTI voxels into 0 before anyone can see them. So before a file is handed to SimpleITK, the
header is parsed here (just enough: dimensions, pixel type, where the payload starts and how it is encoded),
the whole payload is streamed once (a compressed stream through its own decoder, which checks gzip's CRC and
length, zlib's and bzip2's end-of-stream) and counted against the header, and float payloads are checked
for non-finite values in the raw bytes. After reading, :func:`check_image` refuses pixel types, spacings and
directions the pipeline cannot treat honestly.

Formats: NIfTI-1/2 (``.nii``, ``.nii.gz``), Analyze 7.5 / NIfTI pairs (``.hdr`` + ``.img``/``.img.gz``),
MetaImage (``.mha``, ``.mhd`` + data file), NRRD (``.nrrd``, attached or one detached data file). Other
endings are left to SimpleITK. Only numpy and the standard library are used.

Every problem is an :class:`~segsentry.errors.InputError` naming the file, the problem and what to do.
"""

from __future__ import annotations

import bz2
import gzip
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry.errors import InputError

SPACING_RANGE_MM = (1e-3, 100.0)  # a voxel side outside this is a broken header, not a scan
ORTHONORMAL_TOLERANCE = 1e-3  # max |D^T D - I| for the direction cosines
_CHUNK = 1 << 24  # bytes per read while streaming a payload

# NIfTI-1/2 and Analyze datatype codes -> numpy type (None: refused, with the reason)
_NIFTI_TYPES: dict[int, tuple[str | None, str]] = {
    1: (None, "a boolean (1-bit binary) pixel type"),
    2: ("u1", ""), 4: ("i2", ""), 8: ("i4", ""), 16: ("f4", ""), 64: ("f8", ""), 256: ("i1", ""),
    512: ("u2", ""), 768: ("u4", ""), 1024: ("i8", ""), 1280: ("u8", ""),
    32: (None, "a complex pixel type (complex64)"), 1792: (None, "a complex pixel type (complex128)"),
    2048: (None, "a complex pixel type (complex256)"), 1536: (None, "a 128-bit float pixel type"),
    128: (None, "an RGB pixel type"), 2304: (None, "an RGBA pixel type"),
}

_MET_TYPES = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4", "MET_UINT": "u4",
    "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}

_NRRD_TYPES = {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",),
    "f8": ("double",),
}
_NRRD_TYPE = {alias: code for code, aliases in _NRRD_TYPES.items() for alias in aliases}


@dataclass(frozen=True)
class Payload:
    """Where a file's voxels are and how they are stored.

    ``source``: the file holding them; ``offset``: bytes to skip before them, counted in the *decoded* stream
    for ``gzip``/``bz2`` inside a whole-file stream (``stream_offset`` is where that stream starts in the
    file); ``count``: number of scalar elements; ``dtype``: numpy dtype with byte order; ``encoding``: raw,
    gzip, zlib, bz2 or ascii; ``from_end``: the payload is the last bytes of the file (offset unknown).
    """

    source: Path
    count: int
    dtype: np.dtype
    encoding: str = "raw"
    offset: int = 0
    stream_offset: int = 0
    from_end: bool = False

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def _fail(path: Path, problem: str, todo: str, *, verb: str = "cannot read") -> InputError:
    return InputError(f"{verb} {path}: {problem}; {todo}")


_RE_EXPORT = "re-export or re-transfer the image from its source"


def check_file(path: Path) -> None:
    """Check ``path``'s header against its payload before SimpleITK reads it (see the module docstring).

    Raises :class:`InputError` for a truncated or corrupt file, a refused pixel type or non-finite voxels.
    Files in formats not parsed here pass unchanged.
    """
    if not path.is_file():
        raise _fail(path, "no such file (a dangling or looping symbolic link?)", "fix the link or pass the file "
                    "itself")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".hdr")):
        payload = _nifti_payload(path)
    elif name.endswith((".mha", ".mhd")):
        payload = _meta_payload(path)
    elif name.endswith(".nrrd"):
        payload = _nrrd_payload(path)
    else:
        return
    _scan_payload(path, payload)


# --- NIfTI / Analyze -------------------------------------------------------------------------------------

def _open_maybe_gzip(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _nifti_payload(path: Path) -> Payload:
    try:
        with _open_maybe_gzip(path) as f:
            head = f.read(544)
    except (OSError, EOFError, zlib.error) as exc:
        raise _fail(path, f"the compressed stream is corrupt ({exc})", _RE_EXPORT) from exc
    if len(head) < 348:
        raise _fail(path, f"the file holds {len(head)} header bytes, a NIfTI/Analyze header has 348", _RE_EXPORT)
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size in (348, 540):
            break
    else:
        raise _fail(path, "not a NIfTI/Analyze header (sizeof_hdr is neither 348 nor 540 in either byte order)",
                    _RE_EXPORT)
    if size == 348:
        dims = struct.unpack(order + "8h", head[40:56])
        datatype = struct.unpack(order + "h", head[70:72])[0]
        pixdim = struct.unpack(order + "8f", head[76:108])
        vox_offset = struct.unpack(order + "f", head[108:112])[0]
        magic = head[344:348]
        minimum = 352
    else:
        if len(head) < 540:
            raise _fail(path, f"the file holds {len(head)} header bytes, a NIfTI-2 header has 540", _RE_EXPORT)
        magic = head[4:8]
        datatype = struct.unpack(order + "h", head[12:14])[0]
        dims = struct.unpack(order + "8q", head[16:80])
        pixdim = struct.unpack(order + "8d", head[104:168])
        vox_offset = struct.unpack(order + "q", head[168:176])[0]
        minimum = 544
    dtype = _nifti_dtype(path, datatype, order)
    count = _count(path, dims[0], dims[1:], "dim")
    if dims[0] >= 4 and any(d > 1 for d in dims[4:dims[0] + 1]):
        raise _fail(path, f"a {dims[0]}D image of size {list(dims[1:dims[0] + 1])} (a time series or several "
                    "volumes)", "the model needs one 3D volume: split it and pass one volume per case", verb="cannot use")
    steps = [float(v) for v in pixdim[1:1 + min(dims[0], 3)]]
    if not all(math.isfinite(v) and v != 0.0 for v in steps):
        raise _fail(path, f"the header's voxel size (pixdim) is {steps}: zero or not finite (SimpleITK would "
                    "silently read 1 mm)", "fix the header's pixdim before inference")
    single_file = magic.rstrip(b"\0") in (b"n+1", b"n+2")
    if single_file:
        if not (math.isfinite(vox_offset) and vox_offset >= minimum):
            raise _fail(path, f"vox_offset {vox_offset} lies inside the header (at least {minimum} expected)",
                        _RE_EXPORT)
        return Payload(path, count, dtype, encoding="gzip" if path.name.lower().endswith(".gz") else "raw",
                       offset=int(vox_offset))
    if path.name.lower().endswith((".nii", ".nii.gz")):
        raise _fail(path, f"the header's magic {magic!r} is not a single-file NIfTI ('n+1')", _RE_EXPORT)
    data = _analyze_data_file(path)
    offset = int(vox_offset) if math.isfinite(vox_offset) and vox_offset > 0 else 0
    return Payload(data, count, dtype, encoding="gzip" if data.name.lower().endswith(".gz") else "raw", offset=offset)


def _nifti_dtype(path: Path, datatype: int, order: str) -> np.dtype:
    code, reason = _NIFTI_TYPES.get(datatype, (None, f"an unknown datatype code {datatype}"))
    if code is None:
        raise _fail(path, f"the header declares {reason}", "the model needs a scalar integer or float image; "
                    "convert it (e.g. to int16 or float32) before inference", verb="cannot use")
    return np.dtype(order + code)


def _analyze_data_file(header: Path) -> Path:
    stem = header.name[: -len(".hdr")]
    for suffix in (".img", ".IMG", ".img.gz", ".IMG.GZ"):
        candidate = header.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    raise _fail(header, f"its data file {stem}.img is missing", "copy the .img beside the .hdr (they travel "
                "together)")


def _count(path: Path, ndim: int, sizes, field: str) -> int:
    if not 1 <= ndim <= 7:
        raise _fail(path, f"the header declares {ndim} dimensions ({field}[0]); 1 to 7 expected", _RE_EXPORT)
    sizes = [int(s) for s in sizes[:ndim]]
    if any(s < 1 for s in sizes):
        raise _fail(path, f"the header declares the size {sizes}, with an empty axis", _RE_EXPORT)
    return int(np.prod(sizes, dtype=np.int64))


# --- MetaImage --------------------------------------------------------------------------------------------

def _meta_payload(path: Path) -> Payload:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        header_end = 0
        for _ in range(200):
            line = f.readline(4096)
            if not line:
                break
            header_end += len(line)
            key, sep, value = line.decode("latin-1").partition("=")
            if not sep:
                raise _fail(path, f"header line {line[:60]!r} is not 'Key = Value'", _RE_EXPORT)
            fields[key.strip().lower()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    if "elementdatafile" not in fields:
        raise _fail(path, "the MetaImage header has no ElementDataFile line (truncated header?)", _RE_EXPORT)
    try:
        ndim = int(fields.get("ndims", "0"))
        sizes = [int(s) for s in fields.get("dimsize", "").split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
    except ValueError as exc:
        raise _fail(path, f"unreadable MetaImage header field ({exc})", _RE_EXPORT) from exc
    if len(sizes) != ndim:
        raise _fail(path, f"NDims {ndim} but DimSize {sizes}", _RE_EXPORT)
    element = fields.get("elementtype", "").upper()
    if element not in _MET_TYPES:
        raise _fail(path, f"unsupported ElementType {element or '(none)'}", "convert the image to a scalar "
                    "integer or float type", verb="cannot use")
    msb = fields.get("binarydatabyteordermsb", fields.get("bytordermsb", "False")).lower() == "true"
    dtype = np.dtype((">" if msb else "<") + _MET_TYPES[element])
    count = _count(path, ndim, sizes, "DimSize") * max(channels, 1)
    binary = fields.get("binarydata", "True").lower() == "true"
    compressed = fields.get("compresseddata", "False").lower() == "true"
    encoding = "zlib" if compressed else ("raw" if binary else "ascii")
    data_file = fields["elementdatafile"]
    if data_file.upper() == "LOCAL":
        return Payload(path, count, dtype, encoding=encoding, stream_offset=header_end)
    if data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) > 1:
        raise _fail(path, f"multi-file MetaImage data ('{data_file}') is not supported",
                    "convert the image to a single .mha or .nii.gz")
    source = path.parent / data_file
    if not source.is_file():
        raise _fail(path, f"its data file {data_file} is missing", "copy the data file beside the .mhd (they "
                    "travel together)")
    return Payload(source, count, dtype, encoding=encoding, stream_offset=max(header_size, 0),
                   from_end=header_size == -1)


# --- NRRD -------------------------------------------------------------------------------------------------

def _nrrd_payload(path: Path) -> Payload:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        magic = f.readline(64)
        if not magic.startswith(b"NRRD000"):
            raise _fail(path, "not a NRRD file (no NRRD000x magic line)", _RE_EXPORT)
        header_end = len(magic)
        for _ in range(500):
            line = f.readline(65536)
            header_end += len(line)
            if not line or not line.strip():
                break
            text = line.decode("latin-1").rstrip("\r\n")
            if text.startswith("#") or ":=" in text:
                continue  # comments and key/value pairs
            key, sep, value = text.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
    try:
        ndim = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
        kind = fields["type"].lower()
        encoding = fields.get("encoding", "raw").lower()
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
    except (KeyError, ValueError) as exc:
        raise _fail(path, f"the NRRD header lacks or garbles a required field ({exc})", _RE_EXPORT) from exc
    if len(sizes) != ndim:
        raise _fail(path, f"dimension {ndim} but sizes {sizes}", _RE_EXPORT)
    if kind not in _NRRD_TYPE:
        raise _fail(path, f"unsupported NRRD type '{kind}'", "convert the image to a scalar integer or float type", verb="cannot use")
    big = fields.get("endian", "little").lower() == "big"
    dtype = np.dtype((">" if big else "<") + _NRRD_TYPE[kind])
    encoding = {"gz": "gzip", "txt": "ascii", "text": "ascii", "bzip2": "bz2"}.get(encoding, encoding)
    if encoding not in ("raw", "gzip", "bz2", "ascii"):
        raise _fail(path, f"NRRD encoding '{encoding}' is not supported", "re-save it raw or gzip-compressed")
    count = _count(path, ndim, sizes, "sizes")
    data_file = fields.get("data file", fields.get("datafile"))
    source, start = path, header_end
    if data_file is not None:
        if data_file.upper().startswith("LIST") or len(data_file.split()) > 1:
            raise _fail(path, f"multi-file NRRD data ('{data_file}') is not supported", "convert it to one .nrrd")
        source, start = path.parent / data_file, 0
        if not source.is_file():
            raise _fail(path, f"its data file {data_file} is missing", "copy the data file beside the header")
    if line_skip:
        with open(source, "rb") as f:
            f.seek(start)
            for _ in range(line_skip):
                start += len(f.readline())
    if encoding in ("gzip", "bz2"):
        return Payload(source, count, dtype, encoding=encoding, stream_offset=start, offset=max(byte_skip, 0))
    return Payload(source, count, dtype, encoding=encoding, stream_offset=start + max(byte_skip, 0),
                   from_end=byte_skip == -1)


# --- streaming the payload --------------------------------------------------------------------------------

def _decoded_chunks(payload: Payload) -> Iterator[bytes]:
    """The payload's decoded bytes from the start of the data (``offset`` already skipped) to the stream's end."""
    stream: Callable | None = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
                               "bz2": lambda f: bz2.BZ2File(f, "rb")}.get(payload.encoding)
    with open(payload.source, "rb") as raw:
        if payload.from_end:
            size = raw.seek(0, 2)
            raw.seek(max(size - payload.nbytes, 0))
        else:
            raw.seek(payload.stream_offset)
        if payload.encoding == "zlib":
            decoder = zlib.decompressobj(wbits=47)  # zlib or gzip header, detected
            while block := raw.read(_CHUNK):
                yield decoder.decompress(block)
                if decoder.eof:
                    break
            yield decoder.flush()
            if not decoder.eof:
                raise EOFError("the zlib stream ended before its end-of-stream marker")
            return
        source = stream(raw) if stream else raw
        skip = payload.offset
        while skip > 0:
            got = source.read(min(skip, _CHUNK))
            if not got:
                return
            skip -= len(got)
        while block := source.read(_CHUNK):
            yield block


def _scan_payload(path: Path, payload: Payload) -> None:
    """Stream the payload once: enough bytes for the header's size, decoders intact, float values finite."""
    is_float = payload.dtype.kind == "f"
    needed = payload.nbytes
    seen = 0
    bad = 0
    carry = b""
    try:
        if payload.encoding == "ascii":
            text = b"".join(_decoded_chunks(payload)).split()
            seen = len(text) * payload.dtype.itemsize
            if is_float and len(text) >= payload.count:
                try:
                    values = np.array(text[: payload.count], dtype=np.float64)
                except ValueError as exc:
                    raise _fail(path, f"the ASCII payload holds a non-number ({exc})", _RE_EXPORT) from exc
                bad = int((~np.isfinite(values)).sum())
        else:
            itemsize = payload.dtype.itemsize
            for block in _decoded_chunks(payload):
                if seen >= needed:
                    seen += len(block)
                    continue
                use = block[: needed - seen]
                seen += len(block)
                if is_float:
                    data = carry + use
                    whole = len(data) - len(data) % itemsize
                    values = np.frombuffer(data[:whole], dtype=payload.dtype)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                    carry = data[whole:]
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise _fail(path, f"the {payload.encoding} stream of {payload.source.name} is corrupt or truncated "
                    f"({detail})", f"the transfer was probably interrupted: {_RE_EXPORT}") from exc
    if seen < needed:
        where = "" if payload.source == path else f" in {payload.source.name}"
        raise _fail(path, f"the payload{where} holds {seen} bytes but the header declares {payload.count} "
                    f"{payload.dtype.name} values ({needed} bytes): the file is truncated",
                    f"the transfer was probably interrupted: {_RE_EXPORT}")
    if bad:
        raise _fail(path, f"{bad} voxel(s) are NaN or infinite in the stored data",
                    "fix the image (replace the non-finite values) before inference", verb="cannot use")


# --- after reading ----------------------------------------------------------------------------------------

_REFUSED_PIXELS = {
    sitk.sitkComplexFloat32: "a complex pixel type", sitk.sitkComplexFloat64: "a complex pixel type",
}


def check_image(path: Path | str, image: sitk.Image) -> None:
    """Refuse what SimpleITK read but the pipeline cannot treat honestly: complex pixels, a spacing outside
    :data:`SPACING_RANGE_MM`, a non-finite origin, degenerate (non-orthonormal or singular) directions."""
    if image.GetPixelID() in _REFUSED_PIXELS:
        raise InputError(f"cannot use {path}: {_REFUSED_PIXELS[image.GetPixelID()]} ({image.GetPixelIDTypeAsString()}); the "
                         "model needs a scalar integer or float image: convert it (e.g. its magnitude) first")
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    lo, hi = SPACING_RANGE_MM
    if not (np.isfinite(spacing).all() and (np.abs(spacing) >= lo).all() and (np.abs(spacing) <= hi).all()):
        raise InputError(f"cannot use {path}: voxel spacing {tuple(float(s) for s in spacing)} mm (x, y, z) is outside "
                         f"{lo:g} to {hi:g} mm; the header's spacing is broken: fix it (NIfTI pixdim, MetaImage "
                         "ElementSpacing, NRRD space directions) before inference")
    if not np.isfinite(np.asarray(image.GetOrigin(), dtype=np.float64)).all():
        raise InputError(f"cannot use {path}: the origin {image.GetOrigin()} is not finite; fix the header's origin")
    n = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(n, n)
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(f"cannot use {path}: the direction matrix {direction.round(4).tolist()} is singular; the image "
                         "orientation is undefined: fix the header (qform/sform, TransformMatrix)")
    error = float(np.abs(direction.T @ direction - np.eye(n)).max())
    if error > ORTHONORMAL_TOLERANCE:
        raise InputError(f"cannot use {path}: the direction matrix {direction.round(4).tolist()} is not orthonormal (off by "
                         f"{error:.3g}: shear or scaling in the orientation); resample the image onto an "
                         "orthogonal grid before inference")
