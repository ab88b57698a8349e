"""Crypto-shredding: personal data is stored encrypted under a key per subject; forgetting deletes the key.

Fields an append marks as personal (`NewEvent.personal_data`, which `aggregates` fills from the event
class's `PersonalData` annotations) are encrypted with AES-GCM under their subject's data key before
they reach the database, so the events table (and everything that copies from it: backups, replicas,
`pg_dump`) only ever holds ciphertext. Data keys live in `subject_keys`, wrapped by a master key from a
`KeyProvider` (`MasterKey` from configuration, or a KMS). The stored metadata names the sealed fields
and their subjects, so every reader opens them without knowing the event classes: the store's reads,
projections, the outbox relay and the CLI all go through `Keyring.open`. Once a subject is forgotten its
key is gone, and its fields read as `REDACTED` from then on, everywhere, while everything else about the
events (and the aggregates they load) stays as it was.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

import asyncpg
import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore import sql
from eventstore.errors import (
    InvalidArgument,
    MasterKeyMismatch,
    NoKeyProvider,
    PersonalDataCorrupt,
    SchemaNotMigrated,
    SubjectForgotten,
)
from eventstore.model import RecordedEvent, storable_text

REDACTED = "[redacted]"
"""What a forgotten subject's personal field reads as, on every read path (a JSON string)."""

PERSONAL_DATA = "personal_data"
"""The metadata key that lists an event's sealed fields: `{"fields": {field: subject}, "subjects": [...]}`."""

MASTER_KEY_ENV = "EVENTSTORE_MASTER_KEY"
"""Environment variable holding the master key (32 bytes, base64) for `MasterKey.from_env`."""

_MARKER = f'"{PERSONAL_DATA}"'
_METADATA = operator.itemgetter(3)  # RecordedEvent.metadata, without the property call
_NONCE = 12
_TAG = 16  # AES-GCM's authentication tag, after the ciphertext

Executor = Any
"""An asyncpg connection or pool: whatever the caller holds (a projection reads in its own transaction)."""


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps data keys with a master key the database never sees (configuration, a KMS).

    `key_id` names the master key; it is stored beside every key it wrapped, so a process started with
    another master key is refused (`MasterKeyMismatch`) instead of reading every subject as forgotten.
    """

    @property
    def key_id(self) -> str: ...

    async def wrap(self, data_key: bytes, subject: str) -> bytes: ...

    async def unwrap(self, wrapped: bytes, subject: str) -> bytes:
        """The data key; raise `MasterKeyMismatch` if `wrapped` was not wrapped by this master key."""
        ...


class MasterKey:
    """A local master key (AES-256-GCM): 32 bytes, usually from `EVENTSTORE_MASTER_KEY` as base64."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise InvalidArgument("a master key is 32 bytes (AES-256); make one with `MasterKey.generate()`")
        self._aead = AESGCM(key)
        self._key_id = "local:" + hashlib.sha256(b"eventstore master key\x00" + key).hexdigest()[:16]

    @staticmethod
    def generate() -> str:
        """A new random master key, as the base64 text `from_base64` and the environment variable take."""
        return base64.b64encode(os.urandom(32)).decode()

    @classmethod
    def from_base64(cls, text: str) -> MasterKey:
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (ValueError, TypeError, AttributeError):
            raise InvalidArgument("the master key must be base64 text of 32 bytes") from None
        return cls(key)

    @classmethod
    def from_env(cls, name: str = MASTER_KEY_ENV) -> MasterKey | None:
        """The master key in environment variable `name`, or None when it is not set."""
        text = os.environ.get(name)
        return cls.from_base64(text) if text else None

    @property
    def key_id(self) -> str:
        return self._key_id

    async def wrap(self, data_key: bytes, subject: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, data_key, subject.encode())

    async def unwrap(self, wrapped: bytes, subject: str) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], subject.encode())
        except InvalidTag:
            raise MasterKeyMismatch(self.key_id, None) from None

    def __repr__(self) -> str:  # never the key itself
        return f"MasterKey({self._key_id})"


def check_personal_data(personal: object) -> dict[str, str] | None:
    """`NewEvent.personal_data` as a plain dict, or `InvalidArgument` saying what is wrong with it."""
    if personal is None:
        return None
    if not isinstance(personal, Mapping):
        raise InvalidArgument(f"personal_data maps field names to subject ids, got {type(personal).__name__}")
    checked: dict[str, str] = {}
    for field, subject in personal.items():
        if not isinstance(field, str) or not field:
            raise InvalidArgument(f"personal_data: field names must be non-empty strings, got {field!r}")
        check_subject(subject)
        checked[field] = subject
    return checked or None


