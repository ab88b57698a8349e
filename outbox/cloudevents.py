"""The CloudEvents Kafka protocol binding in binary mode: attributes travel as `ce_` headers.

The value is the event's data (JSON) untouched, so a consumer that knows nothing of CloudEvents still
reads the payload, and one that does gets id, type, source and time from the headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from outbox.errors import NotACloudEvent

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/json"
CONTENT_TYPE_HEADER = "content-type"
CORRELATION_ID = "correlationid"
CAUSATION_ID = "causationid"
STREAM_VERSION = "streamversion"

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
    extensions: Mapping[str, str] = field(default_factory=dict)

    @property
    def correlation_id(self) -> str | None:
        return self.extensions.get(CORRELATION_ID)

    @property
    def causation_id(self) -> str | None:
        return self.extensions.get(CAUSATION_ID)

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
) -> Headers:
    """Headers for one message; `time` is already RFC 3339 text (the relay formats it in SQL)."""
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
    if stream_version is not None:
        headers.append(("ce_" + STREAM_VERSION, str(stream_version).encode()))
    if correlation_id is not None:
        headers.append(("ce_" + CORRELATION_ID, correlation_id.encode()))
    if causation_id is not None:
        headers.append(("ce_" + CAUSATION_ID, causation_id.encode()))
    return headers


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
    known = {"ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject"}
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
        extensions=extensions,
    )


def from_record(record: Any) -> CloudEvent:
    """`from_kafka` for an aiokafka `ConsumerRecord`."""
    return from_kafka(record.headers or (), record.value)
