"""An AsyncAPI 3.0 document for the outbox: what goes on each topic, so other teams can generate consumers.

One channel per routed topic; one message per event type and schema version it can carry (old versions
too: the relay publishes a stored event as it was written), with the CloudEvents Kafka binding's `ce_`
headers as message headers and the Kafka key as the message binding's key.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from eventstore_contracts.export import all_versions
from eventstore_contracts.lock import SchemaLock
from eventstore_contracts.model import Contracts, TopicContract
from outbox.cloudevents import CAUSATION_ID, CONTENT_TYPE, CORRELATION_ID, SPEC_VERSION, STREAM_VERSION

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"

_NOT_AN_ID = re.compile(r"[^\w.\-]")
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "dependentSchemas", "$defs", "definitions"})
_UNDESCRIBED: Mapping[int, Mapping[str, Any] | None] = {0: None}
"""A routed type no class describes (raw events): one message without a version or payload schema."""


def asyncapi_document(
    contracts: Contracts,
    lock: SchemaLock | None = None,
    *,
    version: str = "1.0.0",
    servers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The document as JSON-ready data; `version` is the API's (bump it when the lock changes).

    `servers` maps a server name to Kafka bootstrap `host:port`.
    """
    known = all_versions(contracts, lock)
    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for topic in contracts.topics.values():
        channel_id = _id(topic.topic)
        channel_messages: dict[str, Any] = {}
        for event_type in topic.event_types:
            versions: Mapping[int, Mapping[str, Any] | None] = known.get(event_type) or _UNDESCRIBED
            for number, schema in versions.items():
                message_id = _id(event_type) + (f".v{number}" if number else "")
                if message_id not in messages:
                    messages[message_id] = _message(contracts, topic, event_type, number, schema, schemas)
                channel_messages[message_id] = {"$ref": f"#/components/messages/{message_id}"}
        channels[channel_id] = {
            "address": topic.topic,
            "title": topic.topic,
            "description": (
                f"Kafka topic {topic.topic}: CloudEvents in binary mode (attributes in ce_ headers, the event's "
                f"data as the value), keyed by {' or '.join(topic.keys)}; messages of one key arrive in the "
                f"order they were stored. Schema compatibility promised to consumers: {topic.compatibility}."
            ),
            "messages": channel_messages,
            "bindings": {"kafka": {"topic": topic.topic, "bindingVersion": KAFKA_BINDING_VERSION}},
        }
        operations[f"publish.{channel_id}"] = {
            "action": "send",
            "title": f"Publish to {topic.topic}",
            "summary": f"The outbox relay publishes {', '.join(topic.event_types) or 'no events'} to {topic.topic}.",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{m}"} for m in channel_messages],
        }
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": contracts.name,
            "version": version,
            "description": f"Integration events of {contracts.name}, published by its transactional outbox.",
        },
        "defaultContentType": CONTENT_TYPE,
    }
    if servers:
        document["servers"] = {
            _id(name): {"host": host, "protocol": "kafka", "description": "Kafka bootstrap server"}
            for name, host in servers.items()
        }
    document["channels"] = channels
    document["operations"] = operations
    document["components"] = {"schemas": schemas, "messages": messages}
    return document


def _message(
    contracts: Contracts,
    topic: TopicContract,
    event_type: str,
    version: int,
    schema: Mapping[str, Any] | None,
    schemas: dict[str, Any],
) -> dict[str, Any]:
    message_id = _id(event_type) + (f".v{version}" if version else "")
    message: dict[str, Any] = {
        "name": event_type,
        "title": f"{event_type} v{version}" if version else event_type,
        "contentType": CONTENT_TYPE,
        "headers": _headers(contracts, event_type, version or None),
        "correlationId": {
            "description": "Correlates the messages caused by one request.",
            "location": f"$message.header#/ce_{CORRELATION_ID}",
        },
        "bindings": {"kafka": {"key": _key(topic), "bindingVersion": KAFKA_BINDING_VERSION}},
    }
    if schema is None:
        message["summary"] = "Routed, but no registered event class describes its data."
        message["payload"] = {"type": "object"}
    else:
        message["payload"] = {"$ref": f"#/components/schemas/{_add_schema(schemas, message_id, schema)}"}
    return message


