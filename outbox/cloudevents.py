"""The CloudEvents Kafka protocol binding in binary mode: attributes travel as `ce_` headers.

The value is the event's data (JSON) untouched, so a consumer that knows nothing of CloudEvents still
reads the payload, and one that does gets id, type, source and time from the headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from string import Formatter
from typing import Any
from urllib.parse import quote

import orjson

from outbox.errors import NotACloudEvent

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/json"
CONTENT_TYPE_HEADER = "content-type"
CORRELATION_ID = "correlationid"
CAUSATION_ID = "causationid"
STREAM_VERSION = "streamversion"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
"""The CloudEvents distributed-tracing extension: the W3C trace context of the append that wrote the event."""

DATASCHEMA = "urn:eventstore:{source}:{type}:v{version}"
"""The default `dataschema` template: `{source}`, `{type}` and `{version}` are filled in per message.

Point it at where the exported schemas are served (`eventstore schemas export DIR` writes
`DIR/{type}/v{version}.json`), e.g. `https://schemas.example.com/shop/{type}/v{version}.json`.
"""
_PLACEHOLDERS = frozenset({"source", "type", "version"})

_REQUIRED = ("ce_specversion", "ce_id", "ce_source", "ce_type")

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """A CloudEvent read back from a Kafka message."""

    id: str
    type: str
    source: str
    specversion: str
    data: bytes
    time: datetime | None = None
    subject: str | None = None
    content_type: str | None = None
    dataschema: str | None = None
    extensions: Mapping[str, str] = field(default_factory=dict)

    @property
    def correlation_id(self) -> str | None:
        return self.extensions.get(CORRELATION_ID)

    @property
    def causation_id(self) -> str | None:
        return self.extensions.get(CAUSATION_ID)

    @property
    def traceparent(self) -> str | None:
        return self.extensions.get(TRACEPARENT)

    @property
    def tracestate(self) -> str | None:
        return self.extensions.get(TRACESTATE)

    def json(self) -> Any:
        return orjson.loads(self.data)


def kafka_headers(
    *,
    id: str,
    type: str,
    source: str,
    time: str,
    subject: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    stream_version: int | None = None,
    dataschema: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> Headers:
    """Headers for one message; `time` is already RFC 3339 text (the relay formats it in SQL).

    The trace context goes out twice: as the CloudEvents attribute (`ce_traceparent`) and as the bare
    W3C header that OpenTelemetry's Kafka instrumentations read (`traceparent`).
    """
    headers: Headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", type.encode()),
        ("ce_time", time.encode()),
        (CONTENT_TYPE_HEADER, b"application/json"),
    ]
    if subject is not None:
        headers.append(("ce_subject", subject.encode()))
    if dataschema is not None:
        headers.append(("ce_dataschema", dataschema.encode()))
    if stream_version is not None:
        headers.append(("ce_" + STREAM_VERSION, str(stream_version).encode()))
    if correlation_id is not None:
        headers.append(("ce_" + CORRELATION_ID, correlation_id.encode()))
    if causation_id is not None:
        headers.append(("ce_" + CAUSATION_ID, causation_id.encode()))
    if traceparent is not None:
        encoded = traceparent.encode()
        headers += [("ce_" + TRACEPARENT, encoded), (TRACEPARENT, encoded)]
        if tracestate:
            headers += [("ce_" + TRACESTATE, tracestate.encode()), (TRACESTATE, tracestate.encode())]
    return headers


def check_dataschema_template(template: str) -> str:
    """Return `template` if it names both `{type}` and `{version}` and no other placeholder; else raise ValueError."""
    try:
        names = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"dataschema template {template!r}: {exc}") from None
    unknown = names - _PLACEHOLDERS
    if unknown or not {"type", "version"} <= names:
        raise ValueError(
            f"dataschema template {template!r} must use {{type}} and {{version}}"
            f" (and may use {{source}}), not {', '.join(sorted(unknown)) or 'only ' + ', '.join(sorted(names))}"
        )
    return template


def dataschema_uri(template: str, source: str, event_type: str, version: int) -> str:
    """The URI of the schema (of `event_type` at `version`) that shaped a message's data.

    Values are percent-encoded, so any type name or source makes a valid URI.
    """
    return template.format(
        source=quote(source, safe=""), type=quote(event_type, safe=""), version=quote(str(version), safe="")
    )


class DataSchemas:
    """`dataschema_uri` for the relay's hot loop: each URI is formatted once per process."""

    def __init__(self, template: str | None) -> None:
        self._template = template
        self._cache: dict[tuple[str, str, str], str | None] = {}

    def uri(self, source: str, event_type: str, version: str | None) -> str | None:
        """None for events written without a schema version (raw `NewEvent`s), or with no template."""
        if version is None or self._template is None:
            return None
        key = (source, event_type, version)
        if key in self._cache:
            return self._cache[key]
        number = int(version) if version.isascii() and version.isdigit() else None
        uri = None if number is None else dataschema_uri(self._template, source, event_type, number)
        if len(self._cache) < 10_000:
            self._cache[key] = uri
        return uri


def from_kafka(headers: Iterable[tuple[str, bytes]], value: bytes | None) -> CloudEvent:
    """Read a CloudEvent from a Kafka message's headers and value; raise `NotACloudEvent` if it is none."""
    found: dict[str, str] = {}
    for name, raw in headers:
        found[name.lower()] = raw.decode("utf-8", errors="replace")
    missing = [h for h in _REQUIRED if h not in found]
    if missing:
        raise NotACloudEvent(missing)
    time_text = found.get("ce_time")
    try:
        time = datetime.fromisoformat(time_text) if time_text else None
    except ValueError:
        raise NotACloudEvent(["ce_time (not RFC 3339)"]) from None
    known = {"ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject", "ce_dataschema"}
    extensions = {k[3:]: v for k, v in found.items() if k.startswith("ce_") and k not in known}
    return CloudEvent(
        id=found["ce_id"],
        type=found["ce_type"],
        source=found["ce_source"],
        specversion=found["ce_specversion"],
        data=value or b"",
        time=time,
        subject=found.get("ce_subject"),
        content_type=found.get(CONTENT_TYPE_HEADER),
        dataschema=found.get("ce_dataschema"),
        extensions=extensions,
    )


def from_record(record: Any) -> CloudEvent:
    """`from_kafka` for an aiokafka `ConsumerRecord`."""
    return from_kafka(record.headers or (), record.value)
