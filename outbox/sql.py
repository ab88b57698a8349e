"""Every SQL statement of the outbox and the inbox, by name. The rest of the package calls these names."""

from __future__ import annotations

from eventstore import sql as store_sql
from outbox.schema import SLOT_COUNT

NOTIFY_CHANNEL = "eventstore_outbox"
"""Out-of-band wake-ups for relays (dead messages put back, for example).

New messages need no NOTIFY of their own: they are written by a trigger in the append, and the event
store already announces every committed append on `eventstore.sql.NOTIFY_CHANNEL`, after commit and
coalesced; relays listen on both channels.
"""

NOTIFY = f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"

_PENDING = "published_at IS NULL AND dead_at IS NULL"

# -- writing (a trigger on events, in the append's own transaction) ---------------------------------

# Rules in the database rather than hooks in the process: every insert into events, by any process
# (one that imported nothing but the event store, a psql session), writes the messages of the declared
# routes in its own transaction. The slot is a hash of the key (hashtextextended, which PostgreSQL keeps
# stable because hash partitioning depends on it), so a key always lands in the same slot.
WRITE_FUNCTION_V1 = (
    f"""
CREATE FUNCTION outbox_missing_key(p_topic text, p_path text[], p_type text, p_stream_id text)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the outbox route to % keys messages by %, which event % of stream % does not have',
        p_topic, array_to_string(p_path, '.'), p_type, p_stream_id
        USING ERRCODE = '{store_sql.APPEND_REFUSED}';
END
$$
""",
    f"""
CREATE FUNCTION outbox_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox (slot, topic, key, source, log_xid, position, recorded_at)
    SELECT (hashtextextended(m.key, 0) & {SLOT_COUNT - 1})::int, m.topic, m.key, m.source, m.log_xid, m.position,
           m.recorded_at
    FROM (
        SELECT r.route, r.topic, r.source, e.log_xid, e.position, e.recorded_at,
               CASE WHEN r.key_path IS NULL THEN e.stream_id
                    ELSE coalesce(
                        nullif(CASE r.key_path[1] WHEN 'data' THEN e.data ELSE e.metadata END
                               #>> r.key_path[2:], ''),
                        outbox_missing_key(r.topic, r.key_path, e.event_type, e.stream_id))
               END AS key
        FROM appended AS e
        JOIN outbox_routes AS r
          ON (r.event_types IS NULL OR e.event_type = ANY (r.event_types))
         AND (r.category IS NULL OR r.category = e.category)
    ) AS m
    ORDER BY m.position, m.route
    ON CONFLICT (position, topic) DO NOTHING;
    RETURN NULL;
END
$$
""",
    """
CREATE TRIGGER events_outbox AFTER INSERT ON events REFERENCING NEW TABLE AS appended
FOR EACH STATEMENT EXECUTE FUNCTION outbox_write()
""",
)

# Version 2 selects by tag too: a route with a tag takes only the events that carry it (tags live in the
# event's metadata, as eventstore.model.TAGS says).
WRITE_FUNCTION_V2 = (
    f"""
CREATE OR REPLACE FUNCTION outbox_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox (slot, topic, key, source, log_xid, position, recorded_at)
    SELECT (hashtextextended(m.key, 0) & {SLOT_COUNT - 1})::int, m.topic, m.key, m.source, m.log_xid, m.position,
           m.recorded_at
    FROM (
        SELECT r.route, r.topic, r.source, e.log_xid, e.position, e.recorded_at,
               CASE WHEN r.key_path IS NULL THEN e.stream_id
                    ELSE coalesce(
                        nullif(CASE r.key_path[1] WHEN 'data' THEN e.data ELSE e.metadata END
                               #>> r.key_path[2:], ''),
                        outbox_missing_key(r.topic, r.key_path, e.event_type, e.stream_id))
               END AS key
        FROM appended AS e
        JOIN outbox_routes AS r
          ON (r.event_types IS NULL OR e.event_type = ANY (r.event_types))
         AND (r.category IS NULL OR r.category = e.category)
         AND (r.tag IS NULL OR e.metadata -> 'tags' ? r.tag)
    ) AS m
    ORDER BY m.position, m.route
    ON CONFLICT (position, topic) DO NOTHING;
    RETURN NULL;
END
$$
""",
)

