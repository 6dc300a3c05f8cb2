"""CloudEvents 1.0 on Kafka: binary content mode out, binary and structured mode in.

Binary mode puts each attribute in a `ce_<name>` header, `datacontenttype` in `content-type`,
and the data in the record value. The `cloudevents` SDK's Kafka binding is the reference; this
module builds the header list directly because the SDK costs ~12 µs per event against ~1 µs
here, and `tests/unit/test_codec.py` proves both produce the same headers and read each other.
Every decoding failure raises `DecodeError` (permanent: the record is dead-lettered).

The ingress topic also takes a plain JSON task object with no CloudEvents headers at all
(`decode_ingress`, docs/ingress.md): it becomes a `conveyor.task.submitted.v1` event whose id is
the record's coordinates, so a redelivery is the same event.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

from conveyor.errors import PermanentError
from conveyor.events.avro import SchemaError, SchemaSet, parse_schema_urn
from conveyor.events.catalog import INGRESS_TYPE as SUBMITTED
from conveyor.events.lazy import LazyEvent
from conveyor.events.model import AVRO, JSON, SPECVERSION, STRUCTURED, Event

Headers = list[tuple[str, bytes]]
RawHeaders = Sequence[tuple[str, bytes | str | None]] | None

_REQUIRED = ("id", "source", "type")
_SPECVERSION = ("ce_specversion", SPECVERSION.encode())
_CORE = frozenset(
    ("specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema")
)


_REQUIRED_HEADERS = tuple("ce_" + name for name in _REQUIRED)
_CORE_HEADERS = frozenset("ce_" + name for name in _CORE)


class DecodeError(PermanentError):
    """The record is not a CloudEvent Conveyor can read."""


def encode_binary(event: Event, schemas: SchemaSet) -> tuple[Headers, bytes]:
    """Headers and value of `event` in binary content mode; Avro data needs `dataschema`."""
    headers = binary_headers(
        event.id,
        event.source,
        event.type,
        event.datacontenttype,
        subject=event.subject,
        time=event.time,
        dataschema=event.dataschema,
        extensions=event.extensions,
    )
    return headers, _encode_data(event, schemas)


def binary_headers(
    event_id: str,
    source: str,
    event_type: str,
    content_type: str,
    *,
    subject: str | None,
    time: str | None,
    dataschema: str | None,
    extensions: Mapping[str, str],
) -> Headers:
    """The binary-mode headers of an event with these attributes (`encode_binary`'s, and the
    runtime's, which encodes the data itself and need not build an `Event` per output)."""
    headers: Headers = [
        _SPECVERSION,
        ("ce_id", event_id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", event_type.encode()),
        ("content-type", content_type.encode()),
    ]
    if subject is not None:
        headers.append(("ce_subject", subject.encode()))
    if time is not None:
        headers.append(("ce_time", time.encode()))
    if dataschema is not None:
        headers.append(("ce_dataschema", dataschema.encode()))
    for name, value in extensions.items():
        headers.append(("ce_" + name, value.encode()))
    return headers


def _encode_data(event: Event, schemas: SchemaSet) -> bytes:
    if event.datacontenttype == AVRO:
        name, version = parse_schema_urn(event.dataschema)
        return schemas.encode(name, version, event.data)
    if event.datacontenttype == JSON:
        return json.dumps(event.data, separators=(",", ":")).encode()
    if isinstance(event.data, bytes):
        return event.data
    raise SchemaError(f"cannot encode data of content type {event.datacontenttype!r}")


def header_map(headers: RawHeaders) -> dict[str, str]:
    """Kafka headers as str -> str (the last value wins; undecodable values are rejected)."""
    try:
        # The common case, every value UTF-8 bytes: one comprehension, no per-header branch.
        return {key: value.decode() for key, value in headers or ()}  # type: ignore[union-attr]
    except (AttributeError, UnicodeDecodeError):
        pass  # a str or None value (or a bad one): the careful way
    out: dict[str, str] = {}
    for key, value in headers or ():
        if value is None:
            continue
        try:
            out[key] = value if isinstance(value, str) else value.decode()
        except UnicodeDecodeError:
            raise DecodeError(f"header {key!r} is not UTF-8") from None
    return out


def decode(headers: RawHeaders, value: bytes | None, schemas: SchemaSet) -> Event:
    """Read a record in either content mode; raise `DecodeError` or `SchemaError` if unreadable."""
    return decode_mapped(header_map(headers), value, schemas)


def decode_mapped(hmap: dict[str, str], value: bytes | None, schemas: SchemaSet) -> Event:
    """`decode` for a caller that already made the header map (the runtime needs it first)."""
    content_type = hmap.get("content-type", "")
    if content_type.startswith(STRUCTURED):
        return _decode_structured(value, schemas)
    if "ce_specversion" not in hmap:
        raise DecodeError("record is not a CloudEvent: no ce_specversion header")
    attrs = {key[3:]: val for key, val in hmap.items() if key.startswith("ce_")}
    attrs["datacontenttype"] = content_type or JSON
    return _event(attrs, _decode_data(attrs, value or b"", schemas))


def decode_lazy(hmap: dict[str, str], value: bytes | None, schemas: SchemaSet) -> Event:
    """`decode_mapped`, but binary-mode Avro data is decoded when it is first read
    (`LazyEvent`). Everything else is checked now: attributes, and that the schema urn names a
    schema this set knows; only bad data bytes surface later, where the data is read."""
    if hmap.get("content-type") != AVRO or hmap.get("ce_specversion") != SPECVERSION:
        return decode_mapped(hmap, value, schemas)  # and its error, if it is one
    get = hmap.get
    dataschema = get("ce_dataschema")
    schemas.check_urn(dataschema or "")  # SchemaError: unknown schema or bad urn
    # One pass over the headers (not `decode_mapped`'s two): the core attributes by name.
    for name in _REQUIRED_HEADERS:
        if not get(name):
            raise DecodeError(f"CloudEvent attribute {name[3:]!r} is missing")
    return LazyEvent.pending(
        value or b"",
        schemas,
        id=hmap["ce_id"],
        type=hmap["ce_type"],
        source=hmap["ce_source"],
        subject=get("ce_subject"),
        time=get("ce_time"),
        datacontenttype=AVRO,
        dataschema=dataschema,
        extensions={
            k[3:]: v for k, v in hmap.items() if k.startswith("ce_") and k not in _CORE_HEADERS
        },
    )


PLAIN_JSON_SOURCE = "/conveyor/ingress/plain-json"


def decode_ingress(
    hmap: dict[str, str], value: bytes | None, schemas: SchemaSet, *, at: str
) -> Event:
    """`decode_mapped` for the ingress topic, which also accepts a plain JSON task object: a
    record without any `ce_*` header and with no content type, or a JSON one. `at` names the
    record (`<topic>:<partition>:<offset>`) and becomes the event id."""
    content_type = hmap.get("content-type", "")
    plain = not content_type or content_type.startswith(JSON)
    if not plain or any(key.startswith("ce_") for key in hmap):
        return decode_mapped(hmap, value, schemas)
    try:
        doc = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(f"record is neither a CloudEvent nor a JSON object: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeError("record is neither a CloudEvent nor a JSON object")
    return Event(
        id=at,
        type=SUBMITTED,
        source=PLAIN_JSON_SOURCE,
        subject=None,
        data=doc,
        datacontenttype=JSON,
    )


def _decode_structured(value: bytes | None, schemas: SchemaSet) -> Event:
    try:
        doc = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # too deep: poison too
        raise DecodeError(f"structured CloudEvent is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeError("structured CloudEvent is not a JSON object")
    attrs = {k: v for k, v in doc.items() if k not in ("data", "data_base64")}
    for key, val in attrs.items():
        if not isinstance(val, str):
            # CloudEvents JSON allows integer/boolean extensions; Conveyor carries strings.
            attrs[key] = json.dumps(val) if not isinstance(val, (int, float, bool)) else str(val)
    attrs.setdefault("datacontenttype", JSON)
    if "data_base64" in doc:
        try:
            payload = base64.b64decode(doc["data_base64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise DecodeError("data_base64 is not base64") from None
        return _event(attrs, _decode_data(attrs, payload, schemas))
    data = doc.get("data")
    if attrs["datacontenttype"] == AVRO:
        raise DecodeError("Avro data in structured mode must use data_base64")
    return _event(attrs, data)


def _decode_data(attrs: dict[str, str], payload: bytes, schemas: SchemaSet) -> Any:
    content_type = attrs["datacontenttype"]
    if content_type == AVRO:
        return schemas.decode_urn(attrs.get("dataschema", ""), payload)[1]
    if content_type.startswith(JSON) or content_type.endswith("+json"):
        try:
            return json.loads(payload) if payload else None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DecodeError(f"data is not JSON: {exc}") from None
    raise DecodeError(f"unsupported datacontenttype {content_type!r}")


def _event(attrs: dict[str, str], data: Any) -> Event:
    if attrs.get("specversion") != SPECVERSION:
        raise DecodeError(f"unsupported specversion {attrs.get('specversion')!r}")
    for name in _REQUIRED:
        if not attrs.get(name):
            raise DecodeError(f"CloudEvent attribute {name!r} is missing")
    return Event(
        id=attrs["id"],
        type=attrs["type"],
        source=attrs["source"],
        subject=attrs.get("subject"),
        time=attrs.get("time"),
        datacontenttype=attrs["datacontenttype"],
        dataschema=attrs.get("dataschema"),
        data=data,
        extensions={k: v for k, v in attrs.items() if k not in _CORE},
    )
