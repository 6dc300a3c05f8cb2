"""An `Event` whose Avro data is decoded when it is first read, not when the record arrives.

Decoding a record's data is 9-17 µs of a stage hop's CPU, and a stage that routes, filters or
relays does not read it. The runtime reads the few facts it needs (task id, tenant,
`submitted_at`) from the data's head (`avrohead`, ~1 µs) and leaves the rest to the handler:
`event.data` decodes on first access and returns the same dict every time after.

Bad bytes surface where the data is first read: `event.data` raises the `SchemaError` (a
`PermanentError`) the eager decode would have raised at admission, every time it is read, and
`data_error` keeps it, so the runtime dead-letters the record with that error whatever its
handler did with the exception. Everything else about the event (type, schema urn, headers) is
checked when the record arrives, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.errors import PermanentError
from conveyor.events.avro import SchemaSet
from conveyor.events.model import Event

_PENDING = object()  # the data is not decoded yet


class LazyEvent(Event):
    """An `Event` (same fields, same surface) whose `data` is decoded on first access."""

    __slots__ = ("_value", "_payload", "_schemas", "_error", "_head")
    _value: Any  # the decoded data, or _PENDING
    _payload: bytes
    _schemas: SchemaSet
    _error: PermanentError | None
    _head: dict[str, Any] | None

    # The dataclass __init__ writes `data` through this setter (the data of an event built
    # from an already decoded value); `lazy` leaves it pending instead.
    @property
    def data(self) -> Any:
        value = self._value
        if value is _PENDING:
            value = self._decode()
        return value

    @data.setter
    def data(self, value: Any) -> None:
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_error", None)
        object.__setattr__(self, "_head", None)

    @classmethod
    def pending(
        cls,
        payload: bytes,
        schemas: SchemaSet,
        *,
        id: str,  # noqa: A002 - the CloudEvents attribute's name, as Event has it
        type: str,  # noqa: A002
        source: str,
        subject: str | None,
        time: str | None,
        datacontenttype: str,
        dataschema: str | None,
        extensions: Mapping[str, str],
    ) -> LazyEvent:
        """The event with these attributes whose data is the Avro `payload`, written with the
        schema its `dataschema` names, not decoded yet."""
        # One per consumed record: the slots are written directly, as the frozen dataclass
        # __init__ would through object.__setattr__ one call each (2.5x the time).
        out = object.__new__(cls)
        for set_, value in zip(
            _SETTERS,
            (id, type, source, subject, time, datacontenttype, dataschema, extensions),
            strict=True,
        ):
            set_(out, value)
        _SET_VALUE(out, _PENDING)
        _SET_PAYLOAD(out, payload)
        _SET_SCHEMAS(out, schemas)
        _SET_ERROR(out, None)
        _SET_HEAD(out, None)
        return out

    @property
    def decoded(self) -> bool:
        """Whether the data has been decoded (or failed to)."""
        return self._value is not _PENDING or self._error is not None

    @property
    def data_error(self) -> PermanentError | None:
        """The error the data failed to decode with; None if it decoded or was never read."""
        return self._error

    @property
    def head(self) -> Any:
        """The data if it is decoded, else its leading fields (task id, tenant, submitted_at);
        None when the data does not decode. Never raises."""
        if self._value is not _PENDING:
            return self._value
        head = self._head
        if head is None and self._error is None:
            head = self._schemas.head_urn(self.dataschema or "", self._payload)
            if head is None:  # no cheap head for this schema, or bad bytes: decode it all
                try:
                    return self._decode()
                except PermanentError:
                    return None
            object.__setattr__(self, "_head", head)
        return head

    def _decode(self) -> Any:
        error = self._error
        if error is None:
            try:
                value = self._schemas.decode_urn(self.dataschema or "", self._payload)[1]
            except PermanentError as exc:
                error = exc
                object.__setattr__(self, "_error", exc)
            else:
                object.__setattr__(self, "_value", value)
                return value
        # A fresh exception each time: one object raised again and again would pile up
        # tracebacks. The first (kept in `data_error`) carries the cause.
        raise type(error)(str(error)) from error

    def __repr__(self) -> str:
        shown = "<not decoded>" if self._value is _PENDING else repr(self._value)
        return (
            f"LazyEvent(id={self.id!r}, type={self.type!r}, source={self.source!r}, "
            f"subject={self.subject!r}, data={shown}, dataschema={self.dataschema!r})"
        )


_SETTERS = tuple(
    Event.__dict__[name].__set__
    for name in ("id", "type", "source", "subject", "time", "datacontenttype", "dataschema")
) + (Event.__dict__["extensions"].__set__,)
_SET_VALUE = LazyEvent.__dict__["_value"].__set__
_SET_PAYLOAD = LazyEvent.__dict__["_payload"].__set__
_SET_SCHEMAS = LazyEvent.__dict__["_schemas"].__set__
_SET_ERROR = LazyEvent.__dict__["_error"].__set__
_SET_HEAD = LazyEvent.__dict__["_head"].__set__
