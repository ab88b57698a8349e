"""Course booking with dynamic consistency boundaries: ours beside `eventsourcing.dcb`, on one server.

Every booking reads the five facts the specification's subscription decision needs (course defined, its
capacity, its subscriptions, the student's subscriptions, the pair), decides, and appends a
`StudentSubscribedToCourse` event tagged with the course and the student, on the condition that nothing
matching its query was appended since its read; a failed condition reads and decides again (a
conflict). Eight writers run at once: over 1,000 courses with students drawn from 100,000 (decisions
that almost never overlap), then all on one course. The peer's PostgreSQL recorder takes
`LOCK TABLE ... IN EXCLUSIVE MODE` in each conditional append; ours locks the (type, tag) pairs the
decision involves. After each run the log is checked: no course over capacity, no student twice on a
course, on both sides.

    python -m benchmarks.dcb            # against an embedded server, or EVENTSTORE_DATABASE_URL
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

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


async def _ours(url: str, run: str, courses: int, capacity: int, plan: Plan) -> tuple[float, int]:
    async with EventStore(url, min_connections=WRITERS, max_connections=WRITERS, notify=False) as store:
        decisions = Decisions(store, category="booking")
        for start in range(0, courses, 500):
            await store.append(f"courses-{run}-{start}", [
                NewEvent(DEFINED, {"course": c, "capacity": capacity}, tags=[f"course:{run}-{c}"])
                for c in range(start, min(courses, start + 500))
            ])
        await store.wait_until_visible(await _barrier(store))
        conflicts = 0

        async def writer(bookings: list[tuple[int, int]]) -> None:
            nonlocal conflicts
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

        with Timer() as timer:
            await asyncio.gather(*(writer(bookings) for bookings in plan))
        await store.wait_until_visible(await _barrier(store))
        log: list[tuple[int, int]] = []
        after = START
        while page := await store.read_all(after, limit=10_000, category="booking"):
            mine = (e.json() for e in page if e.tags[0].startswith(f"course:{run}-"))
            log.extend((data["student"], data["course"]) for data in mine)
            after = page[-1].checkpoint
        _check(log, capacity)
        return rate(sum(len(b) for b in plan), timer.seconds), conflicts


async def _barrier(store: EventStore) -> Any:
    return (await store.append("barrier-1", [NewEvent("Barrier")])).checkpoint


def _check(log: list[tuple[int, int]], capacity: int) -> None:
    per_course = Counter(course for _, course in log)
    assert max(per_course.values(), default=0) <= capacity, "a course went over capacity"
    assert len(set(log)) == len(log), "a student subscribed twice to a course"


# -- the peer: eventsourcing.dcb on PostgreSQL -----------------------------------------------------------


def _peer(url: str, run: str, courses: int, capacity: int, plan: Plan) -> tuple[float, int]:
    from eventsourcing.dcb.api import DCBAppendCondition, DCBEvent, DCBQuery, DCBQueryItem
    from eventsourcing.dcb.postgres_tt import PostgresDCBRecorderTT
    from eventsourcing.persistence import IntegrityError
    from eventsourcing.postgres import PostgresDatastore

    parsed = make_url(url)
    datastore = PostgresDatastore(
        parsed.database or "postgres", parsed.host or "127.0.0.1", parsed.port or 5432,
        parsed.username or "postgres", parsed.password or "", pool_size=WRITERS, max_overflow=0,
    )
    try:
        recorder = PostgresDCBRecorderTT(datastore, events_table_name=f"dcb_{run}")
        recorder.create_table()
        recorder = PostgresDCBRecorderTT(datastore, events_table_name=f"dcb_{run}")  # types exist now
        for start in range(0, courses, 500):
            recorder.append([
                DCBEvent(DEFINED, orjson.dumps({"course": c, "capacity": capacity}), [f"course:{c}"])
                for c in range(start, min(courses, start + 500))
            ])
        conflicts = 0
        lock = threading.Lock()

        def writer(bookings: list[tuple[int, int]]) -> None:
            nonlocal conflicts
            for student, course in bookings:
                c, s = f"course:{course}", f"student:{student}"
                query = DCBQuery([
                    DCBQueryItem([DEFINED], [c]), DCBQueryItem([SUBSCRIBED], [c]),
                    DCBQueryItem([SUBSCRIBED], [s]), DCBQueryItem([SUBSCRIBED], [c, s]),
                ])
                while True:
                    cap = on_course = pair = 0
                    last = 0
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
                        with lock:
                            conflicts += 1

        threads = [threading.Thread(target=writer, args=(bookings,)) for bookings in plan]
        with Timer() as timer:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        log = [
            (orjson.loads(e.event.data)["student"], orjson.loads(e.event.data)["course"])
            for e in recorder.read(DCBQuery([DCBQueryItem([SUBSCRIBED], [])]))
        ]
        _check(log, capacity)
        return rate(sum(len(b) for b in plan), timer.seconds), conflicts
    finally:
        datastore.close()


# -- the table ------------------------------------------------------------------------------------------


async def _rounds(
    name: str, ours: Callable[[str], Awaitable[tuple[float, int]]], peer: Callable[[str], tuple[float, int]]
) -> list[Result]:
    our_rates, peer_rates, our_conflicts, peer_conflicts = [], [], [], []
    for i in range(ROUNDS + 1):  # the first round warms up
        rate_o, conflicts_o = await ours(f"r{i}")
        rate_p, conflicts_p = await asyncio.to_thread(peer, f"r{i}")
        if i:
            our_rates.append(rate_o)
            peer_rates.append(rate_p)
            our_conflicts.append(conflicts_o)
            peer_conflicts.append(conflicts_p)
    return [
        Result(name, statistics.median(our_rates), UNIT, statistics.median(peer_rates)),
        Result(f"{name}: conflicts", statistics.median(our_conflicts), "retries per run",
               statistics.median(peer_conflicts)),
    ]


async def run(server_url: str) -> list[Result]:
    results: list[Result] = []
    async with fresh_database(server_url) as url:
        spread = _plan(1, COURSES, BOOKINGS_PER_WRITER)
        results += await _rounds(
            f"{WRITERS} writers, {COURSES:,} courses",
            lambda r: _ours(url, r, COURSES, CAPACITY, spread),
            lambda r: _peer(url, r, COURSES, CAPACITY, spread),
        )
        fight = _plan(2, 1, ONE_COURSE_BOOKINGS_PER_WRITER)
        one_capacity = WRITERS * ONE_COURSE_BOOKINGS_PER_WRITER // 2  # it fills up halfway through
        results += await _rounds(
            f"{WRITERS} writers, 1 course",
            lambda r: _ours(url, f"one{r}", 1, one_capacity, fight),
            lambda r: _peer(url, f"one{r}", 1, one_capacity, fight),
        )
    return results


def main() -> None:
    from eventstore.embedded import database_url

    explicit = os.environ.get("EVENTSTORE_DATABASE_URL")
    if explicit:
        rows = asyncio.run(run(explicit))
    else:
        with database_url() as url:
            rows = asyncio.run(run(url))
    print(f"{'benchmark':<40} {'ours':>10} {'peer':>10} {'ratio':>7}  unit")
    for r in rows:
        ratio = f"{r.ours / r.peer:.1f}x" if r.peer else "-"
        print(f"{r.name:<40} {r.ours:>10,.1f} {r.peer or 0:>10,.1f} {ratio:>7}  {r.unit}")


if __name__ == "__main__":
    main()