def _headers(contracts: Contracts, event_type: str, version: int | None) -> dict[str, Any]:
    text: dict[str, Any] = {"type": "string"}
    properties: dict[str, Any] = {
        "ce_specversion": {**text, "const": SPEC_VERSION},
        "ce_id": {**text, "format": "uuid", "description": "The event id: the same for every copy of the message."},
        "ce_source": {**text, "const": contracts.source},
        "ce_type": {**text, "const": event_type},
        "ce_time": {**text, "format": "date-time", "description": "When the event was stored (UTC)."},
        "content-type": {**text, "const": CONTENT_TYPE},
        "ce_subject": {**text, "description": "The stream the event belongs to."},
        f"ce_{STREAM_VERSION}": {**text, "pattern": "^[0-9]+$", "description": "The event's version in its stream."},
        f"ce_{CORRELATION_ID}": {**text, "description": "The correlation id, where the event has one."},
        f"ce_{CAUSATION_ID}": {**text, "description": "The id of the message that caused it, where known."},
    }
    schema_id = None if version is None else contracts.schema_id(event_type, version)
    if schema_id is not None:
        properties["ce_dataschema"] = {
            **text, "format": "uri", "const": schema_id, "description": "The JSON Schema of this payload version.",
        }
    return {
        "type": "object",
        "required": ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "content-type"],
        "properties": properties,
    }


def _key(topic: TopicContract) -> dict[str, Any]:
    described = [
        "the stream id" if key == "stream_id" else f"the event's {key} field, as text" for key in topic.keys
    ]
    return {"type": "string", "description": f"The message key: {' or '.join(described)}."}


def _add_schema(schemas: dict[str, Any], name: str, schema: Mapping[str, Any]) -> str:
    """Put a payload schema in `components.schemas`, its `$defs` hoisted beside it (references rewritten).

    Definitions are shared between payloads where they are equal, and named after their payload where
    two payloads define the same name differently.
    """
    body = copy.deepcopy(dict(schema))
    definitions: dict[str, Any] = body.pop("$defs", {})
    for prefix in ("", f"{name}."):
        names = {d: prefix + _id(d) for d in definitions}
        rewritten = {names[d]: _rewrite(s, names) for d, s in definitions.items()}
        if all(schemas.get(n, s) == s for n, s in rewritten.items()):
            break
    schemas.update(rewritten)
    schemas[name] = _rewrite(body, names)
    return name


def _rewrite(node: Any, names: Mapping[str, str], *, by_name: bool = False) -> Any:
    """References to hoisted definitions, and no OpenAPI-style `discriminator` (AsyncAPI's is a plain name).

    `by_name` marks a map of names to schemas (`properties`), whose keys are field names, not keywords.
    """
    if isinstance(node, dict):
        rewritten: dict[str, Any] = {}
        for key, value in node.items():
            if not by_name and key == "discriminator" and isinstance(value, dict):
                continue
            rewritten[key] = _rewrite(value, names, by_name=not by_name and key in _NAMED_SCHEMAS)
        ref = node.get("$ref")
        if not by_name and isinstance(ref, str) and ref.startswith("#/$defs/"):
            rewritten["$ref"] = f"#/components/schemas/{names.get(ref[len('#/$defs/'):], ref)}"
        return rewritten
    if isinstance(node, list):
        return [_rewrite(item, names) for item in node]
    return node


def _id(name: str) -> str:
    """A name AsyncAPI accepts as a key of channels, operations and components ([\\w.-])."""
    return _NOT_AN_ID.sub("_", name)
