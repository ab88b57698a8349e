"""Course booking with dynamic consistency boundaries: ours beside `eventsourcing.dcb`, on one server.

Every booking reads the five facts the specification's subscription decision needs (course defined, its
capacity, its subscriptions, the student's subscriptions, the pair), decides, and appends a
`StudentSubscribedToCourse` event tagged with the course and the student, on the condition that nothing
matching its query was appended since its read; a failed condition reads and decides again (a
conflict). Eight writers run at once, as tasks of one process (threads for the peer) and as eight
processes on either side: over 1,000 courses with students drawn from 100,000 (decisions that almost
never overlap), then all on one course. Each figure is the median of 3 rounds after a warm-up round.
The peer's PostgreSQL recorder takes `LOCK TABLE ... IN EXCLUSIVE MODE` in each conditional append;
ours locks the (type, tag) pairs the decision involves. After each round both logs are checked: no
course over capacity, no student twice on a course.

    python -m benchmarks.dcb            # against an embedded server, or EVENTSTORE_DATABASE_URL
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Literal, get_args

import orjson
from sqlalchemy.engine import make_url

from aggregates import DecisionProjection, Decisions
from benchmarks.common import Result, Timer, fresh_database, rate
from eventstore import START, EventStore, NewEvent, Query, QueryItem, RecordedEvent

WRITERS = 8
COURSES = 1_000
STUDENTS = 100_000
CAPACITY = 30
BOOKINGS_PER_WRITER = 150
ONE_COURSE_BOOKINGS_PER_WRITER = 40
ROUNDS = 3
UNIT = "bookings/s"

DEFINED = "CourseDefined"
SUBSCRIBED = "StudentSubscribedToCourse"


Plan = list[list[tuple[int, int]]]
"""Per writer, the (student, course) pairs it books in turn."""


class Full(Exception):
    """The decision says no: the course is full, or the student is on it already."""


def _plan(seed: int, courses: int, per_writer: int) -> Plan:
    rng = random.Random(seed)
    return [[(rng.randrange(STUDENTS), rng.randrange(courses)) for _ in range(per_writer)] for _ in range(WRITERS)]


# -- ours -----------------------------------------------------------------------------------------------


def _count(state: int, _: RecordedEvent) -> int:
    return state + 1


def _capacity(_: int, event: RecordedEvent) -> int:
    return int(event.json()["capacity"])


def _subscription(run: str, student: int, course: int) -> dict[str, DecisionProjection[Any]]:
    c, s = f"course:{run}-{course}", f"student:{run}-{student}"
    return {
        "capacity": DecisionProjection(Query.of([DEFINED], [c]), 0, _capacity),
        "course": DecisionProjection(Query.of([SUBSCRIBED], [c]), 0, _count),
        "student": DecisionProjection(Query.of([SUBSCRIBED], [s]), 0, _count),
        "pair": DecisionProjection(Query(QueryItem([SUBSCRIBED], [c, s])), 0, _count),
    }


async def _define_ours(url: str, run: str, courses: int, capacity: int) -> None:
    async with EventStore(url, notify=False) as store:
        for start in range(0, courses, 500):
            await store.append(f"courses-{run}-{start}", [
                NewEvent(DEFINED, {"course": c, "capacity": capacity}, tags=[f"course:{run}-{c}"])
                for c in range(start, min(courses, start + 500))
            ])
        await store.wait_until_visible(await store.last_committed())


async def _our_writer(decisions: Decisions, run: str, bookings: list[tuple[int, int]]) -> int:
    """Book in turn; return the conflicts (decisions made again)."""
    conflicts = 0
    for student, course in bookings:
        attempts = 0

        def decide(state: Mapping[str, Any], student: int = student, course: int = course) -> list[NewEvent]:
            nonlocal attempts
            attempts += 1
            if state["pair"] or state["course"] >= state["capacity"]:
                raise Full
            return [NewEvent(SUBSCRIBED, {"student": student, "course": course},
                             tags=[f"course:{run}-{course}", f"student:{run}-{student}"])]

        with contextlib.suppress(Full):
            await decisions.execute(_subscription(run, student, course), decide, retries=1_000)
        conflicts += attempts - 1
    return conflicts


async def _ours_in_process(url: str, run: str, plan: Plan) -> tuple[float, int]:
    async with EventStore(url, min_connections=WRITERS, max_connections=WRITERS, notify=False) as store:
        decisions = Decisions(store, category="booking")
        with Timer() as timer:
            conflicts = await asyncio.gather(*(_our_writer(decisions, run, bookings) for bookings in plan))
    return timer.seconds, sum(conflicts)


def _ours_process(url: str, run: str, bookings: list[tuple[int, int]], start_at: float) -> tuple[float, int]:
    async def go() -> tuple[float, int]:
        async with EventStore(url, min_connections=1, max_connections=1, notify=False) as store:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            conflicts = await _our_writer(Decisions(store, category="booking"), run, bookings)
            return time.time(), conflicts

    return asyncio.run(go())


async def _check_ours(url: str, run: str, capacity: int) -> None:
    async with EventStore(url, notify=False) as store:
        await store.wait_until_visible(await store.last_committed())
        log: list[tuple[int, int]] = []
        after = START
        while page := await store.read_all(after, limit=10_000, category="booking"):
            mine = (e.json() for e in page if e.tags[0].startswith(f"course:{run}-"))
            log.extend((data["student"], data["course"]) for data in mine)
            after = page[-1].checkpoint
    _check(log, capacity)


def _check(log: list[tuple[int, int]], capacity: int) -> None:
    per_course = Counter(course for _, course in log)
    assert max(per_course.values(), default=0) <= capacity, "a course went over capacity"
    assert len(set(log)) == len(log), "a student subscribed twice to a course"


# -- the peer: eventsourcing.dcb on PostgreSQL -----------------------------------------------------------


def _peer_recorder(url: str, run: str, connections: int) -> tuple[Any, Any]:
    from eventsourcing.dcb.postgres_tt import PostgresDCBRecorderTT
    from eventsourcing.postgres import PostgresDatastore

    parsed = make_url(url)
    datastore = PostgresDatastore(
        parsed.database or "postgres", parsed.host or "127.0.0.1", parsed.port or 5432,
        parsed.username or "postgres", parsed.password or "", pool_size=connections, max_overflow=0,
    )
    recorder = PostgresDCBRecorderTT(datastore, events_table_name=f"dcb_{run}")
    return datastore, recorder


def _define_peer(url: str, run: str, courses: int, capacity: int) -> None:
    from eventsourcing.dcb.api import DCBEvent

    datastore, recorder = _peer_recorder(url, run, 1)
    try:
        recorder.create_table()
        _, recorder = _peer_recorder(url, run, 1)  # the composite types exist now
        for start in range(0, courses, 500):
            recorder.append([
                DCBEvent(DEFINED, orjson.dumps({"course": c, "capacity": capacity}), [f"course:{c}"])
                for c in range(start, min(courses, start + 500))
            ])
    finally:
        datastore.close()


def _peer_writer(recorder: Any, bookings: list[tuple[int, int]]) -> int:
    from eventsourcing.dcb.api import DCBAppendCondition, DCBEvent, DCBQuery, DCBQueryItem
    from eventsourcing.persistence import IntegrityError

    conflicts = 0
    for student, course in bookings:
        c, s = f"course:{course}", f"student:{student}"
        query = DCBQuery([
            DCBQueryItem([DEFINED], [c]), DCBQueryItem([SUBSCRIBED], [c]),
            DCBQueryItem([SUBSCRIBED], [s]), DCBQueryItem([SUBSCRIBED], [c, s]),
        ])
        while True:
            cap = on_course = pair = last = 0
            for sequenced in recorder.read(query):
                event = sequenced.event
                last = sequenced.position
                if event.type == DEFINED:
                    cap = orjson.loads(event.data)["capacity"]
                elif c in event.tags:
                    on_course += 1
                    pair += s in event.tags
            if pair or on_course >= cap:
                break
            data = orjson.dumps({"student": student, "course": course})
            try:
                recorder.append([DCBEvent(SUBSCRIBED, data, [c, s])], DCBAppendCondition(query, last))
                break
            except IntegrityError:
                conflicts += 1
    return conflicts


def _peer_in_process(url: str, run: str, plan: Plan) -> tuple[float, int]:
    datastore, recorder = _peer_recorder(url, run, WRITERS)
    try:
        conflicts: list[int] = []
        threads = [threading.Thread(target=lambda b=b: conflicts.append(_peer_writer(recorder, b))) for b in plan]
        with Timer() as timer:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return timer.seconds, sum(conflicts)
    finally:
        datastore.close()


def _peer_process(url: str, run: str, bookings: list[tuple[int, int]], start_at: float) -> tuple[float, int]:
    datastore, recorder = _peer_recorder(url, run, 1)
    try:
        recorder.read(DCBQueryAll())  # connected before the start
        time.sleep(max(0.0, start_at - time.time()))
        conflicts = _peer_writer(recorder, bookings)
        return time.time(), conflicts
    finally:
        datastore.close()


def DCBQueryAll() -> Any:
    from eventsourcing.dcb.api import DCBQuery, DCBQueryItem

    return DCBQuery([DCBQueryItem([DEFINED], ["course:0"])])


def _check_peer(url: str, run: str, capacity: int) -> None:
    from eventsourcing.dcb.api import DCBQuery, DCBQueryItem

    datastore, recorder = _peer_recorder(url, run, 1)
    try:
        log = [
            (orjson.loads(e.event.data)["student"], orjson.loads(e.event.data)["course"])
            for e in recorder.read(DCBQuery([DCBQueryItem([SUBSCRIBED], [])]))
        ]
    finally:
        datastore.close()
    _check(log, capacity)


# -- the table ------------------------------------------------------------------------------------------

Outcome = tuple[tuple[float, int], tuple[float, int]]
"""(bookings/s, conflicts) of ours, then of the peer."""

Mode = Literal["tasks", "processes"]
"""8 writers as tasks (ours) or threads (peer) of one process, or as 8 processes on either side."""


async def _one_round(
    url: str, run: str, courses: int, capacity: int, plan: Plan, mode: Mode, pool: ProcessPoolExecutor
) -> Outcome:
    """(bookings/s, conflicts) for ours, then for the peer, on fresh courses."""
    bookings = sum(len(b) for b in plan)
    loop = asyncio.get_running_loop()
    await _define_ours(url, run, courses, capacity)
    await asyncio.to_thread(_define_peer, url, run, courses, capacity)
    outcomes = []
    for side in ("ours", "peer"):
        if mode == "tasks":
            if side == "ours":
                seconds, conflicts = await _ours_in_process(url, run, plan)
            else:
                seconds, conflicts = await asyncio.to_thread(_peer_in_process, url, run, plan)
        else:
            start_at = time.time() + 1.0  # every process connected and waiting by then
            target = _ours_process if side == "ours" else _peer_process
            done = await asyncio.gather(
                *(loop.run_in_executor(pool, target, url, run, b, start_at) for b in plan)
            )
            seconds, conflicts = max(end for end, _ in done) - start_at, sum(c for _, c in done)
        outcomes.append((rate(bookings, seconds), conflicts))
    await _check_ours(url, run, capacity)
    await asyncio.to_thread(_check_peer, url, run, capacity)
    return outcomes[0], outcomes[1]


async def _rounds(name: str, rounds: Callable[[str], Awaitable[Outcome]]) -> list[Result]:
    ours: list[tuple[float, int]] = []
    peer: list[tuple[float, int]] = []
    for i in range(ROUNDS + 1):  # the first round warms up
        o, p = await rounds(f"r{i}")
        if i:
            ours.append(o)
            peer.append(p)
    return [
        Result(name, statistics.median(r for r, _ in ours), UNIT, statistics.median(r for r, _ in peer)),
        Result(f"{name}: conflicts", statistics.median(c for _, c in ours), "decisions made again per run",
               statistics.median(c for _, c in peer)),
    ]


async def run(server_url: str) -> list[Result]:
    results: list[Result] = []
    spread = _plan(1, COURSES, BOOKINGS_PER_WRITER)
    fight = _plan(2, 1, ONE_COURSE_BOOKINGS_PER_WRITER)
    one_capacity = WRITERS * ONE_COURSE_BOOKINGS_PER_WRITER // 2  # it fills up halfway through
    with ProcessPoolExecutor(WRITERS, mp_context=multiprocessing.get_context("spawn")) as pool:
        async with fresh_database(server_url) as url:
            for mode in get_args(Mode):

                def spread_round(r: str, mode: Mode = mode) -> Awaitable[Outcome]:
                    return _one_round(url, f"{mode}{r}", COURSES, CAPACITY, spread, mode, pool)

                def fight_round(r: str, mode: Mode = mode) -> Awaitable[Outcome]:
                    return _one_round(url, f"{mode}one{r}", 1, one_capacity, fight, mode, pool)

                results += await _rounds(f"{WRITERS} writers ({mode}), {COURSES:,} courses", spread_round)
                results += await _rounds(f"{WRITERS} writers ({mode}), 1 course", fight_round)
    return results


def main() -> None:
    from eventstore.embedded import database_url

    explicit = os.environ.get("EVENTSTORE_DATABASE_URL")
    if explicit:
        rows = asyncio.run(run(explicit))
    else:
        with database_url() as url:
            rows = asyncio.run(run(url))
    print(f"{'benchmark':<44} {'ours':>10} {'peer':>10} {'ratio':>7}  unit")
    for r in rows:
        ratio = f"{r.ours / r.peer:.1f}x" if r.peer else "-"
        print(f"{r.name:<44} {r.ours:>10,.1f} {r.peer or 0:>10,.1f} {ratio:>7}  {r.unit}")


if __name__ == "__main__":
    main()
