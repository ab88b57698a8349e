"""Every SQL statement of the event store, by name. The rest of the package calls these names.

Other components build their own queries of the log on the pieces below "the contract" (the columns of
a `RecordedEvent`, the log's visibility rule, the category rule), never on copies of them.

DDL that tables cannot express (functions, triggers) is versioned here (`*_V1`) so that a migration
keeps applying the exact text it was written with.
"""

from __future__ import annotations

NOTIFY_CHANNEL = "eventstore_events"

APPEND_REFUSED = "ES001"
"""The SQLSTATE with which a rule on the events table refuses an append (`AppendRefused`).

Components that keep rules in the database (outbox routes, inline projection guards) raise it from
their triggers; the store turns it into a typed error. Nothing of the append is then written.
"""

# Status codes returned by eventstore_append.
APPENDED = 0
WRONG_VERSION = 1
IDEMPOTENT = 2
ID_CONFLICT = 3

DUPLICATES_FUNCTION_V1 = """
CREATE OR REPLACE FUNCTION eventstore_duplicates(
    p_stream_id text, p_expected bigint, p_event_ids uuid[], p_types text[], p_data jsonb[], p_metadata jsonb[]
) RETURNS TABLE (o_status int, o_version bigint, o_positions bigint[], o_transaction_id bigint,
                 o_recorded_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH given AS (
        SELECT g.event_id, g.event_type, g.data, g.metadata, g.ord
        FROM unnest(p_event_ids, p_types, p_data, p_metadata)
             WITH ORDINALITY AS g(event_id, event_type, data, metadata, ord)
    ), found AS (
        SELECT e.position, e.transaction_id, e.recorded_at, e.stream_version, g.ord,
               (e.stream_id = p_stream_id AND e.event_type = g.event_type
                AND e.data = g.data AND e.metadata = g.metadata) AS same
        FROM given g JOIN events e ON e.event_id = g.event_id
    )
    SELECT CASE
               WHEN count(*) = 0 THEN NULL
               WHEN count(*) = cardinality(p_event_ids) AND bool_and(f.same)
                    AND max(f.stream_version - f.ord) = min(f.stream_version - f.ord)
                    AND (p_expected IN (-2, -3) OR p_expected = min(f.stream_version) - 1)
               THEN 2
               ELSE 3
           END,
           max(f.stream_version),
           array_agg(f.position ORDER BY f.ord),
           max(f.transaction_id),
           max(f.recorded_at)
    FROM found f
$$;
"""

APPEND_FUNCTION_V1 = """
CREATE OR REPLACE FUNCTION eventstore_append(
    p_stream_id text, p_expected bigint, p_event_ids uuid[], p_types text[], p_data jsonb[], p_metadata jsonb[]
) RETURNS TABLE (o_status int, o_version bigint, o_positions bigint[], o_transaction_id bigint,
                 o_recorded_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint := cardinality(p_event_ids);
    v_new bigint;
BEGIN
    -- Idempotency first: a retried append of stored events returns the first result. The cheap
    -- EXISTS (its plan is cached) guards the full comparison (an SQL function, planned per call).
    IF EXISTS (SELECT 1 FROM events AS e WHERE e.event_id = ANY (p_event_ids)) THEN
        RETURN QUERY SELECT * FROM eventstore_duplicates(
            p_stream_id, p_expected, p_event_ids, p_types, p_data, p_metadata);
        RETURN;
    END IF;

    -- The stream row is the only lock: writers to different streams never wait for each other.
    IF p_expected = -2 THEN
        INSERT INTO streams AS s (stream_id, version) VALUES (p_stream_id, n - 1)
        ON CONFLICT (stream_id) DO UPDATE SET version = s.version + n
        RETURNING s.version INTO v_new;
    ELSIF p_expected = -1 THEN
        INSERT INTO streams AS s (stream_id, version) VALUES (p_stream_id, n - 1)
        ON CONFLICT (stream_id) DO NOTHING
        RETURNING s.version INTO v_new;
    ELSIF p_expected = -3 THEN
        UPDATE streams AS s SET version = s.version + n WHERE s.stream_id = p_stream_id
        RETURNING s.version INTO v_new;
    ELSE
        UPDATE streams AS s SET version = s.version + n
        WHERE s.stream_id = p_stream_id AND s.version = p_expected
        RETURNING s.version INTO v_new;
    END IF;

    IF v_new IS NULL THEN
        -- Lost a race or a wrong expectation; the winner may have written these very events.
        IF EXISTS (SELECT 1 FROM events AS e WHERE e.event_id = ANY (p_event_ids)) THEN
            RETURN QUERY SELECT * FROM eventstore_duplicates(
                p_stream_id, p_expected, p_event_ids, p_types, p_data, p_metadata);
            RETURN;
        END IF;
        RETURN QUERY SELECT 1,
            coalesce((SELECT s.version FROM streams AS s WHERE s.stream_id = p_stream_id), -1::bigint),
            NULL::bigint[], NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;

    RETURN QUERY
    WITH inserted AS (
        INSERT INTO events AS e (stream_id, stream_version, event_id, event_type, data, metadata)
        SELECT p_stream_id, v_new - n + u.ord, u.event_id, u.event_type, u.data, u.metadata
        FROM unnest(p_event_ids, p_types, p_data, p_metadata)
             WITH ORDINALITY AS u(event_id, event_type, data, metadata, ord)
        ORDER BY u.ord
        RETURNING e.position, e.transaction_id, e.recorded_at, e.stream_version
    )
    SELECT 0, v_new, array_agg(i.position ORDER BY i.stream_version), max(i.transaction_id),
           max(i.recorded_at)
    FROM inserted AS i;
END
$$;
"""

