"""CloudEvents protocol bindings in binary mode: attributes travel as headers, the data as the body.

The body is the event's data (JSON) untouched, so a consumer that knows nothing of CloudEvents still
reads the payload, and one that does gets id, type, source and time from the headers. Each binding
names the headers its own way: Kafka `ce_id`, NATS `ce-id`, AMQP (RabbitMQ) `cloudEvents_id`.
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
PARTITION_KEY = "partitionkey"
"""The CloudEvents partitioning extension: the outbox key, where the broker has no key of its own."""
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
"""The CloudEvents distributed-tracing extension: the W3C trace context of the append that wrote the event."""

DATASCHEMA = "urn:eventstore:{source}:{type}:v{version}"
"""The default `dataschema` template: `{source}`, `{type}` and `{version}` are filled in per message.

Point it at where the exported schemas are served (`eventstore schemas export DIR` writes
`DIR/{type}/v{version}.json`), e.g. `https://schemas.example.com/shop/{type}/v{version}.json`.
"""
_PLACEHOLDERS = frozenset({"source", "type", "version"})

KAFKA_PREFIX = "ce_"
NATS_PREFIX = "ce-"
AMQP_PREFIX = "cloudEvents_"

_REQUIRED = ("specversion", "id", "source", "type")
_KNOWN = frozenset({*_REQUIRED, "time", "subject", "dataschema"})

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """A CloudEvent read back from a broker's message."""

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
    def partition_key(self) -> str | None:
        """The outbox key, on brokers without keys (NATS, RabbitMQ); on Kafka it is the record's key."""
        return self.extensions.get(PARTITION_KEY)

    @property
    def traceparent(self) -> str | None:
        return self.extensions.get(TRACEPARENT)

    @property
    def tracestate(self) -> str | None:
        return self.extensions.get(TRACESTATE)

    def json(self) -> Any:
        return orjson.loads(self.data)


def attributes(
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
) -> list[tuple[str, str]]:
    """The context attributes of one message, by CloudEvents name; each binding adds its prefix."""
    found = [("specversion", SPEC_VERSION), ("id", id), ("source", source), ("type", type), ("time", time)]
    if subject is not None:
        found.append(("subject", subject))
    if dataschema is not None:
        found.append(("dataschema", dataschema))
    if stream_version is not None:
        found.append((STREAM_VERSION, str(stream_version)))
    if correlation_id is not None:
        found.append((CORRELATION_ID, correlation_id))
    if causation_id is not None:
        found.append((CAUSATION_ID, causation_id))
    if traceparent is not None:
        found.append((TRACEPARENT, traceparent))
        if tracestate:
            found.append((TRACESTATE, tracestate))
    return found


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
    found = attributes(
        id=id, type=type, source=source, time=time, subject=subject, correlation_id=correlation_id,
        causation_id=causation_id, stream_version=stream_version, dataschema=dataschema,
        traceparent=traceparent, tracestate=tracestate,
    )
    headers: Headers = [(KAFKA_PREFIX + name, value.encode()) for name, value in found[:5]]
    headers.append((CONTENT_TYPE_HEADER, CONTENT_TYPE.encode()))
    headers.extend((KAFKA_PREFIX + name, value.encode()) for name, value in found[5:])
    if traceparent is not None:
        headers.append((TRACEPARENT, traceparent.encode()))
        if tracestate:
            headers.append((TRACESTATE, tracestate.encode()))
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


def path_segment(value: str) -> str:
    """`value` as one segment of a URI path (or a folder name): percent-encoded, a leading dot too.

    `.` and `..` are valid type names; left as they are, a URI resolver collapses them and a folder of
    that name is DIR itself or its parent. `unquote` reverses it.
    """
    encoded = quote(value, safe="")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def dataschema_uri(template: str, source: str, event_type: str, version: int) -> str:
    """The URI of the schema (of `event_type` at `version`) that shaped a message's data.

    Values are encoded as path segments, so any type name or source makes a valid URI.
    """
    return template.format(
        source=path_segment(source), type=path_segment(event_type), version=path_segment(str(version))
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


def from_attributes(
    headers: Mapping[str, str], prefix: str, data: bytes | None, content_type: str | None = None
) -> CloudEvent:
    """Read a CloudEvent from headers named `prefix` + attribute; raise `NotACloudEvent` if it is none."""
    prefix = prefix.lower()
    found = {name.lower()[len(prefix):]: value for name, value in headers.items() if name.lower().startswith(prefix)}
    missing = [prefix + name for name in _REQUIRED if name not in found]
    if missing:
        raise NotACloudEvent(missing)
    time_text = found.get("time")
    try:
        time = datetime.fromisoformat(time_text) if time_text else None
    except ValueError:
        raise NotACloudEvent([f"{prefix}time (not RFC 3339)"]) from None
    return CloudEvent(
        id=found["id"],
        type=found["type"],
        source=found["source"],
        specversion=found["specversion"],
        data=data or b"",
        time=time,
        subject=found.get("subject"),
        content_type=content_type,
        dataschema=found.get("dataschema"),
        extensions={name: value for name, value in found.items() if name not in _KNOWN},
    )


def from_kafka(headers: Iterable[tuple[str, bytes]], value: bytes | None) -> CloudEvent:
    """Read a CloudEvent from a Kafka message's headers and value; raise `NotACloudEvent` if it is none."""
    found = {name.lower(): raw.decode("utf-8", errors="replace") for name, raw in headers}
    return from_attributes(found, KAFKA_PREFIX, value, found.get(CONTENT_TYPE_HEADER))


def nats_headers(key: str | None = None, **values: Any) -> dict[str, str]:
    """`kafka_headers` for the NATS binding: `ce-` headers, a content type, `ce-partitionkey` = the key."""
    headers = {NATS_PREFIX + name: value for name, value in attributes(**values)}
    if key is not None:
        headers[NATS_PREFIX + PARTITION_KEY] = key
    headers[CONTENT_TYPE_HEADER] = CONTENT_TYPE
    return headers


def from_nats(msg: Any) -> CloudEvent:
    """A CloudEvent from a `nats.aio.msg.Msg` (core NATS or JetStream)."""
    headers: dict[str, str] = dict(msg.headers or {})
    lowered = {name.lower(): value for name, value in headers.items()}
    return from_attributes(headers, NATS_PREFIX, msg.data, lowered.get(CONTENT_TYPE_HEADER))


def amqp_headers(key: str | None = None, **values: Any) -> dict[str, str]:
    """`kafka_headers` for the AMQP binding: `cloudEvents_` headers (the content type is a property)."""
    headers = {AMQP_PREFIX + name: value for name, value in attributes(**values)}
    if key is not None:
        headers[AMQP_PREFIX + PARTITION_KEY] = key
    return headers


def from_amqp(message: Any) -> CloudEvent:
    """A CloudEvent from an `aio_pika` message (its headers table, body and content_type property)."""
    headers = {
        name: value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
        for name, value in (message.headers or {}).items()
    }
    return from_attributes(headers, AMQP_PREFIX, message.body, message.content_type)


def from_record(record: Any) -> CloudEvent:
    """`from_kafka` for an aiokafka `ConsumerRecord`."""
    return from_kafka(record.headers or (), record.value)
