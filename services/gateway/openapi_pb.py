"""JSON Schemas of protobuf messages in protobuf's JSON mapping (camelCase names, enum names, int64 and bytes
as strings), for the HTTP face's OpenAPI document: the schema is generated from the .proto, never retyped."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
WELL_KNOWN = {
    "google.protobuf.Any": {"type": "object", "additionalProperties": True},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
}


def ref(descriptor: Descriptor) -> dict:
    return {"$ref": f"#/components/schemas/{descriptor.full_name}"}


def _field(f: FieldDescriptor, out: dict) -> dict:
    if f.type == FieldDescriptor.TYPE_ENUM:
        schema = {"type": "string", "enum": [v.name for v in f.enum_type.values]}
    elif f.type == FieldDescriptor.TYPE_MESSAGE:
        if f.message_type.GetOptions().map_entry:
            return {
                "type": "object",
                "additionalProperties": _field(f.message_type.fields_by_name["value"], out),
            }
        schema = WELL_KNOWN.get(f.message_type.full_name) or ref(f.message_type)
        add_schemas(f.message_type, out)
    else:
        schema = dict(SCALARS[f.type])
    return {"type": "array", "items": schema} if f.is_repeated else schema


def add_schemas(descriptor: Descriptor, out: dict) -> dict:
    """Put ``descriptor``'s schema (and every message it uses) into ``out`` by full name; returns ``out``."""
    name = descriptor.full_name
    if name in out or name in WELL_KNOWN:
        return out
    out[name] = {}  # placed first: recursive messages terminate
    props = {f.json_name: _field(f, out) for f in descriptor.fields}
    out[name] = {
        "type": "object",
        "properties": props,
        "description": f"protobuf {name} in its JSON mapping (snake_case names are accepted too)",
    }
    return out