MAX_SUBJECT_LENGTH = 255


def check_subject(subject: object) -> str:
    if not isinstance(subject, str) or not subject or not storable_text(subject) or len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidArgument(
            f"a subject id is a non-empty string of at most {MAX_SUBJECT_LENGTH} characters, got {subject!r}"
        )
    return subject


def marker(fields: Mapping[str, str]) -> dict[str, Any]:
    """The metadata entry of an event with sealed fields."""
    return {"fields": dict(fields), "subjects": sorted(set(fields.values()))}


def _aad(event_id: UUID | str, field: str) -> bytes:
    # Binds each ciphertext to its event and field: a sealed value copied elsewhere does not open.
    return f"{event_id}/{field}".encode()


def _sealed_stand_in(value: Any) -> str:
    """A string as long as `value` sealed by `_encrypt` (nonce, ciphertext and tag, in base64)."""
    return "A" * (4 * -(-(_NONCE + len(orjson.dumps(value)) + _TAG) // 3))


def _encrypt(key: bytes, aad: bytes, plain: bytes) -> str:
    """AES-GCM with a synthetic nonce (an HMAC of what is sealed, under a key derived from the data key).

    Deterministic, so sealing the same event again gives the same text and a retried append stays
    idempotent; a nonce repeats only with the same plaintext, event and field, which AES-GCM allows.
    """
    nonce_key = hashlib.sha256(b"eventstore nonce\x00" + key).digest()
    nonce = hmac.new(nonce_key, aad + b"\x00" + plain, hashlib.sha256).digest()[:_NONCE]
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, plain, aad)).decode()


def has_personal_data(metadata: str) -> bool:
    """Cheap test on the stored metadata text, made before parsing anything."""
    return _MARKER in metadata


