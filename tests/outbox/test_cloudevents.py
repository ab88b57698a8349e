"""The CloudEvents Kafka binding (binary mode) round-trips, and non-CloudEvents are told apart."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from outbox import NotACloudEvent, from_kafka, kafka_headers


def test_headers_round_trip_every_attribute() -> None:
    headers = kafka_headers(
        id="e1", type="OrderPlaced", source="/shop", time="2026-11-26T10:00:00.123456Z", subject="order-1",
        correlation_id="c1", causation_id="k1", stream_version=3,
    )
    names = [name for name, _ in headers]
    assert names[:6] == ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "content-type"]
    event = from_kafka(headers, b'{"total": 5}')
    assert (event.id, event.type, event.source, event.specversion) == ("e1", "OrderPlaced", "/shop", "1.0")
    assert event.time == datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)
    assert event.subject == "order-1" and event.content_type == "application/json"
    assert event.correlation_id == "c1" and event.causation_id == "k1"
    assert event.extensions["streamversion"] == "3"
    assert event.json() == {"total": 5}


def test_optional_attributes_are_left_out_when_absent() -> None:
    headers = kafka_headers(id="e1", type="T", source="/s", time="2026-11-26T10:00:00Z")
    assert {n for n, _ in headers} == {
        "ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "content-type"
    }
    event = from_kafka(headers, b"{}")
    assert event.correlation_id is None and event.causation_id is None and event.subject is None


def test_a_plain_kafka_message_is_not_a_cloud_event() -> None:
    with pytest.raises(NotACloudEvent) as caught:
        from_kafka([("ce_id", b"1"), ("other", b"x")], b"{}")
    assert caught.value.missing == ["ce_specversion", "ce_source", "ce_type"]


def test_a_malformed_time_is_rejected() -> None:
    headers = kafka_headers(id="e1", type="T", source="/s", time="yesterday")
    with pytest.raises(NotACloudEvent, match="ce_time"):
        from_kafka(headers, b"{}")
