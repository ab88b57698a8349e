"""What the observed runner runs (`--app tests.observability.app:APP`): one projection that keeps up,
one that fails at a poisoned event."""

from __future__ import annotations

from typing import Any

from eventstore import NewEvent, RecordedEvent
from eventstore_app import Application
from projections import Projection, handles


class Deposits(Projection):
    name = "obs_deposits"
    tables = {"obs_deposits": "CREATE TABLE obs_deposits (account text PRIMARY KEY, total bigint NOT NULL)"}

    @handles("Deposited")
    async def deposited(self, conn: Any, event: RecordedEvent) -> None:
        data = event.json()
        await conn.execute(
            "INSERT INTO obs_deposits VALUES ($1, $2) ON CONFLICT (account) DO UPDATE "
            "SET total = obs_deposits.total + EXCLUDED.total",
            data["account"], data["amount"],
        )


class Picky(Projection):
    name = "obs_picky"
    tables = {"obs_picky": "CREATE TABLE obs_picky (position bigint PRIMARY KEY)"}

    @handles("Deposited")
    async def deposited(self, conn: Any, event: RecordedEvent) -> None:
        if event.json().get("poison"):
            raise ValueError("poisoned deposit")
        await conn.execute("INSERT INTO obs_picky VALUES ($1)", event.position)


APP = Application("observed", projections=[Deposits(), Picky()])


def deposit(account: str, amount: int, poison: bool = False) -> NewEvent:
    data: dict[str, Any] = {"account": account, "amount": amount}
    if poison:
        data["poison"] = True
    return NewEvent("Deposited", data)