class Keyring:
    """The store's access to the subjects' data keys: seals fields on append, opens them on read."""

    def __init__(self, provider: KeyProvider | None) -> None:
        if provider is not None and not isinstance(provider, KeyProvider):
            raise InvalidArgument(f"keys must be a KeyProvider (wrap, unwrap, key_id), got {type(provider).__name__}")
        self.provider = provider
        # Unwrapped keys by their wrapped form. Only ever looked up with a wrapped key just read from
        # the table, so a forgotten subject (no row) can never be opened from here.
        self._unwrapped: dict[bytes, bytes] = {}

    async def check(self, executor: Executor) -> None:
        """Refuse a master key that did not wrap the stored keys; changes nothing."""
        if self.provider is None:
            return
        try:
            row = await executor.fetchrow(sql.SUBJECT_KEY_SAMPLE, self.provider.key_id)
        except asyncpg.exceptions.UndefinedTableError:
            raise SchemaNotMigrated(None, "head") from None
        if row is None:
            return
        if row["key_id"] != self.provider.key_id:
            raise MasterKeyMismatch(self.provider.key_id, row["key_id"])
        await self._unwrap(row["subject"], row["wrapped_key"])

    async def _unwrap(self, subject: str, wrapped: bytes) -> bytes:
        key = self._unwrapped.get(wrapped)
        if key is None:
            assert self.provider is not None
            key = await self.provider.unwrap(wrapped, subject)
            if len(self._unwrapped) > 10_000:
                self._unwrapped.clear()
            self._unwrapped[wrapped] = key
        return key

    async def _keys(self, executor: Executor, subjects: Sequence[str]) -> dict[str, bytes | None]:
        """Data keys of `subjects` that have one: None for a forgotten subject, absent for an unknown one."""
        rows = await executor.fetch(sql.SUBJECT_KEYS, list(subjects))
        keys: dict[str, bytes | None] = {}
        for row in rows:
            wrapped = row["wrapped_key"]
            if wrapped is None or self.provider is None:
                keys[row["subject"]] = None
                continue
            if row["key_id"] != self.provider.key_id:
                raise MasterKeyMismatch(self.provider.key_id, row["key_id"])
            keys[row["subject"]] = await self._unwrap(row["subject"], wrapped)
        return keys

    async def data_keys(self, executor: Executor, subjects: Sequence[str]) -> dict[str, bytes]:
        """The data keys to seal with, created for subjects that have none yet."""
        if self.provider is None:
            raise NoKeyProvider()
        wanted = sorted(set(subjects))
        keys = await self._keys(executor, wanted)
        forgotten = [s for s in wanted if s in keys and keys[s] is None]
        if forgotten:  # before creating the keys of the others: a refused append creates nothing
            raise SubjectForgotten(forgotten[0])
        missing = [s for s in wanted if s not in keys]
        if missing:
            wrapped = [await self.provider.wrap(AESGCM.generate_key(bit_length=256), s) for s in missing]
            await executor.execute(sql.CREATE_SUBJECT_KEYS, missing, self.provider.key_id, wrapped)
            keys.update(await self._keys(executor, missing))  # a concurrent writer's key wins the race
            forgotten = [s for s in missing if keys.get(s) is None]  # forgotten since that writer made it
            if forgotten:
                raise SubjectForgotten(forgotten[0])
        return {s: k for s, k in keys.items() if k is not None}

    async def seal(
        self,
        executor: Executor,
        event_ids: Sequence[UUID],
        data: Sequence[str],
        personal: Sequence[dict[str, str] | None],
        check_size: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """`data` with each event's personal fields encrypted (the rest of each event untouched).

        The events are checked before any subject's key is created, so bad input creates nothing:
        `check_size` hears each sealed event's index and the length its data will have, and may raise.
        """
        bodies: dict[int, dict[str, Any]] = {}
        for i, fields in enumerate(personal):
            if not fields:
                continue
            body = orjson.loads(data[i])
            if not isinstance(body, dict):
                raise InvalidArgument(f"event {event_ids[i]}: personal data needs a JSON object as data")
            for field in fields:
                if field not in body:
                    raise InvalidArgument(f"event {event_ids[i]}: personal field {field!r} is not in its data")
            bodies[i] = body
            if check_size is not None:
                stand_in = {k: _sealed_stand_in(v) if k in fields else v for k, v in body.items()}
                check_size(i, len(orjson.dumps(stand_in)))
        keys = await self.data_keys(executor, [s for p in personal if p for s in p.values()])
        sealed = list(data)
        for i, body in bodies.items():
            fields = personal[i]
            assert fields is not None
            for field, subject in fields.items():
                body[field] = _encrypt(keys[subject], _aad(event_ids[i], field), orjson.dumps(body[field]))
            sealed[i] = orjson.dumps(body).decode()
        return sealed

    async def open(
        self, executor: Executor, event_ids: Sequence[UUID | str], data: Sequence[str], metadata: Sequence[str]
    ) -> list[str]:
        """`data` with sealed fields decrypted, or `REDACTED` where the subject was forgotten.

        The texts of events without personal data come back as they are (the same objects).
        """
        found: list[tuple[int, dict[str, str]]] = []
        for i, meta in enumerate(metadata):
            if meta and has_personal_data(meta):
                entry = orjson.loads(meta).get(PERSONAL_DATA)
                if isinstance(entry, dict) and isinstance(entry.get("fields"), dict):
                    found.append((i, entry["fields"]))
        if not found:
            return list(data)
        subjects = sorted({s for _, fields in found for s in fields.values()})
        keys = await self._keys(executor, subjects) if self.provider is not None else {}
        opened = list(data)
        for i, fields in found:
            body = orjson.loads(data[i])
            for field, subject in fields.items():
                key = keys.get(subject)
                if key is None:
                    body[field] = REDACTED
                    continue
                try:
                    raw = base64.b64decode(body[field])
                    plain = AESGCM(key).decrypt(raw[:_NONCE], raw[_NONCE:], _aad(event_ids[i], field))
                    body[field] = orjson.loads(plain)
                except (InvalidTag, ValueError, TypeError, KeyError):
                    raise PersonalDataCorrupt(str(event_ids[i]), field) from None
            opened[i] = orjson.dumps(body).decode()
        return opened

    async def reveal(self, executor: Executor, records: list[RecordedEvent]) -> list[RecordedEvent]:
        """`records` with personal fields opened, or `REDACTED` where their subject was forgotten.

        Every reader of the log calls it (through `EventStore.reveal`, or with its own transaction's
        connection); events without personal data cost one substring test.
        """
        if not any(map(operator.contains, map(_METADATA, records), itertools.repeat(_MARKER))):
            return records  # the common case, tested without a Python-level step per event
        found = [i for i, metadata in enumerate(map(_METADATA, records)) if _MARKER in metadata]
        chosen = [records[i] for i in found]
        opened = await self.open(
            executor, [r.event_id for r in chosen], [r.data for r in chosen], [r.metadata for r in chosen]
        )
        result = list(records)
        for i, data in zip(found, opened, strict=True):
            result[i] = records[i]._replace(data=data)
        return result
