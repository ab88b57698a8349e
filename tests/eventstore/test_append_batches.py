"""Concurrent appends outside units of work go out in batches once `append_lanes` statements are in
flight: one statement and one transaction for many callers. Each append must keep what it has alone:
its own outcome (version check, duplicate ids, a retired stream), atomicity, no wait behind a lock
taken elsewhere, exactly once after a lost connection, and the store's stop letting it finish."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter

import asyncpg
import pytest

from eventstore import (
    AppendTimedOut,
    DuplicateEventId,
    EventStore,
    EventStoreError,
    NewEvent,
    StreamState,
    StreamTombstoned,
    WrongExpectedVersion,
    asyncpg_dsn,
    lifecycle,
)


def _shared_transactions(results: list[object]) -> int:
    """How many appends shared a transaction with another (a batch writes them in one)."""
    counts = Counter(getattr(r, "log_xid") for r in results)  # noqa: B009 - results of mixed types
    return sum(n for n in counts.values() if n > 1)


async def test_concurrent_appends_go_in_batches_each_with_its_own_result(database_url: str) -> None:
    async with EventStore(database_url, max_connections=20, append_lanes=1) as store:
        results = await asyncio.gather(
            *(store.append(f"batch-{i}", [NewEvent("Added", {"i": i, "n": n}) for n in range(1 + i % 3)])
              for i in range(60))
        )
        assert _shared_transactions(list(results)) > 0  # batches were sent
        for i, result in enumerate(results):
            assert result.stream_id == f"batch-{i}"
            assert result.next_expected_version == i % 3
            assert [e.stream_version for e in result.events] == list(range(1 + i % 3))
            assert [e.json()["i"] for e in result.events] == [i] * (1 + i % 3)
            stored = await store.read_stream(f"batch-{i}", 0)
            assert [(e.event_id, e.position, e.log_xid) for e in stored] == [
                (e.event_id, e.position, e.log_xid) for e in result.events
            ]
        log = await store.read_all(limit=1000)
        assert len(log) == sum(1 + i % 3 for i in range(60))
        assert len({e.position for e in log}) == len(log)


async def test_a_wrong_expected_version_fails_only_its_own_append(database_url: str) -> None:
    async with EventStore(database_url, max_connections=20, append_lanes=1) as store:
        for i in range(40):
            await store.append(f"acct-{i}", [NewEvent("Opened")])

        async def one(i: int) -> object:
            expected = 0 if i % 2 else 5  # the odd ones expect the right version
            try:
                return await store.append(f"acct-{i}", [NewEvent("Deposited", {"i": i})], expected)
            except WrongExpectedVersion as exc:
                return exc

        outcomes = await asyncio.gather(*(one(i) for i in range(40)))
        assert store._batch_counts["sent"] >= 1 and not store._batch_counts["failed"]
        for i, outcome in enumerate(outcomes):
            if i % 2:
                assert not isinstance(outcome, Exception) and outcome.next_expected_version == 1  # type: ignore[attr-defined]
                assert await store.stream_version(f"acct-{i}") == 1
            else:
                assert isinstance(outcome, WrongExpectedVersion) and outcome.actual == 0
                assert await store.stream_version(f"acct-{i}") == 0


async def test_a_retired_stream_in_a_batch_gets_its_error_and_the_others_are_written(database_url: str) -> None:
    async with EventStore(database_url, max_connections=20, append_lanes=1) as store:
        await store.append("gone-1", [NewEvent("Opened")])
        await lifecycle.tombstone(store, "gone-1")

        async def one(i: int) -> object:
            stream = "gone-1" if i == 7 else f"live-{i}"
            try:
                return await store.append(stream, [NewEvent("X", {"i": i})])
            except StreamTombstoned as exc:
                return exc

        outcomes = await asyncio.gather(*(one(i) for i in range(20)))
        assert isinstance(outcomes[7], StreamTombstoned)
        assert store._batch_counts["failed appends"] == 1  # it alone was sent again, and met its error
        for i, outcome in enumerate(outcomes):
            if i != 7:
                assert not isinstance(outcome, Exception)
                assert [e.json() for e in await store.read_stream(f"live-{i}", 0)] == [{"i": i}]


async def test_duplicate_event_ids_across_appends_of_one_batch(database_url: str) -> None:
    async with EventStore(database_url, max_connections=20, append_lanes=1) as store:
        shared = uuid.uuid4()

        async def one(i: int) -> object:
            event_id = shared if i in (3, 9) else uuid.uuid4()
            try:
                return await store.append(f"dup-{i}", [NewEvent("X", {"i": i}, event_id=event_id)])
            except DuplicateEventId as exc:
                return exc

        outcomes = await asyncio.gather(*(one(i) for i in range(16)))
        refused = [i for i, o in enumerate(outcomes) if isinstance(o, DuplicateEventId)]
        assert store._batch_counts["sent"] >= 1  # the second finds the first's event in the same batch
        assert len(refused) == 1 and refused[0] in (3, 9)
        written = [e for e in await store.read_all(limit=100) if e.event_id == shared]
        assert len(written) == 1 and written[0].stream_id == f"dup-{({3, 9} - set(refused)).pop()}"
        assert len(await store.read_all(limit=100)) == 15


async def test_the_same_stream_twice_at_once_gets_consecutive_versions(database_url: str) -> None:
    async with EventStore(database_url, max_connections=20, append_lanes=1) as store:
        results = await asyncio.gather(*(store.append("same-1", [NewEvent("X", {"i": i})]) for i in range(30)))
        assert sorted(r.next_expected_version for r in results) == list(range(30))
        assert [e.stream_version for e in await store.read_stream("same-1", 0)] == list(range(30))


async def test_an_append_never_waits_behind_a_lock_taken_by_a_unit_of_work(database_url: str) -> None:
    """A batch that meets a lock held elsewhere gives up at once: its other appends go alone and finish
    while the unit of work holding the lock is still open."""
    async with EventStore(database_url, max_connections=30, append_lanes=1) as store:
        await store.append("held-1", [NewEvent("Opened")])
        async with store.unit_of_work() as uow:
            await uow.append("held-1", [NewEvent("InUnit")], 0)  # holds the stream's row until commit
            blocked = asyncio.ensure_future(store.append("held-1", [NewEvent("Later")]))
            others = [asyncio.ensure_future(store.append(f"free-{i}", [NewEvent("X")])) for i in range(20)]
            done = await asyncio.wait_for(asyncio.gather(*others), 20)  # the unit of work is still open
            assert store._batch_counts["sent"] >= 1
            assert all(r.next_expected_version == 0 for r in done)
            assert not blocked.done()
        later = await asyncio.wait_for(blocked, 20)
        assert later.next_expected_version == 2
        assert [e.event_type for e in await store.read_stream("held-1", 0)] == ["Opened", "InUnit", "Later"]


async def test_a_cancelled_caller_waiting_for_a_batch_writes_nothing_and_the_rest_go_on(database_url: str) -> None:
    async with EventStore(database_url, max_connections=20, append_lanes=1) as store:
        first = asyncio.ensure_future(store.append("c-first", [NewEvent("X")]))
        await asyncio.sleep(0)  # it takes the lane
        waiting = [asyncio.ensure_future(store.append(f"c-{i}", [NewEvent("X")])) for i in range(10)]
        await asyncio.sleep(0)  # they wait for the batch
        waiting[4].cancel()
        results = await asyncio.gather(first, *waiting, return_exceptions=True)
        assert isinstance(results[5], asyncio.CancelledError)
        streams = {e.stream_id for e in await store.read_all(limit=100)}
        assert streams == {"c-first"} | {f"c-{i}" for i in range(10) if i != 4}


async def test_a_batch_whose_connection_dies_writes_each_append_exactly_once(database_url: str) -> None:
    async with EventStore(database_url, max_connections=20, append_lanes=1) as store:
        admin = await asyncpg.connect(asyncpg_dsn(database_url))
        killed = 0
        ids: list[uuid.UUID] = []
        rounds = 0
        try:

            async def killer() -> None:
                nonlocal killed
                for _ in range(30):
                    pids = await admin.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND pid <> pg_backend_pid() AND state = 'active'"
                        " AND query LIKE 'SELECT * FROM eventstore_append_batch(%'"
                    )
                    for row in pids:
                        killed += await admin.fetchval("SELECT pg_terminate_backend($1)", row["pid"])
                    await asyncio.sleep(0.002)

            while not killed and rounds < 5:  # until a batch was killed in flight
                batch_ids = [uuid.uuid4() for _ in range(200)]
                kill = asyncio.ensure_future(killer())
                results = await asyncio.gather(*(
                    store.append(f"k{rounds}-{i % 50}", [NewEvent("X", {"i": i}, event_id=batch_ids[i])])
                    for i in range(200)
                ))
                await kill
                assert len(results) == 200
                ids += batch_ids
                rounds += 1
        finally:
            await admin.close()
        assert killed and store._batch_counts["failed"]
        log = await store.read_all(limit=5000)
        assert sorted(e.event_id for e in log) == sorted(ids)  # every append once, none twice
        for r in range(rounds):
            for s in range(50):
                assert [e.stream_version for e in await store.read_stream(f"k{r}-{s}", 0)] == [0, 1, 2, 3]


async def test_stop_lets_appends_waiting_for_a_batch_finish(database_url: str) -> None:
    store = EventStore(database_url, max_connections=10, append_lanes=1)
    await store.start()
    tasks = [asyncio.ensure_future(store.append(f"st-{i}", [NewEvent("X")])) for i in range(40)]
    await asyncio.sleep(0)
    await asyncio.wait_for(store.stop(), 30)
    results = await asyncio.gather(*tasks)
    assert len(results) == 40
    async with EventStore(database_url) as again:
        assert {e.stream_id for e in await again.read_all(limit=100)} == {f"st-{i}" for i in range(40)}


async def test_a_database_without_the_batch_append_gets_appends_one_by_one(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(
            "DROP FUNCTION eventstore_append_batch(text[], bigint[], int[], uuid[], text[], jsonb[], jsonb[])"
        )
    finally:
        await conn.close()
    for check in (True, False):  # checked at start, or found missing by the first batch
        async with EventStore(database_url, max_connections=20, append_lanes=1, check_schema=check) as store:
            results = await asyncio.gather(*(store.append(f"old{check}-{i}", [NewEvent("X")]) for i in range(30)))
            assert _shared_transactions(list(results)) == 0
            assert len({r.log_xid for r in results}) == 30


@pytest.mark.parametrize("lanes", [-1, 1.5, True, "2"])
async def test_append_lanes_must_be_a_count(database_url: str, lanes: object) -> None:
    from eventstore import InvalidArgument

    with pytest.raises(InvalidArgument, match="append_lanes"):
        EventStore(database_url, append_lanes=lanes)  # type: ignore[arg-type]


async def test_no_batches_with_append_lanes_zero(database_url: str) -> None:
    async with EventStore(database_url, max_connections=20, append_lanes=0) as store:
        results = await asyncio.gather(*(store.append(f"z-{i}", [NewEvent("X")]) for i in range(30)))
        assert _shared_transactions(list(results)) == 0


async def test_expected_states_in_a_batch(database_url: str) -> None:
    async with EventStore(database_url, max_connections=20, append_lanes=1) as store:
        await store.append("exists-1", [NewEvent("X")])
        cases = {
            "exists-1": (StreamState.NO_STREAM, False),
            "new-1": (StreamState.NO_STREAM, True),
            "new-2": (StreamState.STREAM_EXISTS, False),
            "new-3": (StreamState.ANY, True),
        }

        async def one(stream: str, state: StreamState) -> bool:
            try:
                await store.append(stream, [NewEvent("Y")], state)
            except WrongExpectedVersion:
                return False
            return True

        outcomes = await asyncio.gather(*(one(s, st) for s, (st, _) in cases.items()))
        assert outcomes == [ok for _, ok in cases.values()]
        assert await store.stream_version("new-2") == -1
        assert await store.stream_version("exists-1") == 0


async def test_locks_held_elsewhere_hold_up_a_batch_once_not_once_per_stream(database_url: str) -> None:
    """Ten streams locked by units of work that commit one after another, 20 ms apart, in one batch with
    free ones: each wait is short, but the batch stops waiting for locks once it has spent its budget
    (the locked appends then fail at once and go alone), so the free appends are written while locks
    are still held, not after the last of them."""
    async with EventStore(database_url, max_connections=40, append_lanes=1) as store:
        for i in range(11):
            await store.append(f"h-{i}", [NewEvent("Opened")])
        units = []
        for i in range(11):
            unit = store.unit_of_work()
            uow = await unit.__aenter__()
            await uow.append(f"h-{i}", [NewEvent("Held")], 0)
            units.append(unit)
        occupant = asyncio.ensure_future(store.append("h-10", [NewEvent("Later")]))  # takes the lane, waits
        await asyncio.sleep(0)
        held = [asyncio.ensure_future(store.append(f"h-{i}", [NewEvent("Later")])) for i in range(10)]
        free = [asyncio.ensure_future(store.append(f"f-{i}", [NewEvent("X")])) for i in range(10)]
        await asyncio.sleep(0.05)  # the lane is given up, the batch sent

        async def release() -> None:
            for unit in units[:10]:
                await asyncio.sleep(0.02)
                await unit.__aexit__(None, None, None)

        releasing = asyncio.ensure_future(release())
        try:
            done = await asyncio.wait_for(asyncio.gather(*free), 20)
            assert not releasing.done()  # written while units of work still held their locks
        finally:
            await releasing  # (on failure too: appends waiting on the locks would keep the store from stopping)
            await units[10].__aexit__(None, None, None)
        assert [r.next_expected_version for r in done] == [0] * 10
        assert store._batch_counts["failed appends"] >= 1
        results = await asyncio.wait_for(asyncio.gather(occupant, *held), 20)
        assert all(r.next_expected_version == 2 for r in results)
        for i in range(11):
            assert [e.event_type for e in await store.read_stream(f"h-{i}", 0)] == ["Opened", "Held", "Later"]


async def test_a_caller_that_gives_up_while_its_batch_waits_for_a_connection_writes_nothing(
    database_url: str,
) -> None:
    async with EventStore(database_url, max_connections=4, append_lanes=1) as store:
        taken = [await store.pool.acquire() for _ in range(4)]  # the pool is empty: every statement waits
        try:
            first = asyncio.ensure_future(store.append("w-first", [NewEvent("X")]))
            await asyncio.sleep(0)
            others = [asyncio.ensure_future(store.append(f"w-{i}", [NewEvent("X")])) for i in range(5)]
            await asyncio.sleep(0.2)  # the lane was given up: the batch waits for a connection
            others[2].cancel()
        finally:
            for conn in taken:
                await store.pool.release(conn)
        results = await asyncio.gather(first, *others, return_exceptions=True)
        assert isinstance(results[3], asyncio.CancelledError)
        assert {e.stream_id for e in await store.read_all(limit=100)} == {"w-first"} | {
            f"w-{i}" for i in range(5) if i != 2
        }


async def test_a_caller_giving_up_while_its_batch_is_in_flight_changes_no_other_outcome(database_url: str) -> None:
    """The batch has committed on the server while the client's loop was busy; a caller of it gives up
    then. The others get the results of their own writes (never `duplicate=True`), and nothing is
    written twice."""
    async with EventStore(database_url, max_connections=10, append_lanes=1) as store:
        duplicates = 0
        for r in range(20):
            filler = asyncio.ensure_future(store.append(f"fill-{r}", [NewEvent("F")]))  # takes the lane
            await asyncio.sleep(0)
            victim = asyncio.ensure_future(store.append(f"victim-{r}", [NewEvent("V")]))
            others = [
                asyncio.ensure_future(store.append(f"o-{r}-{i}", [NewEvent("O")], StreamState.NO_STREAM))
                for i in range(5)
            ]
            await filler
            for _ in range(1000):  # until the lane's task sends the batch
                if store._batch_tasks:
                    break
                await asyncio.sleep(0)
            await asyncio.sleep(0.001)
            time.sleep(0.03)  # noqa: ASYNC251 - the loop is busy meanwhile: the server commits the batch
            victim.cancel()
            results = await asyncio.gather(*others)
            duplicates += sum(r.duplicate for r in results)
            with contextlib.suppress(asyncio.CancelledError):
                await victim
        assert duplicates == 0
        log = await store.read_all(limit=1000)
        assert len({e.event_id for e in log}) == len(log)
        assert {e.stream_id for e in log} >= {f"o-{r}-{i}" for r in range(20) for i in range(5)}


async def test_a_batch_past_its_time_does_not_try_its_remaining_appends(database_url: str) -> None:
    """Thirty streams locked by one unit of work, in a batch with free ones: once the batch has used
    its time on the first lock, it tries none of the rest (each would wait again); they go alone."""
    async with EventStore(database_url, max_connections=60, append_lanes=1) as store:
        for i in range(30):
            await store.append(f"a-{i:02}", [NewEvent("Opened")])
        async with store.unit_of_work() as uow:
            for i in range(30):
                await uow.append(f"a-{i:02}", [NewEvent("Held")], 0)
            occupant = asyncio.ensure_future(store.append("z-occupant", [NewEvent("X")]))
            await asyncio.sleep(0)
            held = [asyncio.ensure_future(store.append(f"a-{i:02}", [NewEvent("Later")])) for i in range(30)]
            free = [asyncio.ensure_future(store.append(f"b-{i}", [NewEvent("X")])) for i in range(3)]
            done = await asyncio.wait_for(asyncio.gather(occupant, *free), 20)  # the unit of work is open
            assert [r.next_expected_version for r in done] == [0] * 4
            assert store._batch_counts["late appends"] > 0
            assert store._batch_counts["failed appends"] < 30
        results = await asyncio.wait_for(asyncio.gather(*held), 20)
        assert all(r.next_expected_version == 2 for r in results)


@pytest.mark.parametrize("lanes", [0, 1])
@pytest.mark.parametrize("setting", ["lock_timeout = '5ms'", "statement_timeout = '100ms'"])
async def test_a_timeout_of_the_database_is_a_typed_error_and_writes_nothing(
    database_url: str, lanes: int, setting: str
) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(f"ALTER DATABASE {conn._params.database} SET {setting}")
    finally:
        await conn.close()
    async with EventStore(database_url, max_connections=10, append_lanes=lanes) as store:
        await store.append("held", [NewEvent("Opened")])
        async with store.unit_of_work() as uow:
            await uow.append("held", [NewEvent("InUnit")], 0)
            outcomes = await asyncio.gather(
                store.append("held", [NewEvent("Later")]),
                *(store.append(f"free-{i}", [NewEvent("X")]) for i in range(5)),
                return_exceptions=True,
            )
        assert isinstance(outcomes[0], AppendTimedOut) and isinstance(outcomes[0], EventStoreError)
        assert all(not isinstance(o, BaseException) for o in outcomes[1:])
        assert [e.event_type for e in await store.read_stream("held", 0)] == ["Opened", "InUnit"]


async def test_a_burst_on_one_stream_is_looked_at_once_per_append(database_url: str) -> None:
    """Each batch takes one append of a stream; the others of that stream go alone at once instead of
    being set aside and looked at again for every batch (a loop of N x N steps for N appends)."""
    async with EventStore(database_url, max_connections=20, append_lanes=1) as store:
        looked = 0
        next_batch = store._next_batch

        def counting() -> list[object]:
            nonlocal looked
            looked += len(store._queue)
            return next_batch()  # type: ignore[return-value]

        store._next_batch = counting  # type: ignore[method-assign]
        occupant = asyncio.ensure_future(store.append("other-1", [NewEvent("X")]))  # takes the lane
        await asyncio.sleep(0)
        results = await asyncio.gather(*(store.append("hot-1", [NewEvent("X", {"i": i})]) for i in range(1000)))
        await occupant
        assert sorted(r.next_expected_version for r in results) == list(range(1000))
        assert 0 < looked < 5_000  # it was about 500,000
        assert not store._stuck and not store._queue and store._lanes_busy == 0