# Version 2 orders the log so that no stream goes backwards in it. An event's log transaction id is
# its writer's transaction id, raised to that of the stream's previous event when that one is higher
# (PostgreSQL hands out transaction ids at a transaction's first write, not at commit, so a writer
# that started early can append after a younger transaction that already committed to the stream).
# It is never lower than the writer's own id, which is what keeps the log gap-safe; see READ_ALL.
DUPLICATES_FUNCTION_V2 = """
CREATE FUNCTION eventstore_duplicates(
    p_stream_id text, p_expected bigint, p_event_ids uuid[], p_types text[], p_data jsonb[], p_metadata jsonb[]
) RETURNS TABLE (o_status int, o_version bigint, o_positions bigint[], o_log_xid bigint,
                 o_recorded_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH given AS (
        SELECT g.event_id, g.event_type, g.data, g.metadata, g.ord
        FROM unnest(p_event_ids, p_types, p_data, p_metadata)
             WITH ORDINALITY AS g(event_id, event_type, data, metadata, ord)
    ), found AS (
        SELECT e.position, e.log_xid, e.recorded_at, e.stream_version, g.ord,
               (e.stream_id = p_stream_id AND e.event_type = g.event_type
                AND e.data = g.data AND e.metadata = g.metadata) AS same
        FROM given g JOIN events e ON e.event_id = g.event_id
    )
    SELECT CASE
               WHEN count(*) = 0 THEN NULL
               WHEN count(*) = cardinality(p_event_ids) AND bool_and(f.same)
                    AND max(f.stream_version - f.ord) = min(f.stream_version - f.ord)
                    AND (p_expected IN (-2, -3) OR p_expected = min(f.stream_version) - 1)
               THEN 2
               ELSE 3
           END,
           max(f.stream_version),
           array_agg(f.position ORDER BY f.ord),
           max(f.log_xid),
           max(f.recorded_at)
    FROM found f
$$;
"""

