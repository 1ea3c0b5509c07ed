"""Protocol Buffers' wire format (proto3) for the few messages the kubelet speaks: pure functions
from a message's table of fields and a dict to bytes, and back. No generated code, no protobuf
package: the tables in pcipass.k8s.api are the protocol definitions, written from the published
APIs' field numbers and names, and gRPC (grpcio) carries the bytes these functions make.

A message is a dict keyed by the proto field names. Decoding fills proto3's defaults for absent
fields ("" , False, 0, [], {}), skips fields it does not know (a newer kubelet's), and accepts a
repeated number packed or not, as protobuf parsers must.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STRING, BOOL, INT32, INT64, MESSAGE, MAP = "string", "bool", "int32", "int64", "message", "map"
VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types
SCALAR_DEFAULT: dict[str, Any] = {STRING: "", BOOL: False, INT32: 0, INT64: 0}


@dataclass(frozen=True)
class Field:
    number: int
    name: str
    kind: str  # STRING, BOOL, INT32, INT64, MESSAGE or MAP (map<string, X>)
    repeated: bool = False
    message: str | None = None  # the message type of MESSAGE, the value type of MAP (None: string)
    optional: bool = False  # proto3 `optional`: absent stays absent (None), present is sent


class WireError(ValueError):
    """Bytes that are not a well-formed message of the expected type."""


Schema = Mapping[str, tuple[Field, ...]]


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int32 and int64 negatives: ten bytes, two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _len(number: int, payload: bytes) -> bytes:
    return _key(number, LEN) + _varint(len(payload)) + payload


def _scalar(kind: str, number: int, value: Any) -> bytes:
    if kind == STRING:
        if not isinstance(value, str):
            raise WireError(f"field {number}: a string, not {type(value).__name__}")
        return _len(number, value.encode())
    if kind == BOOL:
        return _key(number, VARINT) + _varint(1 if value else 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"field {number}: an integer, not {type(value).__name__}")
    bits = 32 if kind == INT32 else 64
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise WireError(f"field {number}: {value} does not fit {kind}")
    return _key(number, VARINT) + _varint(value)


def encode(schema: Schema, name: str, message: Mapping[str, Any]) -> bytes:
    """The bytes of `message` (a dict) as message type `name` of `schema`. Fields at their
    default are left out, as proto3 does; a name the type does not have is an error."""
    fields = {f.name: f for f in schema[name]}
    unknown = sorted(set(message) - set(fields))
    if unknown:
        raise WireError(f"{name} has no field {', '.join(unknown)}")
    out = bytearray()
    for f in schema[name]:
        value = message.get(f.name)
        if value is None:
            continue
        if f.kind == MAP:
            for k in sorted(value):
                entry = _scalar(STRING, 1, k)
                v = value[k]
                entry += _len(2, encode(schema, f.message, v)) if f.message else _scalar(STRING, 2, v)
                out += _len(f.number, entry)
        elif f.repeated:
            for v in value:
                out += _len(f.number, encode(schema, f.message, v)) if f.kind == MESSAGE else _scalar(f.kind, f.number, v)
        elif f.kind == MESSAGE:
            out += _len(f.number, encode(schema, f.message, value))  # type: ignore[arg-type]
        elif f.optional or value != SCALAR_DEFAULT[f.kind]:
            out += _scalar(f.kind, f.number, value)
    return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if at >= len(data):
            raise WireError("a varint runs past the end")
        b = data[at]
        at += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, at
        shift += 7
        if shift >= 70:
            raise WireError("a varint longer than ten bytes")


def _items(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) in order: an int for VARINT, I64 and I32, bytes for LEN."""
    out: list[tuple[int, int, int | bytes]] = []
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            value, at = _read_varint(data, at)
            out.append((number, wire, value))
        elif wire in (I64, I32):
            width = 8 if wire == I64 else 4
            if at + width > len(data):
                raise WireError("a fixed-width field runs past the end")
            out.append((number, wire, int.from_bytes(data[at:at + width], "little")))
            at += width
        elif wire == LEN:
            size, at = _read_varint(data, at)
            if at + size > len(data):
                raise WireError("a length-delimited field runs past the end")
            out.append((number, wire, data[at:at + size]))
            at += size
        else:
            raise WireError(f"wire type {wire} (groups are not proto3)")
    return out


def _signed(value: int, kind: str) -> int:
    value &= (1 << 64) - 1
    if kind == INT32:
        value &= 0xFFFFFFFF
        return value - (1 << 32) if value >> 31 else value
    return value - (1 << 64) if value >> 63 else value


def _decode_scalar(kind: str, wire: int, value: int | bytes, number: int) -> Any:
    if kind == STRING:
        if wire != LEN:
            raise WireError(f"field {number}: a string sent as wire type {wire}")
        assert isinstance(value, bytes)
        try:
            return value.decode()
        except UnicodeDecodeError as exc:
            raise WireError(f"field {number}: not UTF-8") from exc
    if wire != VARINT:
        raise WireError(f"field {number}: a {kind} sent as wire type {wire}")
    assert isinstance(value, int)
    return bool(value) if kind == BOOL else _signed(value, kind)


def decode(schema: Schema, name: str, data: bytes) -> dict[str, Any]:
    """The dict of message type `name` that `data` holds, proto3 defaults filled in."""
    fields = {f.number: f for f in schema[name]}
    out: dict[str, Any] = {}
    for f in schema[name]:
        if f.kind == MAP:
            out[f.name] = {}
        elif f.repeated:
            out[f.name] = []
        elif f.kind == MESSAGE or f.optional:
            out[f.name] = None
        else:
            out[f.name] = SCALAR_DEFAULT[f.kind]
    for number, wire, value in _items(bytes(data)):
        f = fields.get(number)
        if f is None:
            continue  # a field this table does not know: skipped
        if f.kind in (MESSAGE, MAP) and wire != LEN:
            raise WireError(f"{name}.{f.name}: a message sent as wire type {wire}")
        if f.kind == MAP:
            assert isinstance(value, bytes)
            k, v = "", {} if f.message else ""
            for n2, w2, val2 in _items(value):
                if n2 == 1:
                    k = _decode_scalar(STRING, w2, val2, 1)
                elif n2 == 2:
                    v = decode(schema, f.message, val2) if f.message else _decode_scalar(STRING, w2, val2, 2)  # type: ignore[arg-type]
            if f.message and v == {}:
                v = decode(schema, f.message, b"")
            out[f.name][k] = v
        elif f.kind == MESSAGE:
            assert isinstance(value, bytes)
            decoded = decode(schema, f.message, value)  # type: ignore[arg-type]
            if f.repeated:
                out[f.name].append(decoded)
            else:
                out[f.name] = decoded
        elif f.repeated and wire == LEN and f.kind != STRING:  # packed
            assert isinstance(value, bytes)
            at = 0
            while at < len(value):
                n, at = _read_varint(value, at)
                out[f.name].append(_decode_scalar(f.kind, VARINT, n, number))
        elif f.repeated:
            out[f.name].append(_decode_scalar(f.kind, wire, value, number))
        else:
            out[f.name] = _decode_scalar(f.kind, wire, value, number)
    return out
