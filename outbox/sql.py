"""Every SQL statement of the outbox and the inbox, by name. The rest of the package calls these names."""

from __future__ import annotations

NOTIFY_CHANNEL = "eventstore_outbox"
"""Out-of-band wake-ups for relays (dead messages put back, for example).

New messages need no NOTIFY of their own: they are written by append hooks, and the event store
already announces every committed append on `eventstore.sql.NOTIFY_CHANNEL`, after commit and
coalesced; relays listen on both channels.
"""

NOTIFY = f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"

_PENDING = "published_at IS NULL AND dead_at IS NULL"

# -- writing (inside the append's transaction) -------------------------------------------------------

INSERT_MESSAGE = """
INSERT INTO outbox (slot, topic, key, event_id, event_type, source, stream_id, stream_version, data,
                    correlation_id, causation_id, recorded_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (event_id, topic) DO NOTHING
"""

INSERT_MESSAGES = """
INSERT INTO outbox (slot, topic, key, event_id, event_type, source, stream_id, stream_version, data,
                    correlation_id, causation_id, recorded_at)
SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[],
                     $8::bigint[], $9::text[], $10::text[], $11::text[], $12::timestamptz[])
ON CONFLICT (event_id, topic) DO NOTHING
"""

# -- relaying ----------------------------------------------------------------------------------------

# Pending messages of the given slots in outbox order. A message waiting out a retry backoff holds back
# the later messages of its key (and only of its key), so a key's messages never overtake each other.
_FETCH_PENDING = """
SELECT o.id, o.slot, o.topic, o.key, o.data, o.event_id::text, o.event_type, o.source, o.stream_id,
       o.stream_version, o.correlation_id, o.causation_id,
       to_char(o.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), o.attempts
FROM outbox AS o
WHERE o.published_at IS NULL AND o.dead_at IS NULL AND o.slot = ANY($1::int[])
  AND {condition}
  AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
  AND NOT EXISTS (
      SELECT 1 FROM outbox AS b
      WHERE b.slot = o.slot AND b.key = o.key AND b.id < o.id
        AND b.published_at IS NULL AND b.dead_at IS NULL AND b.next_attempt_at IS NOT NULL
        AND b.next_attempt_at > now())
ORDER BY o.id
LIMIT $2
"""

# From the first pending message, leaving out $3 (acknowledged, still being marked published).
FETCH_PENDING = _FETCH_PENDING.format(condition="o.id <> ALL($3::bigint[])")

# Only after id $3: cheap while draining a backlog, but blind to a transaction that commits late with
# a lower id, so the relay goes back to FETCH_PENDING as soon as it catches up.
FETCH_PENDING_AFTER = _FETCH_PENDING.format(condition="o.id > $3")

MARK_PUBLISHED = """
UPDATE outbox SET published_at = now(), published_by = $2
WHERE id = ANY($1::bigint[])
"""

# The broker refused these messages: count the attempt, back off, and after $4 attempts move the
# message to the dead-letter state.
RECORD_FAILURES = """
UPDATE outbox AS o
SET attempts = o.attempts + 1,
    last_error = f.error,
    next_attempt_at = now() + make_interval(secs => f.delay),
    dead_at = CASE WHEN o.attempts + 1 >= $4 THEN now() END
FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS f(id, error, delay)
WHERE o.id = f.id AND o.published_at IS NULL AND o.dead_at IS NULL
RETURNING o.id, o.dead_at IS NOT NULL
"""

PRUNE_PUBLISHED = """
DELETE FROM outbox
WHERE id IN (
    SELECT id FROM outbox
    WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)
    LIMIT $2)
"""

# -- slot leases -------------------------------------------------------------------------------------

HEARTBEAT = """
INSERT INTO outbox_relays (relay_id, expires_at) VALUES ($1, now() + make_interval(secs => $2))
ON CONFLICT (relay_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""

FORGET_EXPIRED_RELAYS = "DELETE FROM outbox_relays WHERE expires_at < now()"

LIVE_RELAYS = "SELECT count(*) FROM outbox_relays WHERE expires_at > now()"

RENEW_LEASES = """
UPDATE outbox_slots SET lease_until = now() + make_interval(secs => $2)
WHERE owner = $1
RETURNING slot
"""

# Free or expired slots, lowest first; SKIP LOCKED so relays acquiring at once never wait for each other.
ACQUIRE_SLOTS = """
UPDATE outbox_slots AS s SET owner = $1, lease_until = now() + make_interval(secs => $2)
FROM (
    SELECT slot FROM outbox_slots
    WHERE owner IS NULL OR lease_until IS NULL OR lease_until < now()
    ORDER BY slot
    LIMIT $3
    FOR UPDATE SKIP LOCKED
) AS free
WHERE s.slot = free.slot
RETURNING s.slot
"""

RELEASE_SLOTS = """
UPDATE outbox_slots SET owner = NULL, lease_until = NULL
WHERE owner = $1 AND slot = ANY($2::int[])
"""

RELEASE_ALL_SLOTS = "UPDATE outbox_slots SET owner = NULL, lease_until = NULL WHERE owner = $1"

UNREGISTER_RELAY = "DELETE FROM outbox_relays WHERE relay_id = $1"

SLOT_COUNT = "SELECT count(*) FROM outbox_slots"

# -- operations ---------------------------------------------------------------------------------------

STATUS_BY_TOPIC = f"""
SELECT topic,
       count(*) FILTER (WHERE {_PENDING}),
       count(*) FILTER (WHERE published_at IS NOT NULL),
       count(*) FILTER (WHERE dead_at IS NOT NULL),
       min(recorded_at) FILTER (WHERE {_PENDING})
FROM outbox
GROUP BY topic
ORDER BY topic
"""

RELAYS = """
SELECT r.relay_id, r.started_at, r.expires_at,
       count(s.slot) FILTER (WHERE s.lease_until > now())
FROM outbox_relays AS r
LEFT JOIN outbox_slots AS s ON s.owner = r.relay_id
WHERE r.expires_at > now()
GROUP BY r.relay_id, r.started_at, r.expires_at
ORDER BY r.relay_id
"""

DEAD_MESSAGES = """
SELECT id, topic, key, event_id, event_type, stream_id, stream_version, attempts, last_error, dead_at
FROM outbox
WHERE dead_at IS NOT NULL
ORDER BY id
LIMIT $1
"""

RETRY_DEAD = """
UPDATE outbox SET dead_at = NULL, attempts = 0, next_attempt_at = NULL
WHERE dead_at IS NOT NULL
  AND ($1::bigint[] IS NULL OR id = ANY($1::bigint[]))
  AND ($2::text IS NULL OR topic = $2)
RETURNING id
"""

# -- inbox --------------------------------------------------------------------------------------------

INBOX_RECORD = """
INSERT INTO inbox (consumer, message_id) VALUES ($1, $2)
ON CONFLICT (consumer, message_id) DO NOTHING
RETURNING true
"""

INBOX_SEEN = "SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer = $1 AND message_id = $2)"

INBOX_PRUNE = """
DELETE FROM inbox WHERE consumer = $1 AND handled_at < now() - make_interval(secs => $2)
"""