# Version 3 returns at once while no route is declared: an event store that does not use the outbox
# pays a look at an empty table per append, not the join of every appended row with it.
WRITE_FUNCTION_V3 = f"""
CREATE OR REPLACE FUNCTION outbox_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM outbox_routes) THEN
        RETURN NULL;
    END IF;
    INSERT INTO outbox (slot, topic, key, source, log_xid, position, recorded_at)
    SELECT (hashtextextended(m.key, 0) & {SLOT_COUNT - 1})::int, m.topic, m.key, m.source, m.log_xid, m.position,
           m.recorded_at
    FROM (
        SELECT r.route, r.topic, r.source, e.log_xid, e.position, e.recorded_at,
               CASE WHEN r.key_path IS NULL THEN e.stream_id
                    ELSE coalesce(
                        nullif(CASE r.key_path[1] WHEN 'data' THEN e.data ELSE e.metadata END
                               #>> r.key_path[2:], ''),
                        outbox_missing_key(r.topic, r.key_path, e.event_type, e.stream_id))
               END AS key
        FROM appended AS e
        JOIN outbox_routes AS r
          ON (r.event_types IS NULL OR e.event_type = ANY (r.event_types))
         AND (r.category IS NULL OR r.category = e.category)
         AND (r.tag IS NULL OR e.metadata -> 'tags' ? r.tag)
    ) AS m
    ORDER BY m.position, m.route
    ON CONFLICT (position, topic) DO NOTHING;
    RETURN NULL;
END
$$
"""

DROP_WRITE_FUNCTION_V1 = (
    "DROP TRIGGER IF EXISTS events_outbox ON events",
    "DROP FUNCTION IF EXISTS outbox_write()",
    "DROP FUNCTION IF EXISTS outbox_missing_key(text, text[], text, text)",
)

# -- routes --------------------------------------------------------------------------------------------

ROUTES = "SELECT route, topic, event_types, category, tag, key_path, source FROM outbox_routes ORDER BY route"

# Declarations are serialized (two processes starting at once), while appends keep reading the routes.
LOCK_ROUTES = "LOCK TABLE outbox_routes IN SHARE ROW EXCLUSIVE MODE"

DELETE_ROUTES = "DELETE FROM outbox_routes"

INSERT_ROUTES = """
INSERT INTO outbox_routes (route, topic, event_types, category, tag, key_path, source)
SELECT r.route, r.topic, nullif(r.event_types, '')::text[], r.category, r.tag, nullif(r.key_path, '')::text[],
       r.source
FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
     AS r(route, topic, event_types, category, tag, key_path, source)
"""
"""Arrays of arrays cannot be ragged, so types and key paths travel as array literals ('' for none)."""

# -- relaying ----------------------------------------------------------------------------------------