APPEND_FUNCTION_V2 = """
CREATE FUNCTION eventstore_append(
    p_stream_id text, p_expected bigint, p_event_ids uuid[], p_types text[], p_data jsonb[], p_metadata jsonb[]
) RETURNS TABLE (o_status int, o_version bigint, o_positions bigint[], o_log_xid bigint,
                 o_recorded_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint := cardinality(p_event_ids);
    v_xid bigint;
    v_new bigint;
    v_log bigint;
BEGIN
    -- Idempotency first: a retried append of stored events returns the first result. The cheap
    -- EXISTS (its plan is cached) guards the full comparison (an SQL function, planned per call).
    IF EXISTS (SELECT 1 FROM events AS e WHERE e.event_id = ANY (p_event_ids)) THEN
        RETURN QUERY SELECT * FROM eventstore_duplicates(
            p_stream_id, p_expected, p_event_ids, p_types, p_data, p_metadata);
        RETURN;
    END IF;

    v_xid := pg_current_xact_id()::text::bigint;
    -- The stream row is the only lock: writers to different streams never wait for each other. Under
    -- it, the row's log_xid is that of the stream's last committed (or own) event.
    IF p_expected = -2 THEN
        INSERT INTO streams AS s (stream_id, version, log_xid) VALUES (p_stream_id, n - 1, v_xid)
        ON CONFLICT (stream_id) DO UPDATE SET version = s.version + n, log_xid = greatest(s.log_xid, v_xid)
        RETURNING s.version, s.log_xid INTO v_new, v_log;
    ELSIF p_expected = -1 THEN
        INSERT INTO streams AS s (stream_id, version, log_xid) VALUES (p_stream_id, n - 1, v_xid)
        ON CONFLICT (stream_id) DO NOTHING
        RETURNING s.version, s.log_xid INTO v_new, v_log;
    ELSIF p_expected = -3 THEN
        UPDATE streams AS s SET version = s.version + n, log_xid = greatest(s.log_xid, v_xid)
        WHERE s.stream_id = p_stream_id
        RETURNING s.version, s.log_xid INTO v_new, v_log;
    ELSE
        UPDATE streams AS s SET version = s.version + n, log_xid = greatest(s.log_xid, v_xid)
        WHERE s.stream_id = p_stream_id AND s.version = p_expected
        RETURNING s.version, s.log_xid INTO v_new, v_log;
    END IF;

    IF v_new IS NULL THEN
        -- Lost a race or a wrong expectation; the winner may have written these very events.
        IF EXISTS (SELECT 1 FROM events AS e WHERE e.event_id = ANY (p_event_ids)) THEN
            RETURN QUERY SELECT * FROM eventstore_duplicates(
                p_stream_id, p_expected, p_event_ids, p_types, p_data, p_metadata);
            RETURN;
        END IF;
        RETURN QUERY SELECT 1,
            coalesce((SELECT s.version FROM streams AS s WHERE s.stream_id = p_stream_id), -1::bigint),
            NULL::bigint[], NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;

    RETURN QUERY
    WITH inserted AS (
        INSERT INTO events AS e (log_xid, stream_id, stream_version, event_id, event_type, data, metadata)
        SELECT v_log, p_stream_id, v_new - n + u.ord, u.event_id, u.event_type, u.data, u.metadata
        FROM unnest(p_event_ids, p_types, p_data, p_metadata)
             WITH ORDINALITY AS u(event_id, event_type, data, metadata, ord)
        ORDER BY u.ord
        RETURNING e.position, e.recorded_at, e.stream_version
    )
    SELECT 0, v_new, array_agg(i.position ORDER BY i.stream_version), v_log, max(i.recorded_at)
    FROM inserted AS i;
END
$$;
"""

