"""Avro data for internal events: schemaless fastavro encoding against `schemas/*.avsc`.

Schemaless bytes carry no schema id, so the writer schema travels as the CloudEvent
`dataschema` (`urn:conveyor:schema:<name>:<version>`). A reader always resolves the writer's
version against the newest version it knows, which is how schema evolution works: data written
with version N is read by version N+1 (new fields need defaults).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.types import Schema

from conveyor.errors import PermanentError
from conveyor.events.avrohead import HeadError, HeadReader
from conveyor.paths import schemas_dir

_FILE = re.compile(r"^(?P<name>[a-z0-9-]+)\.v(?P<version>\d+)\.avsc$")
_URN_PREFIX = "urn:conveyor:schema:"
_URN = re.compile(re.escape(_URN_PREFIX) + r"(?P<name>[a-z0-9-]+):(?P<version>[0-9]+)")


class SchemaError(PermanentError):
    """Data that does not match its schema, or a schema Conveyor does not know."""


def schema_urn(name: str, version: int) -> str:
    """The `dataschema` naming version `version` of schema `name`."""
    return f"{_URN_PREFIX}{name}:{version}"


# A stage reads and writes a handful of urns: each is parsed once (a bad one, every time).
@lru_cache(maxsize=256)
def parse_schema_urn(urn: str | None) -> tuple[str, int]:
    """(name, version) of a Conveyor schema urn; `SchemaError` for anything else."""
    match = _URN.fullmatch(urn or "")
    if match is None:
        raise SchemaError(f"dataschema {urn!r} is not a Conveyor schema urn")
    return match["name"], int(match["version"])


@dataclass(slots=True)
class SchemaSet:
    """Every parsed schema version in a directory, with named types shared between them."""

    schemas: dict[tuple[str, int], Schema] = field(default_factory=dict)
    latest: dict[str, int] = field(default_factory=dict)
    # urn -> (name, version, writer schema, reader schema or None): resolved once per urn.
    _plans: dict[str, tuple[str, int, Schema, Schema | None]] = field(default_factory=dict)
    # urn -> the reader of its data's leading fields (None: the schema has no cheap head)
    _heads: dict[str, HeadReader | None] = field(default_factory=dict)

    def get(self, name: str, version: int) -> Schema:
        try:
            return self.schemas[(name, version)]
        except KeyError:
            raise SchemaError(f"unknown schema {name} version {version}") from None

    def newest(self, name: str) -> tuple[int, Schema]:
        version = self.latest.get(name)
        if version is None:
            raise SchemaError(f"unknown schema {name}")
        return version, self.schemas[(name, version)]

    def encode(self, name: str, version: int, data: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        try:
            fastavro.schemaless_writer(buf, self.get(name, version), data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SchemaError(f"data does not match schema {name}:{version}: {exc}") from exc
        return buf.getvalue()

    def check_urn(self, urn: str) -> tuple[str, int, Schema, Schema | None]:
        """Name, version, writer and reader (None: no evolution) of the schema `urn` names;
        `SchemaError` when it names none this set knows."""
        plan = self._plans.get(urn)
        if plan is None:
            plan = self._plans[urn] = self._plan(urn)
        return plan

    def decode_urn(self, urn: str, payload: bytes) -> tuple[str, dict[str, Any]]:
        """Decode data written with the schema `urn` names, read as that schema's newest version."""
        name, version, writer, reader = self.check_urn(urn)
        try:
            record = fastavro.schemaless_reader(io.BytesIO(payload), writer, reader)
        except Exception as exc:  # fastavro raises many types on corrupt bytes
            raise SchemaError(f"data is not valid {name}:{version} Avro: {exc!r}") from exc
        if not isinstance(record, dict):
            raise SchemaError(f"{name}:{version} data is not a record")
        return name, record

    def head_urn(self, urn: str, payload: bytes) -> dict[str, Any] | None:
        """The leading fields (`avrohead.WANTED`) of data written with the schema `urn` names,
        without decoding the rest; None when that schema has no cheap head or the bytes do not
        hold one (the full decode then says what is wrong)."""
        try:
            reader = self._heads[urn]
        except KeyError:
            _, _, writer, newer = self.check_urn(urn)
            # Data read as a newer version (evolution) is decoded in full: a head reads the
            # writer's fields, which a newer reader could have changed.
            reader = None
            if newer is None and isinstance(writer, dict):
                reader = HeadReader.of(writer)
            self._heads[urn] = reader
        if reader is None:
            return None
        try:
            return reader.read(payload)
        except HeadError:
            return None

    def _plan(self, urn: str) -> tuple[str, int, Schema, Schema | None]:
        """Writer and reader schema for `urn`; reader None when no evolution is needed."""
        name, version = parse_schema_urn(urn)
        writer = self.get(name, version)
        newest, reader = self.newest(name)
        return name, version, writer, None if newest == version else reader


def load_schema_set(directory: Path) -> SchemaSet:
    """Parse every `<name>.v<version>.avsc`; named types (e.g. conveyor.Task) come first."""
    files = sorted(p for p in directory.glob("*.avsc") if _FILE.match(p.name))
    raw = {p: json.loads(p.read_text()) for p in files}
    named: dict[str, Any] = {}
    out = SchemaSet()
    # Records referenced by name (conveyor.Task) must be parsed before the records using them.
    for path in sorted(files, key=lambda p: 0 if _is_shared(raw[p]) else 1):
        match = _FILE.match(path.name)
        assert match is not None
        name, version = match["name"], int(match["version"])
        out.schemas[(name, version)] = fastavro.parse_schema(raw[path], named_schemas=named)
        out.latest[name] = max(version, out.latest.get(name, 0))
    return out


def _is_shared(schema: dict[str, Any]) -> bool:
    return schema.get("name") == "Task"


@cache
def default_schemas() -> SchemaSet:
    return load_schema_set(schemas_dir())