# Pending messages of the given slots, visible in the log (every transaction that could still write one
# below them has ended), in log order. A message the broker refused holds back the later messages of
# its key (and only of its key) until it is sent or dead, also once its backoff has run out: a fetch that
# starts after it (`FETCH_PENDING_AFTER`, draining a backlog) would otherwise send them before it is
# fetched again, and a key's messages never overtake each other. The log's
# visibility rule applies to the message's own copy of its event's log_xid (o.log_xid, written with the
# message and never changed), so the pending index, in log order, stops at the visibility line. The
# columns are those of `outbox.publishing.OutboxMessage`, in its order.
_FETCH_PENDING = f"""
SELECT o.id, o.slot, o.topic, o.key, e.data::text AS data, e.event_id::text AS event_id, e.event_type,
       o.source, e.stream_id, e.stream_version, e.metadata ->> 'correlation_id' AS correlation_id,
       e.metadata ->> 'causation_id' AS causation_id,
       to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS time, o.attempts,
       o.log_xid, o.position, e.metadata ->> 'schema_version' AS schema_version, NULL::text AS dataschema,
       CASE WHEN e.metadata ? 'personal_data' THEN e.metadata::text END AS sealed,
       e.metadata ->> 'traceparent' AS traceparent, e.metadata ->> 'tracestate' AS tracestate
FROM outbox AS o JOIN events AS e ON e.position = o.position
WHERE o.published_at IS NULL AND o.dead_at IS NULL AND o.slot = ANY($1::int[])
  AND o.log_xid < {store_sql.LOG_HORIZON}
  AND {{condition}}
  AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
  AND NOT EXISTS (
      SELECT 1 FROM outbox AS b
      WHERE b.slot = o.slot AND b.key = o.key AND (b.log_xid, b.position, b.id) < (o.log_xid, o.position, o.id)
        AND b.published_at IS NULL AND b.dead_at IS NULL AND b.next_attempt_at IS NOT NULL)
ORDER BY o.log_xid, o.position, o.id
LIMIT $2
"""

# From the first pending message, leaving out $3 (acknowledged, still being marked published).
FETCH_PENDING = _FETCH_PENDING.format(condition="o.id <> ALL($3::bigint[])")

# Only after the message at ($3, $4, $5) in log order: cheap while draining a backlog, and safe, since
# nothing can become visible below a message that is visible already.
FETCH_PENDING_AFTER = _FETCH_PENDING.format(condition="(o.log_xid, o.position, o.id) > ($3, $4, $5)")

HELD_BACK = f"""
SELECT coalesce((
    SELECT max(o.log_xid) FROM outbox AS o
    WHERE o.published_at IS NULL AND o.dead_at IS NULL AND o.slot = ANY($1::int[])
) >= {store_sql.LOG_HORIZON}, false)
"""
"""($1 slots): pending messages below the log's visibility line, held back by an older transaction."""

# The gauges of each topic, read when metrics are collected: both scans follow a partial index
# (pending rows, dead rows), so they cost what the backlog and the dead letters hold, not the table.
TOPIC_GAUGES = """
WITH pending AS (
    SELECT topic, count(*) AS pending, extract(epoch FROM now() - min(recorded_at))::float8 AS oldest
    FROM outbox WHERE published_at IS NULL AND dead_at IS NULL GROUP BY topic),
dead AS (SELECT topic, count(*) AS dead FROM outbox WHERE dead_at IS NOT NULL GROUP BY topic),
topics AS (SELECT topic FROM outbox_routes UNION SELECT topic FROM pending UNION SELECT topic FROM dead)
SELECT t.topic, coalesce(p.pending, 0) AS pending, coalesce(p.oldest, 0) AS oldest_age, coalesce(d.dead, 0) AS dead
FROM topics AS t LEFT JOIN pending AS p USING (topic) LEFT JOIN dead AS d USING (topic)
"""

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
RETURNING o.id, o.dead_at IS NOT NULL AS dead
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

COUNT_SLOTS = "SELECT count(*) FROM outbox_slots"

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
SELECT o.id, o.topic, o.key, e.event_id, e.event_type, e.stream_id, e.stream_version, o.attempts, o.last_error,
       o.dead_at
FROM outbox AS o JOIN events AS e ON e.position = o.position
WHERE o.dead_at IS NOT NULL
ORDER BY o.id
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

PRUNE_ORPHANS = """
DELETE FROM outbox AS o
WHERE o.published_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM events AS e WHERE e.position = o.position)
  AND NOT EXISTS (SELECT 1 FROM events_archive AS a WHERE a.position = o.position)
"""
"""Pending messages whose event is gone from the log and from the archive (hard-deleted streams)."""
