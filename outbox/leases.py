"""Slot leases: which relay may publish the messages of which keys, and until when.

Keys hash to slots (`SLOT_COUNT` of them) and each slot is leased to one relay at a time, so two relays
never publish messages of one key concurrently. A relay keeps a heartbeat, renews its leases well
before they lapse, and moves towards a fair share of the slots, ceil(slots / live relays): a stopped
relay hands its slots back at once, a crashed one's lapse after `lease_ttl` and go to the others. A
relay only sends the messages of a slot whose lease outlasts the whole send (`usable`), so no send can
outlive the lease it was made under.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from eventstore import CONNECTION_ERRORS, Connection, DatabaseUnavailable, EventStore
from outbox import sql, telemetry
from outbox.errors import InvalidSettings
from outbox.schema import SLOT_COUNT
from outbox.settings import RelaySettings

log = logging.getLogger(__name__)

DATABASE_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, DatabaseUnavailable)
"""PostgreSQL out of reach: a lost connection, or retries that ran out of patience. Loops back off and go on."""


class SlotLeases:
    """The slots one relay holds, each with the moment (monotonic clock) its lease lapses."""

    def __init__(self, store: EventStore, relay_id: str, settings: RelaySettings) -> None:
        self._store = store
        self._relay_id = relay_id
        self._ttl = settings.lease_ttl
        self._margin = settings.send_margin
        self._renew_interval = settings.renew_interval
        self._deadlines: dict[int, float] = {}
        self._lock = asyncio.Lock()

    @property
    def owned(self) -> list[int]:
        return sorted(self._deadlines)

    def usable(self) -> set[int]:
        """Slots whose lease outlasts a whole round from now, so no send can outlive the lease."""
        horizon = time.monotonic() + self._margin
        return {slot for slot, deadline in self._deadlines.items() if deadline > horizon}

    async def check_slots(self) -> None:
        """Refuse to start on a database whose slots are not the ones keys hash to here."""
        # Retried: the database may be restarting as the relay starts.
        slots = await self._store.retrying(lambda: self._store.pool.fetchval(sql.COUNT_SLOTS))
        if slots != SLOT_COUNT:
            raise InvalidSettings(f"outbox_slots has {slots} rows, this code expects {SLOT_COUNT}")

    async def rebalance(self) -> None:
        """Heartbeat, renew, then move towards a fair share: ceil(slots / live relays).

        The relay calls it between rounds only, so a slot is never released while its messages are in
        flight.
        """
        async with self._lock:
            started = time.monotonic()
            async with self._store.pool.acquire() as conn, conn.transaction():
                owned = await self._renew(conn)
                await conn.execute(sql.FORGET_EXPIRED_RELAYS)
                live = int(await conn.fetchval(sql.LIVE_RELAYS))
                share = math.ceil(SLOT_COUNT / max(live, 1))
                if len(owned) > share:
                    extra = sorted(owned)[share:]
                    await conn.execute(sql.RELEASE_SLOTS, self._relay_id, extra)
                    owned -= set(extra)
                elif len(owned) < share:
                    gained = await conn.fetch(sql.ACQUIRE_SLOTS, self._relay_id, self._ttl, share - len(owned))
                    owned |= {r["slot"] for r in gained}
            self._deadlines = dict.fromkeys(owned, started + self._ttl)

    @telemetry.counted_renewal
    async def renew(self) -> None:
        async with self._lock:
            started = time.monotonic()
            async with self._store.pool.acquire() as conn, conn.transaction():
                renewed = await self._renew(conn)
            lost = set(self._deadlines) - renewed
            if lost:
                log.warning("lost the lease of slot(s) %s to another relay", sorted(lost))
            self._deadlines = dict.fromkeys(renewed, started + self._ttl)

    async def _renew(self, conn: Connection) -> set[int]:
        """Heartbeat, then extend every lease this relay holds; returns the slots it holds."""
        await conn.execute(sql.HEARTBEAT, self._relay_id, self._ttl)
        return {r["slot"] for r in await conn.fetch(sql.RENEW_LEASES, self._relay_id, self._ttl)}

    async def renew_forever(self) -> None:
        """Keeps leases alive independently of the rounds, which may be slow while the broker is down."""
        while True:
            await asyncio.sleep(self._renew_interval)
            try:
                await self.renew()
            except DATABASE_ERRORS as exc:
                log.warning("cannot renew slot leases (%s); they lapse unless renewed in time", exc)
            except Exception:
                log.exception("lease renewal failed")

    async def release(self) -> None:
        """Hand every slot back and leave the live relays: the others take the slots over at once."""
        self._deadlines.clear()
        async with self._store.pool.acquire() as conn, conn.transaction():
            await conn.execute(sql.RELEASE_ALL_SLOTS, self._relay_id)
            await conn.execute(sql.UNREGISTER_RELAY, self._relay_id)