# Version 3 costs less on the common path, with the same results and the same log order as version 2.
# - With NO_STREAM or an exact version, a retry of a committed append fails the stream's version check,
#   and only then does it look for stored ids. With ANY or STREAM_EXISTS, where a retry would pass that
#   check, it looks up the first id only: a retry stores all of them. Any other stored id fails the
#   insert with a unique violation, which the store reports as `DuplicateEventId` (as version 2 did,
#   except that inside a unit of work the transaction is then aborted).
# - Each lookup goes id by id through the unique index: PL/pgSQL keeps a statement's plan for the
#   session, and version 2's `event_id = ANY (...)` kept a sequential scan planned while the table was
#   still small, which then grew with the table.
# - One event, the most common append, goes in with a plain INSERT ... VALUES.
APPEND_FUNCTION_V3 = """
CREATE OR REPLACE FUNCTION eventstore_append(
    p_stream_id text, p_expected bigint, p_event_ids uuid[], p_types text[], p_data jsonb[], p_metadata jsonb[]
) RETURNS TABLE (o_status int, o_version bigint, o_positions bigint[], o_log_xid bigint,
                 o_recorded_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint := cardinality(p_event_ids);
    v_xid bigint;
    v_new bigint;
    v_log bigint;
    v_position bigint;
    v_recorded timestamptz;
BEGIN
    IF p_expected < -1 AND EXISTS (SELECT FROM events AS e WHERE e.event_id = p_event_ids[1]) THEN
        RETURN QUERY SELECT * FROM eventstore_duplicates(
            p_stream_id, p_expected, p_event_ids, p_types, p_data, p_metadata);
        RETURN;
    END IF;

    v_xid := pg_current_xact_id()::text::bigint;
    -- The stream row is the only lock: writers to different streams never wait for each other. Under
    -- it, the row's log_xid is that of the stream's last committed (or own) event.
    IF p_expected = -2 THEN
        INSERT INTO streams AS s (stream_id, version, log_xid) VALUES (p_stream_id, n - 1, v_xid)
        ON CONFLICT (stream_id) DO UPDATE SET version = s.version + n, log_xid = greatest(s.log_xid, v_xid)
        RETURNING s.version, s.log_xid INTO v_new, v_log;
    ELSIF p_expected = -1 THEN
        INSERT INTO streams AS s (stream_id, version, log_xid) VALUES (p_stream_id, n - 1, v_xid)
        ON CONFLICT (stream_id) DO NOTHING
        RETURNING s.version, s.log_xid INTO v_new, v_log;
    ELSIF p_expected = -3 THEN
        UPDATE streams AS s SET version = s.version + n, log_xid = greatest(s.log_xid, v_xid)
        WHERE s.stream_id = p_stream_id
        RETURNING s.version, s.log_xid INTO v_new, v_log;
    ELSE
        UPDATE streams AS s SET version = s.version + n, log_xid = greatest(s.log_xid, v_xid)
        WHERE s.stream_id = p_stream_id AND s.version = p_expected
        RETURNING s.version, s.log_xid INTO v_new, v_log;
    END IF;

    IF v_new IS NULL THEN
        -- Lost a race or a wrong expectation; the winner may have written these very events.
        IF EXISTS (
            SELECT FROM unnest(p_event_ids) AS u(id)
            WHERE (SELECT true FROM events AS e WHERE e.event_id = u.id)) THEN
            RETURN QUERY SELECT * FROM eventstore_duplicates(
                p_stream_id, p_expected, p_event_ids, p_types, p_data, p_metadata);
            RETURN;
        END IF;
        RETURN QUERY SELECT 1,
            coalesce((SELECT s.version FROM streams AS s WHERE s.stream_id = p_stream_id), -1::bigint),
            NULL::bigint[], NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;

    IF n = 1 THEN
        INSERT INTO events AS e (log_xid, stream_id, stream_version, event_id, event_type, data, metadata)
        VALUES (v_log, p_stream_id, v_new, p_event_ids[1], p_types[1], p_data[1], p_metadata[1])
        RETURNING e.position, e.recorded_at INTO v_position, v_recorded;
        RETURN QUERY SELECT 0, v_new, ARRAY[v_position], v_log, v_recorded;
        RETURN;
    END IF;

    RETURN QUERY
    WITH inserted AS (
        INSERT INTO events AS e (log_xid, stream_id, stream_version, event_id, event_type, data, metadata)
        SELECT v_log, p_stream_id, v_new - n + u.ord, u.event_id, u.event_type, u.data, u.metadata
        FROM unnest(p_event_ids, p_types, p_data, p_metadata)
             WITH ORDINALITY AS u(event_id, event_type, data, metadata, ord)
        ORDER BY u.ord
        RETURNING e.position, e.recorded_at, e.stream_version
    )
    SELECT 0, v_new, array_agg(i.position ORDER BY i.stream_version), v_log, max(i.recorded_at)
    FROM inserted AS i;
END
$$;
"""

APPEND_ONLY_TRIGGERS_V1 = (
    """
CREATE OR REPLACE FUNCTION eventstore_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$
""",
    "CREATE TRIGGER events_append_only_rows BEFORE UPDATE OR DELETE ON events"
    " FOR EACH ROW EXECUTE FUNCTION eventstore_reject_change()",
    "CREATE TRIGGER events_append_only_truncate BEFORE TRUNCATE ON events"
    " FOR EACH STATEMENT EXECUTE FUNCTION eventstore_reject_change()",
)

DROP_APPEND_FUNCTIONS = (
    "DROP FUNCTION IF EXISTS eventstore_append(text, bigint, uuid[], text[], jsonb[], jsonb[])",
    "DROP FUNCTION IF EXISTS eventstore_duplicates(text, bigint, uuid[], text[], jsonb[], jsonb[])",
)

DROP_FUNCTIONS_V1 = (
    "DROP TRIGGER IF EXISTS events_append_only_rows ON events",
    "DROP TRIGGER IF EXISTS events_append_only_truncate ON events",
    "DROP FUNCTION IF EXISTS eventstore_reject_change()",
    "DROP FUNCTION IF EXISTS eventstore_append(text, bigint, uuid[], text[], jsonb[], jsonb[])",
    "DROP FUNCTION IF EXISTS eventstore_duplicates(text, bigint, uuid[], text[], jsonb[], jsonb[])",
)

