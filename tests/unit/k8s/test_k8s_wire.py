"""pcipass.k8s.wire over pcipass.k8s.api's tables: every message round-trips, and the bytes are
the ones Google's protobuf makes from a descriptor built out of the same tables (so the tables'
field numbers and types, not only the codec, are what a kubelet's generated code reads)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcipass.k8s import api, wire

SCHEMAS = {"pluginregistration": api.REGISTRATION, "k8s.io.kubelet.pkg.apis.dra.v1": api.DRA_V1,
           "k8s.io.kubelet.pkg.apis.dra.v1beta1": api.DRA_V1BETA1, "v1beta1": api.DEVICE_PLUGIN}


def test_a_known_message_to_the_byte():
    info = {"type": "DRAPlugin", "name": "pcipass.io", "endpoint": "/x",
            "supported_versions": ["v1.DRAPlugin"]}
    data = wire.encode(api.REGISTRATION, "PluginInfo", info)
    assert data == (b"\x0a\x09DRAPlugin" b"\x12\x0apcipass.io" b"\x1a\x02/x" b"\x22\x0cv1.DRAPlugin")
    assert wire.decode(api.REGISTRATION, "PluginInfo", data) == info
    # A NUMA node of -1 would be ten bytes of varint, as protobuf sends negatives.
    assert wire.encode(api.DEVICE_PLUGIN, "NUMANode", {"ID": -1}) == b"\x08" + b"\xff" * 9 + b"\x01"
    assert wire.decode(api.DEVICE_PLUGIN, "NUMANode", b"\x08" + b"\xff" * 9 + b"\x01") == {"ID": -1}


def test_defaults_unknown_fields_and_bad_bytes():
    assert wire.decode(api.DRA_V1, "Device", b"") == {
        "request_names": [], "pool_name": "", "device_name": "", "cdi_device_ids": [], "share_id": None}
    # field 9 (unknown to the table: a newer kubelet's) is skipped, whatever its wire type
    data = b"\x4a\x03abc" + b"\x48\x05" + b"\x1a\x01d"
    assert wire.decode(api.DRA_V1BETA1, "Device", data)["device_name"] == "d"
    for bad in (b"\x1a\x05ab", b"\x08", b"\x1b", b"\x1a\x01\xff"):
        with pytest.raises(wire.WireError):
            wire.decode(api.DRA_V1BETA1, "Device", bad)
    with pytest.raises(wire.WireError):
        wire.encode(api.DRA_V1BETA1, "Device", {"nope": 1})
    with pytest.raises(wire.WireError):
        wire.encode(api.DEVICE_PLUGIN, "ContainerPreferredAllocationRequest", {"allocation_size": 1 << 31})


def _descriptor_pool():
    """A protobuf descriptor pool made from pcipass's own tables (nothing upstream is read)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    types = {wire.STRING: 9, wire.BOOL: 8, wire.INT32: 5, wire.INT64: 3, wire.MESSAGE: 11}
    pool = descriptor_pool.DescriptorPool()
    for package, schema in SCHEMAS.items():
        fd = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto3")
        for name, fields in schema.items():
            m = fd.message_type.add(name=name)
            for f in fields:
                label = 3 if f.repeated or f.kind == wire.MAP else 1
                if f.kind == wire.MAP:
                    entry = m.nested_type.add(name=f.name.title().replace("_", "") + "Entry")
                    entry.options.map_entry = True
                    entry.field.add(name="key", number=1, type=9, label=1)
                    v = entry.field.add(name="value", number=2, label=1, type=11 if f.message else 9)
                    if f.message:
                        v.type_name = f".{package}.{f.message}"
                    m.field.add(name=f.name, number=f.number, label=label, type=11,
                                type_name=f".{package}.{name}.{entry.name}")
                    continue
                fld = m.field.add(name=f.name, number=f.number, label=label, type=types[f.kind])
                if f.kind == wire.MESSAGE:
                    fld.type_name = f".{package}.{f.message}"
                if f.optional:
                    fld.proto3_optional = True
                    fld.oneof_index = len(m.oneof_decl)
                    m.oneof_decl.add(name=f"_{f.name}")
        pool.Add(fd)
    return pool


POOL = None


def _google(package: str, name: str):
    global POOL
    from google.protobuf import message_factory

    POOL = POOL or _descriptor_pool()
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{package}.{name}"))


def _value(schema, name, depth=0):
    """A hypothesis strategy for message `name` as a dict."""
    parts = {}
    for f in schema[name]:
        if f.kind == wire.MAP:
            v = _value(schema, f.message, depth + 1) if f.message else st.text(max_size=8)
            parts[f.name] = st.dictionaries(st.text(max_size=8), v, max_size=2)
            continue
        if f.kind == wire.MESSAGE:
            one = _value(schema, f.message, depth + 1)
        else:
            one = {wire.STRING: st.text(max_size=12), wire.BOOL: st.booleans(),
                   wire.INT32: st.integers(-(1 << 31), (1 << 31) - 1),
                   wire.INT64: st.integers(-(1 << 63), (1 << 63) - 1)}[f.kind]
        parts[f.name] = st.lists(one, max_size=3) if f.repeated else one
    return st.fixed_dictionaries({}, optional=parts)


def _big_map(schema, name, msg) -> bool:
    """Whether `msg` has a map of two entries or more anywhere."""
    for f in schema[name]:
        v = msg.get(f.name)
        if v is None:
            continue
        if f.kind == wire.MAP:
            if len(v) > 1 or (f.message and any(_big_map(schema, f.message, x) for x in v.values())):
                return True
        elif f.kind == wire.MESSAGE:
            if any(_big_map(schema, f.message, x) for x in (v if f.repeated else [v])):
                return True
    return False


CASES = [(p, n) for p, s in SCHEMAS.items() for n in s]


@pytest.mark.parametrize("package, name", CASES, ids=[f"{p}.{n}" for p, n in CASES])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_every_message_matches_googles_encoding(package, name, data):
    schema = SCHEMAS[package]
    msg = data.draw(_value(schema, name))
    ours = wire.encode(schema, name, msg)
    cls = _google(package, name)
    theirs = cls()
    theirs.ParseFromString(ours)  # Google's parser reads our bytes...
    again = theirs.SerializeToString(deterministic=True)
    assert wire.decode(schema, name, again) == wire.decode(schema, name, ours)  # ...to the same message
    if not _big_map(schema, name, msg):  # and, but for the order of map entries (not fixed by protobuf), byte for byte
        assert again == ours
    from google.protobuf import json_format

    back = json_format.MessageToDict(theirs, preserving_proto_field_name=True)
    assert set(back) <= {f.name for f in schema[name]}
