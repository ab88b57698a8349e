"""The examples of the dcb.events specification as decisions, and checks of their invariants over the log.

Every name carries a run prefix, so that examples sharing one database never see each other's events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aggregates import DecisionProjection
from eventstore import NewEvent, Query, QueryItem, RecordedEvent

MAX_COURSES_PER_STUDENT = 3


class Refused(Exception):
    """The domain says no (not a conflict: retrying would not help)."""


def _count(state: int, _: RecordedEvent) -> int:
    return state + 1


def _true(_: bool, __: RecordedEvent) -> bool:
    return True


def _capacity(_: int, event: RecordedEvent) -> int:
    return int(event.json()["capacity"])


# -- course subscriptions: a course's capacity and a per-student limit -------------------------------


@dataclass(frozen=True)
class Courses:
    run: str

    @property
    def defined(self) -> str:
        return f"CourseDefined{self.run}"

    @property
    def capacity_changed(self) -> str:
        return f"CourseCapacityChanged{self.run}"

    @property
    def subscribed(self) -> str:
        return f"StudentSubscribedToCourse{self.run}"

    def course(self, c: int) -> str:
        return f"course:{self.run}-{c}"

    def student(self, s: int) -> str:
        return f"student:{self.run}-{s}"

    def define(self, c: int, capacity: int) -> tuple[dict[str, DecisionProjection[Any]], Any]:
        projections: dict[str, DecisionProjection[Any]] = {
            "exists": DecisionProjection(Query.of([self.defined], [self.course(c)]), False, _true)
        }

        def decide(state: Mapping[str, Any]) -> Sequence[NewEvent]:
            if state["exists"]:
                raise Refused(f"course {c} already exists")
            return [NewEvent(self.defined, {"course": c, "capacity": capacity}, tags=[self.course(c)])]

        return projections, decide

    def change_capacity(self, c: int, capacity: int) -> tuple[dict[str, DecisionProjection[Any]], Any]:
        projections: dict[str, DecisionProjection[Any]] = {
            "exists": DecisionProjection(Query.of([self.defined], [self.course(c)]), False, _true),
            "capacity": DecisionProjection(
                Query.of([self.defined, self.capacity_changed], [self.course(c)]), 0, _capacity
            ),
        }

        def decide(state: Mapping[str, Any]) -> Sequence[NewEvent]:
            if not state["exists"]:
                raise Refused(f"course {c} does not exist")
            if state["capacity"] == capacity:
                return []
            return [NewEvent(self.capacity_changed, {"course": c, "capacity": capacity}, tags=[self.course(c)])]

        return projections, decide

    def subscribe(self, s: int, c: int) -> tuple[dict[str, DecisionProjection[Any]], Any]:
        course, student = self.course(c), self.student(s)
        projections: dict[str, DecisionProjection[Any]] = {
            "exists": DecisionProjection(Query.of([self.defined], [course]), False, _true),
            "capacity": DecisionProjection(Query.of([self.defined, self.capacity_changed], [course]), 0, _capacity),
            "course_subscriptions": DecisionProjection(Query.of([self.subscribed], [course]), 0, _count),
            "student_subscriptions": DecisionProjection(Query.of([self.subscribed], [student]), 0, _count),
            "subscribed": DecisionProjection(Query(QueryItem([self.subscribed], [course, student])), False, _true),
        }

        def decide(state: Mapping[str, Any]) -> Sequence[NewEvent]:
            if not state["exists"]:
                raise Refused(f"course {c} does not exist")
            if state["subscribed"]:
                raise Refused(f"student {s} already subscribed to course {c}")
            if state["course_subscriptions"] >= state["capacity"]:
                raise Refused(f"course {c} is full")
            if state["student_subscriptions"] >= MAX_COURSES_PER_STUDENT:
                raise Refused(f"student {s} has {MAX_COURSES_PER_STUDENT} courses already")
            return [NewEvent(self.subscribed, {"student": s, "course": c}, tags=[student, course])]

        return projections, decide

    def check(self, log: Sequence[RecordedEvent]) -> Counter[int]:
        """Replay the log in order: every subscription was allowed by what came before it."""
        capacity: dict[int, int] = {}
        per_course: Counter[int] = Counter()
        per_student: Counter[int] = Counter()
        pairs: set[tuple[int, int]] = set()
        for event in log:
            data = event.json()
            if event.event_type == self.defined:
                assert data["course"] not in capacity, f"course {data['course']} defined twice"
                capacity[data["course"]] = data["capacity"]
            elif event.event_type == self.capacity_changed:
                assert data["course"] in capacity
                capacity[data["course"]] = data["capacity"]
            elif event.event_type == self.subscribed:
                s, c = data["student"], data["course"]
                assert c in capacity, f"subscription to course {c} before it exists"
                assert per_course[c] < capacity[c], f"course {c} over its capacity of {capacity[c]}"
                assert per_student[s] < MAX_COURSES_PER_STUDENT, f"student {s} over the limit"
                assert (s, c) not in pairs, f"student {s} subscribed twice to course {c}"
                per_course[c] += 1
                per_student[s] += 1
                pairs.add((s, c))
        return per_course


# -- unique usernames, released when an account closes or renames -------------------------------------


@dataclass(frozen=True)
class Usernames:
    run: str

    @property
    def types(self) -> tuple[str, str, str]:
        return (f"AccountRegistered{self.run}", f"AccountClosed{self.run}", f"UsernameChanged{self.run}")

    def tag(self, name: str) -> str:
        return f"username:{self.run}-{name}"

    def claimed(self, name: str) -> DecisionProjection[bool]:
        registered, _, changed = self.types

        def apply(_: bool, event: RecordedEvent) -> bool:
            if event.event_type == changed:
                return bool(event.json()["new"] == name)
            return event.event_type == registered

        return DecisionProjection(Query.of(self.types, [self.tag(name)]), False, apply)

    def register(self, name: str) -> tuple[dict[str, DecisionProjection[Any]], Any]:
        def decide(state: Mapping[str, Any]) -> Sequence[NewEvent]:
            if state["claimed"]:
                raise Refused(f"username {name} is taken")
            return [NewEvent(self.types[0], {"username": name}, tags=[self.tag(name)])]

        return {"claimed": self.claimed(name)}, decide

    def close(self, name: str) -> tuple[dict[str, DecisionProjection[Any]], Any]:
        def decide(state: Mapping[str, Any]) -> Sequence[NewEvent]:
            if not state["claimed"]:
                raise Refused(f"no account has username {name}")
            return [NewEvent(self.types[1], {"username": name}, tags=[self.tag(name)])]

        return {"claimed": self.claimed(name)}, decide

    def rename(self, old: str, new: str) -> tuple[dict[str, DecisionProjection[Any]], Any]:
        def decide(state: Mapping[str, Any]) -> Sequence[NewEvent]:
            if not state["old"] or state["new"]:
                raise Refused(f"cannot rename {old} to {new}")
            return [NewEvent(self.types[2], {"old": old, "new": new}, tags=[self.tag(old), self.tag(new)])]

        return {"old": self.claimed(old), "new": self.claimed(new)}, decide

    def check(self, log: Sequence[RecordedEvent]) -> set[str]:
        registered, closed, changed = self.types
        taken: set[str] = set()
        for event in log:
            data = event.json()
            if event.event_type == registered:
                assert data["username"] not in taken, f"username {data['username']} registered while taken"
                taken.add(data["username"])
            elif event.event_type == closed:
                assert data["username"] in taken
                taken.remove(data["username"])
            elif event.event_type == changed:
                assert data["old"] in taken and data["new"] not in taken, f"bad rename {data}"
                taken.remove(data["old"])
                taken.add(data["new"])
        return taken


# -- consecutive invoice numbers: a type with no tag ----------------------------------------------------


@dataclass(frozen=True)
class Invoices:
    run: str

    @property
    def created(self) -> str:
        return f"InvoiceCreated{self.run}"

    def create(self, customer: int) -> tuple[dict[str, DecisionProjection[Any]], Any]:
        def last(_: int, event: RecordedEvent) -> int:
            return int(event.json()["number"])

        projections: dict[str, DecisionProjection[Any]] = {
            "last": DecisionProjection(Query.of([self.created]), 0, last)
        }

        def decide(state: Mapping[str, Any]) -> Sequence[NewEvent]:
            number = state["last"] + 1
            return [NewEvent(self.created, {"number": number, "customer": customer})]

        return projections, decide

    def check(self, log: Sequence[RecordedEvent]) -> int:
        numbers = [e.json()["number"] for e in log if e.event_type == self.created]
        assert numbers == list(range(1, len(numbers) + 1)), f"invoice numbers in log order: {numbers}"
        return len(numbers)