SCHEMA_PRESENT = (
    "SELECT to_regprocedure('eventstore_append(text, bigint, uuid[], text[], jsonb[], jsonb[])') IS NOT NULL"
)

APPEND = "SELECT * FROM eventstore_append($1, $2, $3, $4, $5, $6)"

NOTIFY = f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"

# -- the contract other components build their queries on ---------------------------------------------

EVENT_COLUMNS = (
    "event_id, event_type, data, metadata, stream_id, stream_version, position, log_xid, recorded_at"
)
"""The columns of `events` in the field order of `RecordedEvent`: select them to build one from a row."""

# The global log, in (log_xid, position) order. Only log transaction ids below the oldest transaction
# still running are visible. Every event's log_xid is at least its writer's transaction id, so each
# event of a running transaction lies above that line and every event below it is final: a reader
# never passes an event that commits later. And a stream's log_xid never decreases, so its events are
# read in version order.
LOG_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
"""The visibility line of the global log: log transaction ids below it are final."""

LOG_VISIBLE = f"log_xid < {LOG_HORIZON}"
"""The condition every reader of the global log puts on `events`, so that it never skips an event."""

CATEGORY = "split_part(stream_id, '-'::text, 1)"
"""A stream's category in SQL (the `events.category` column, category filters): `category_of` in Python."""

STREAM_VERSION = "SELECT version FROM streams WHERE stream_id = $1"

READ_STREAM_FORWARDS = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE stream_id = $1 AND stream_version >= $2
ORDER BY stream_version
LIMIT $3
"""

PAYLOAD_COLUMNS = "event_type, data, metadata, stream_id, stream_version"
"""The columns of `EventPayload`, in its order: what an aggregate needs to rebuild itself."""

READ_STREAM_PAYLOADS = f"""
SELECT {PAYLOAD_COLUMNS} FROM events
WHERE stream_id = $1 AND stream_version >= $2
ORDER BY stream_version
LIMIT $3
"""

READ_STREAM_BACKWARDS = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE stream_id = $1 AND stream_version <= $2
ORDER BY stream_version DESC
LIMIT $3
"""

READ_STREAM_UNTIL_TIME = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE stream_id = $1 AND stream_version >= $2 AND recorded_at <= $3
ORDER BY stream_version
LIMIT $4
"""

READ_ALL = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE (log_xid, position) > ($1, $2) AND {LOG_VISIBLE}
ORDER BY log_xid, position
LIMIT $3
"""

READ_ALL_TYPES = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE (log_xid, position) > ($1, $2) AND {LOG_VISIBLE} AND event_type = ANY($4::text[])
ORDER BY log_xid, position
LIMIT $3
"""

READ_ALL_CATEGORY = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE category = $4 AND (log_xid, position) > ($1, $2) AND {LOG_VISIBLE}
ORDER BY log_xid, position
LIMIT $3
"""

READ_ALL_CATEGORY_TYPES = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE category = $4 AND (log_xid, position) > ($1, $2) AND {LOG_VISIBLE}
  AND event_type = ANY($5::text[])
ORDER BY log_xid, position
LIMIT $3
"""

HEAD = f"""
SELECT log_xid, position FROM events
WHERE {LOG_VISIBLE}
ORDER BY log_xid DESC, position DESC
LIMIT 1
"""

CHECKPOINT_VISIBLE = f"SELECT $1::bigint < {LOG_HORIZON}"
"""($1 log_xid): whether readers of the log see a checkpoint with this log transaction id."""

COUNT_AFTER = f"""
SELECT count(*) FROM events
WHERE (log_xid, position) > ($1, $2) AND {LOG_VISIBLE}
"""

LIST_STREAMS = f"""
SELECT stream_id, version FROM streams
WHERE ($1::text IS NULL OR {CATEGORY} = $1)
ORDER BY stream_id
LIMIT $2
"""

SAVE_SNAPSHOT = """
INSERT INTO snapshots (stream_id, snapshot_type, schema_version, stream_version, data)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (stream_id) DO UPDATE
SET snapshot_type = EXCLUDED.snapshot_type, schema_version = EXCLUDED.schema_version,
    stream_version = EXCLUDED.stream_version, data = EXCLUDED.data, created_at = now()
WHERE snapshots.stream_version <= EXCLUDED.stream_version
"""

LOAD_SNAPSHOT = """
SELECT stream_id, snapshot_type, schema_version, stream_version, data, created_at
FROM snapshots WHERE stream_id = $1
"""
