"""Just enough of the protobuf wire format to read an ONNX ``ModelProto`` without the onnx package.

The torch-free runtime needs two things from a bundle before handing it to a backend: the manifest in
``metadata_props`` (field 14) and the exact bytes of the graph (field 7) to check the weight hash. Backends
that do not report ONNX names themselves (OpenVINO) read the graph output names (graph field 12).
"""

from __future__ import annotations

from collections.abc import Iterator

GRAPH_FIELD = 7
METADATA_FIELD = 14
GRAPH_OUTPUT_FIELD = 12  # GraphProto.output (ValueInfoProto; its name is field 1)


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def iter_fields(data: bytes | memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """Yield ``(field_number, wire_type, value)``; LEN values are memoryviews into ``data``."""
    for number, wire, value, _ in iter_spans(data):
        yield number, wire, value


def iter_spans(data: bytes | memoryview) -> Iterator[tuple[int, int, memoryview | int, memoryview]]:
    """:func:`iter_fields` plus each field's whole encoding (key, length and value) as a memoryview into
    ``data``, so a message can be rewritten by copying the fields it keeps."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = _varint(view, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(view, pos)
        elif wire == 1:
            pos, value = pos + 8, 0
        elif wire == 2:
            length, pos = _varint(view, pos)
            if pos + length > len(view):
                raise ValueError("truncated length-delimited field")
            value, pos = view[pos:pos + length], pos + length
        elif wire == 5:
            pos, value = pos + 4, 0
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(view):
            raise ValueError("truncated fixed-width field")
        yield number, wire, value, view[start:pos]
    if pos != len(view):
        raise ValueError("trailing bytes")


def encode_varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_len_field(number: int, payload: bytes | memoryview) -> bytes:
    """One length-delimited field (wire type 2): key, length, ``payload``."""
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + bytes(payload)


def graph_bytes(model_bytes: bytes) -> memoryview:
    """The serialized ``GraphProto`` of a model (raises ValueError if there is none)."""
    for number, wire, value in iter_fields(model_bytes):
        if number == GRAPH_FIELD and wire == 2:
            return value  # type: ignore[return-value]
    raise ValueError("no graph in model")


def metadata_props(model_bytes: bytes) -> dict[str, str]:
    """``metadata_props`` as a dict (``StringStringEntryProto``: key = 1, value = 2)."""
    props: dict[str, str] = {}
    for number, wire, value in iter_fields(model_bytes):
        if number == METADATA_FIELD and wire == 2:
            entry = {n: bytes(v).decode("utf-8") for n, w, v in iter_fields(value) if w == 2}  # type: ignore[arg-type]
            props[entry.get(1, "")] = entry.get(2, "")
    return props


def graph_output_names(model_bytes: bytes) -> list[str]:
    """Names of the graph outputs (``GraphProto.output``), in graph order."""
    names: list[str] = []
    for number, wire, value in iter_fields(graph_bytes(model_bytes)):
        if number == GRAPH_OUTPUT_FIELD and wire == 2:
            name = next((bytes(v).decode("utf-8") for n, w, v in iter_fields(value) if n == 1 and w == 2), "")
            names.append(name)
    return names
