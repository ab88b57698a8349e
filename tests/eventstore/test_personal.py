"""Crypto-shredding against the real PostgreSQL: sealed at rest, opened on read, redacted once forgotten."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import pytest
from pydantic import BaseModel

from aggregates import Aggregate, DomainEvent, EventRegistrationError, PersonalData, Repository, applies
from eventstore import (
    REDACTED,
    SUBJECT_FORGOTTEN,
    EventStore,
    MasterKey,
    MasterKeyMismatch,
    NewEvent,
    NoKeyProvider,
    SubjectForgotten,
    UnknownSubject,
    asyncpg_dsn,
    erasure_stream,
)

KEY = MasterKey(b"k" * 32)
EMAIL = "ann.example@mail.example"


class Registered(DomainEvent):
    member_id: str
    email: Annotated[str, PersonalData(subject="member_id")]
    nickname: Annotated[str | None, PersonalData(subject="member_id")] = None
    plan: str = "basic"


class MemberState(BaseModel):
    email: str = ""
    plan: str = ""


class Member(Aggregate[MemberState], category="member", snapshot_every=2):
    def register(self, email: str) -> None:
        self._emit(Registered(member_id=self.id, email=email))

    @applies(Registered)
    def _registered(self, event: Registered) -> None:
        self.state.email = event.email
        self.state.plan = event.plan


async def _raw(url: str, query: str) -> list[str]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return [str(r[0]) for r in await conn.fetch(query)]
    finally:
        await conn.close()


async def test_personal_fields_are_sealed_at_rest_and_redacted_once_forgotten(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store:
        members = Repository(store, Member)
        ann = Member("ann")
        ann.register(EMAIL)
        ann.register(EMAIL)  # two events: the save crosses snapshot_every, so a snapshot holds the e-mail
        saved = await members.save(ann)
        assert saved is not None
        await store.wait_until_visible(saved.checkpoint)
        assert (await members.get("ann")).state.email == EMAIL
        assert EMAIL in (await store.read_stream("member-ann"))[0].data
        assert EMAIL in (await store.read_all())[0].data
        # At rest only ciphertext: the events table never sees the address; the snapshot cache does.
        assert not [d for d in await _raw(database_url, "SELECT data::text FROM events") if EMAIL in d]
        assert await _raw(database_url, "SELECT data::text FROM snapshots WHERE data::text LIKE '%ann.example%'")

        erasure = await store.forget("ann")
        assert erasure.forgotten_now and erasure.snapshots_dropped == 1

        loaded = await members.get("ann")  # still loads, from the events alone
        assert loaded.state.email == REDACTED and loaded.state.plan == "basic"
        for event in [*await store.read_stream("member-ann"), *await store.read_all()]:
            assert EMAIL not in event.data
        assert (await store.read_stream("member-ann"))[0].json()["email"] == REDACTED
        recorded = await store.read_stream(erasure_stream("ann"))
        assert [e.event_type for e in recorded] == [SUBJECT_FORGOTTEN]
        assert recorded[0].json() == {"subject": "ann"}
        assert not await _raw(database_url, "SELECT data::text FROM snapshots")
        assert (await store.forget("ann")).forgotten_now is False  # again: nothing more to do

        # The key is gone for good: new personal data of the subject is refused, and nothing is written.
        before = await store.stream_version("member-ann")
        loaded.register("new@mail.example")
        with pytest.raises(SubjectForgotten):
            await members.save(loaded)
        assert await store.stream_version("member-ann") == before


async def test_bad_input_changes_nothing(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store:
        with pytest.raises(UnknownSubject):
            await store.forget("nobody")
        assert await store.read_all() == []
        await Repository(store, Member).save(_registered("bob"))
    # Another master key: refused at start, before anything is read or written.
    with pytest.raises(MasterKeyMismatch):
        async with EventStore(database_url, keys=MasterKey(b"x" * 32)):
            pass
    # No key at all: personal data reads redacted and cannot be appended.
    async with EventStore(database_url) as keyless:
        assert (await keyless.read_stream("member-bob"))[0].json()["email"] == REDACTED
        with pytest.raises(NoKeyProvider):
            await keyless.append("member-x", [NewEvent("E", {"email": "x"}, personal_data={"email": "x"})])
        assert await keyless.stream_version("member-x") == -1
    assert await _raw(database_url, "SELECT count(*) FROM subject_keys") == ["1"]


def _registered(member_id: str) -> Member:
    member = Member(member_id)
    member.register(f"{member_id}@mail.example")
    return member


async def test_a_retried_append_of_sealed_events_stays_idempotent(store: EventStore, database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as keyed:
        event = NewEvent("Registered", {"member_id": "cy", "email": EMAIL}, personal_data={"email": "cy"})
        first = await keyed.append("member-cy", [event])
        again = await keyed.append("member-cy", [event])
        assert again.duplicate and again.first_position == first.first_position
        async with keyed.unit_of_work() as uow:  # in a unit of work too (inline hooks see the plaintext)
            result = await uow.append("member-dee", [NewEvent("E", {"email": EMAIL}, personal_data={"email": "dee"})])
            assert EMAIL in result.events[0].data


def test_personal_fields_must_accept_the_redacted_value() -> None:
    with pytest.raises(EventRegistrationError, match="redacted"):

        class Aged(DomainEvent):
            member_id: str
            age: Annotated[int, PersonalData(subject="member_id")]

    with pytest.raises(EventRegistrationError, match="whole field type"):

        class Nested(DomainEvent):
            member_id: str
            email: Annotated[str, PersonalData(subject="member_id")] | None = None

    with pytest.raises(EventRegistrationError, match="subject"):

        class Orphan(DomainEvent):
            email: Annotated[str, PersonalData(subject="member_id")]

    assert Registered.personal_fields == {"email": "member_id", "nickname": "member_id"}
