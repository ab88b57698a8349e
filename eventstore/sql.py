"""Every SQL statement of the event store, by name. The rest of the package calls these names.

Other components build their own queries of the log on the pieces below "the contract" (the columns of
a `RecordedEvent`, the log's visibility rule, the category rule), never on copies of them.

DDL that tables cannot express (functions, triggers) is versioned here (`*_V1`) so that a migration
keeps applying the exact text it was written with.
"""

from __future__ import annotations

NOTIFY_CHANNEL = "eventstore_events"

MAX_STREAM_ID_LENGTH = 255
"""The longest stream id (`events_stream_id_length`); `eventstore.schema` declares the check with it."""

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

APPEND_BATCH_LOCK_BUDGET_MS = 25
"""Milliseconds an append batch may take: once they have passed, it writes none of its remaining appends
(they are sent again alone), and its appends stop waiting for locks held elsewhere after what is left
of them (one that would wait longer fails, alone, and is sent again by itself). The others of the batch
are not held up by a lock only one needs. Below `deadlock_timeout`."""

APPEND_BATCH_FAILED = -1
"""The status `eventstore_append_batch` gives an append of the batch that raised an error (its SQLSTATE
in `o_error`): nothing of it was written (its subtransaction rolled back), and the store sends it again
alone to meet its error."""

APPEND_BATCH_LATE = -2
"""The status of an append the batch did not try, its time being up: the store sends it again alone."""

LOCK_NOT_AVAILABLE = "55P03"

APPEND_BATCH_FUNCTION_V1 = f"""
CREATE OR REPLACE FUNCTION eventstore_append_batch(
    p_stream_ids text[], p_expected bigint[], p_ends int[],
    p_event_ids uuid[], p_types text[], p_data jsonb[], p_metadata jsonb[]
) RETURNS TABLE (o_index int, o_status int, o_version bigint, o_positions bigint[], o_log_xid bigint,
                 o_recorded_at timestamptz, o_error text)
LANGUAGE plpgsql AS $$
DECLARE
    i int;
    lo int := 1;
    v_left int;
    v_deadline timestamptz := clock_timestamp() + interval '{APPEND_BATCH_LOCK_BUDGET_MS} milliseconds';
BEGIN
    -- Appends of several callers to distinct streams in one transaction, each exactly as
    -- eventstore_append writes it alone, each in a subtransaction of its own: one that fails (a retired
    -- stream, a rule, a lock it waited for too long) is reported, not written, and the others go on.
    FOR i IN 1 .. cardinality(p_stream_ids) LOOP
        v_left := floor(extract(epoch FROM v_deadline - clock_timestamp()) * 1000);
        IF v_left < 1 THEN
            RETURN QUERY SELECT i, {APPEND_BATCH_LATE}, NULL::bigint, NULL::bigint[], NULL::bigint,
                                NULL::timestamptz, NULL::text;
        ELSE
            PERFORM set_config('lock_timeout', v_left || 'ms', true);
            BEGIN
                RETURN QUERY SELECT i, a.*, NULL::text FROM eventstore_append(
                    p_stream_ids[i], p_expected[i], p_event_ids[lo:p_ends[i]], p_types[lo:p_ends[i]],
                    p_data[lo:p_ends[i]], p_metadata[lo:p_ends[i]]) AS a;
            EXCEPTION WHEN OTHERS THEN  -- (a cancelled query is not caught: the whole batch ends)
                RETURN QUERY SELECT i, {APPEND_BATCH_FAILED}, NULL::bigint, NULL::bigint[], NULL::bigint,
                                    NULL::timestamptz, SQLSTATE::text;
            END;
        END IF;
        lo := p_ends[i] + 1;
    END LOOP;
END
$$;
"""

DROP_APPEND_BATCH_FUNCTION = (
    "DROP FUNCTION IF EXISTS eventstore_append_batch(text[], bigint[], int[], uuid[], text[], jsonb[], jsonb[])"
)

APPEND_BATCH = "SELECT * FROM eventstore_append_batch($1, $2, $3, $4, $5, $6, $7)"

APPEND_BATCH_PRESENT = (
    "SELECT to_regprocedure('eventstore_append_batch(text[], bigint[], int[], uuid[], text[], jsonb[], jsonb[])')"
    " IS NOT NULL"
)
"""Whether the database has the batch append (revision 0019): a store on an older schema appends one by one."""

NOTIFY = f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"

DUPLICATES_BUT_TRACE = """
SELECT * FROM eventstore_duplicates($1, $2, $3, $4, $5, ARRAY(
    SELECT (g.metadata - 'traceparent' - 'tracestate') || coalesce(jsonb_strip_nulls(jsonb_build_object(
               'traceparent', e.metadata -> 'traceparent', 'tracestate', e.metadata -> 'tracestate')), '{}')
    FROM unnest($3::uuid[], $6::jsonb[]) WITH ORDINALITY AS g(event_id, metadata, ord)
    LEFT JOIN events AS e ON e.event_id = g.event_id
    ORDER BY g.ord))
"""
"""`eventstore_duplicates` (arguments of `APPEND`) with each event's trace context taken as stored: an
append sent again from another span carries another `traceparent`, yet it is the same append."""

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

def per_type(condition: str, types: str, limit: str) -> str:
    """Events of the types in parameter `types` that match `condition`, in log order, at most `limit`.

    One index-ordered scan per type (`events_type_log_idx`), merged: a single scan filtering on the
    type lets the planner pick that index and sort every later event of the types, which costs ten
    times a page of the log (measured: 15 ms instead of 1.5 ms per 1,000 events).
    """
    return f"""
SELECT x.* FROM (SELECT DISTINCT unnest({types}::text[]) AS event_type) AS t
CROSS JOIN LATERAL (
    SELECT {EVENT_COLUMNS} FROM events AS e
    WHERE e.event_type = t.event_type AND {condition}
    ORDER BY e.log_xid, e.position
    LIMIT {limit}) AS x
ORDER BY x.log_xid, x.position
LIMIT {limit}
"""


READ_ALL_TYPES = per_type(f"(log_xid, position) > ($1, $2) AND {LOG_VISIBLE}", "$4", "$3")

READ_ALL_TYPE = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE event_type = $4 AND (log_xid, position) > ($1, $2) AND {LOG_VISIBLE}
ORDER BY log_xid, position
LIMIT $3
"""
"""`READ_ALL_TYPES` of one type ($4): its index returns the events in log order, with no merge and no sort
(a fifth less time a page than the merge of one scan; measured 455 against 565 ms for 99,000 events)."""

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

LAST_COMMITTED = """
SELECT log_xid, position FROM events
ORDER BY log_xid DESC, position DESC
LIMIT 1
"""
"""The newest committed event, whether readers of the log see it yet or not."""

LOG_HELD_BACK = f"coalesce((SELECT max(log_xid) FROM events) >= {LOG_HORIZON}, false)"
"""Whether committed events wait below the log's visibility line: an older transaction still running
holds them back, and sends no NOTIFY when it ends (a reader then looks again soon, not at its poll)."""

HELD_BACK = f"SELECT {LOG_HELD_BACK}"
"""`LOG_HELD_BACK` as a statement of its own."""

STATISTICS_STALE = """
SELECT s.n_mod_since_analyze >= $1 AND 2 * s.n_mod_since_analyze >= s.n_live_tup, s.last_analyze
FROM pg_stat_user_tables AS s WHERE s.relid = 'events'::regclass
"""
"""($1 the fewest changes worth it): whether `events` changed since its last ANALYZE by at least half the
rows it has now (its planner statistics describe less than half of it; a VACUUM, which counts the rows
again but keeps the old statistics, does not hide it), and when it was analyzed."""

LAST_ANALYZE = "SELECT pg_stat_get_last_analyze_time('events'::regclass)"

_ANALYZE_KEY = "hashtextextended('eventstore analyze', 'events'::regclass::oid::bigint)"
ANALYZE_LOCK = f"SELECT pg_try_advisory_lock({_ANALYZE_KEY})"
ANALYZE_UNLOCK = f"SELECT pg_advisory_unlock({_ANALYZE_KEY})"
"""One process analyzes a schema's `events` at a time (the key is the table's)."""

ANALYZE_TIMEOUT = "SELECT set_config('lock_timeout', '1s', false)"
"""ANALYZE waits for no lock longer than this: a GRANT left open on the table would hold it to the end."""

ANALYZE_EVENTS = "ANALYZE (SKIP_LOCKED) events"
"""Skipped while another holds the table's maintenance lock (an anti-wraparound vacuum is not cancelled
for us, and a runner's start must not wait for it); a role that may not analyze it gets a warning."""

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

# Not on an archived stream (the archive drops its snapshot: a later one would let the aggregate load, and
# would keep personal data out of a `forget`'s reach); the key-share lock makes a save wait for an archive.
# Nothing is stored for a stream that is archived or not at that version yet (the snapshot of a save
# whose unit of work rolled back): it would be trusted once the stream got there, over older ones.
SAVE_SNAPSHOT = """
INSERT INTO snapshots (stream_id, snapshot_type, schema_version, stream_version, data)
SELECT $1, $2, $3, $4, $5 FROM streams WHERE stream_id = $1 AND archived_at IS NULL AND version >= $4 FOR KEY SHARE
ON CONFLICT (stream_id) DO UPDATE
SET snapshot_type = EXCLUDED.snapshot_type, schema_version = EXCLUDED.schema_version,
    stream_version = EXCLUDED.stream_version, data = EXCLUDED.data, created_at = now()
WHERE snapshots.stream_version <= EXCLUDED.stream_version
"""

LOAD_SNAPSHOT = """
SELECT stream_id, snapshot_type, schema_version, stream_version, data, created_at
FROM snapshots WHERE stream_id = $1
"""

# -- tags and conditional appends (dynamic consistency boundaries, see eventstore.query) ----------------

# Status codes returned by eventstore_append_tagged, beside those of eventstore_append.
CONDITION_FAILED = 4
FUTURE_CHECKPOINT = 5
OVERTAKEN = 6

# A query travels as parallel arrays, one entry per branch (eventstore.query.branches): a tag branch
# scans event_tags for its first tag, filtered on its type set and other tags; a type branch scans the
# type index. Both below use the same names: b.tag, b.type, b.types (a jsonb array), b.others (same).
_BRANCHES = "unnest({tags}::text[], {types}::text[], {type_sets}::jsonb[], {others}::jsonb[]) AS b(tag, type, types, others)"

_HAS_OTHER_TAGS = """NOT EXISTS (
                SELECT 1 FROM jsonb_array_elements_text(b.others) AS o(tag)
                WHERE NOT EXISTS (SELECT 1 FROM event_tags AS t2
                                  WHERE t2.tag = o.tag AND t2.log_xid = t.log_xid AND t2.position = t.position))"""

# The check looks past the visibility horizon: under the locks, a committed event that readers cannot
# see yet fails the condition as surely as a visible one.
APPEND_TAGGED_FUNCTION_V1 = f"""
CREATE FUNCTION eventstore_append_tagged(
    p_stream_id text, p_expected bigint, p_event_ids uuid[], p_types text[], p_data jsonb[], p_metadata jsonb[],
    p_tags text[], p_tag_events int[], p_lock_keys bigint[], p_lock_modes int[],
    p_tag_branches text[], p_type_branches text[], p_type_sets jsonb[], p_other_tags jsonb[],
    p_after_xid bigint, p_after_position bigint, p_seen bigint[]
) RETURNS TABLE (o_status int, o_version bigint, o_positions bigint[], o_log_xid bigint,
                 o_recorded_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_conditional boolean := p_tag_branches IS NOT NULL;
    v_early_xid bigint := pg_current_xact_id_if_assigned()::text::bigint;
    v_status int;
    v_version bigint;
    v_positions bigint[];
    v_log bigint;
    v_at timestamptz;
    v_hit_xid bigint;
    v_hit_position bigint;
BEGIN
    -- A retried append of stored events is answered by eventstore_append, condition or not: the
    -- condition was checked when they were written (and their own tags would now fail it).
    IF NOT EXISTS (SELECT 1 FROM events AS e WHERE e.event_id = ANY (p_event_ids)) THEN
        IF v_conditional THEN
            IF current_setting('transaction_isolation') <> 'read committed' THEN
                RAISE EXCEPTION 'a conditional append needs READ COMMITTED isolation, not %',
                    current_setting('transaction_isolation') USING ERRCODE = 'feature_not_supported';
            END IF;
            IF p_after_xid > pg_snapshot_xmax(pg_current_snapshot())::text::bigint
               OR p_after_position > coalesce((SELECT max(e.position) FROM events AS e), 0) THEN
                RETURN QUERY SELECT {FUTURE_CHECKPOINT}, NULL::bigint, NULL::bigint[], NULL::bigint, NULL::timestamptz;
                RETURN;
            END IF;
        END IF;

        -- One pass in key order: exclusive for the keys the condition checks, shared for those written.
        FOR i IN 1 .. coalesce(cardinality(p_lock_keys), 0) LOOP
            IF p_lock_modes[i] & 2 <> 0 THEN
                PERFORM pg_advisory_xact_lock(p_lock_keys[i]);
            ELSE
                PERFORM pg_advisory_xact_lock_shared(p_lock_keys[i]);
            END IF;
        END LOOP;

        -- This transaction had its id before it took the locks (it wrote earlier in a unit of work), so
        -- its events could land in the log before those of a conditional append that committed
        -- meanwhile without seeing them. Each statement below sees what committed before the locks.
        IF v_early_xid IS NOT NULL AND EXISTS (
            SELECT 1 FROM unnest(p_lock_keys, p_lock_modes) AS k(key, mode)
            JOIN condition_locks AS c ON c.key = k.key
            WHERE k.mode & 1 <> 0 AND c.log_xid > v_early_xid
        ) THEN
            RETURN QUERY SELECT {OVERTAKEN}, NULL::bigint, NULL::bigint[], NULL::bigint, NULL::timestamptz;
            RETURN;
        END IF;

        IF v_conditional THEN
            SELECT hit.log_xid, hit.position INTO v_hit_xid, v_hit_position
            FROM {_BRANCHES.format(tags="p_tag_branches", types="p_type_branches", type_sets="p_type_sets", others="p_other_tags")}
            CROSS JOIN LATERAL (
                (SELECT t.log_xid, t.position FROM event_tags AS t
                 WHERE b.tag IS NOT NULL AND t.tag = b.tag
                   AND (t.log_xid, t.position) > (p_after_xid, p_after_position) AND t.position <> ALL (p_seen)
                   AND (b.types IS NULL OR b.types ? t.event_type)
                   AND {_HAS_OTHER_TAGS}
                 ORDER BY t.log_xid, t.position
                 LIMIT 1)
                UNION ALL
                (SELECT e.log_xid, e.position FROM events AS e
                 WHERE b.tag IS NULL AND e.event_type = b.type
                   AND (e.log_xid, e.position) > (p_after_xid, p_after_position) AND e.position <> ALL (p_seen)
                 ORDER BY e.event_type, e.log_xid, e.position  -- the index's order: never a scan of the log
                 LIMIT 1)
            ) AS hit
            LIMIT 1;
            IF FOUND THEN  -- returns where the conflicting event is, so a retry can wait until it shows
                RETURN QUERY SELECT {CONDITION_FAILED}, NULL::bigint, ARRAY[v_hit_position], v_hit_xid,
                                    NULL::timestamptz;
                RETURN;
            END IF;
        END IF;
    END IF;

    SELECT * INTO v_status, v_version, v_positions, v_log, v_at
    FROM eventstore_append(p_stream_id, p_expected, p_event_ids, p_types, p_data, p_metadata);
    IF v_status = {APPENDED} THEN
        INSERT INTO event_tags (tag, log_xid, position, event_type)
        SELECT g.tag, v_log, v_positions[g.ev], p_types[g.ev]
        FROM unnest(p_tags, p_tag_events) AS g(tag, ev);
        IF v_conditional THEN
            INSERT INTO condition_locks AS c (key, log_xid)
            SELECT k.key, v_log FROM unnest(p_lock_keys, p_lock_modes) AS k(key, mode)
            WHERE k.mode & 2 <> 0
            ORDER BY k.key
            ON CONFLICT (key) DO UPDATE SET log_xid = greatest(c.log_xid, EXCLUDED.log_xid);
        END IF;
    END IF;
    RETURN QUERY SELECT v_status, v_version, v_positions, v_log, v_at;
END
$$;
"""

# Version 2: the retry check looks each event id up in its index. `event_id = ANY (p_event_ids)` let the
# session's one generic plan (migration 0014) be a scan of the whole table when the plan was made on a
# small one: 0.3 ms at 1,300 events, growing with the log, on every conditional append of the session.
APPEND_TAGGED_FUNCTION_V2 = APPEND_TAGGED_FUNCTION_V1.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1).replace(
    """IF NOT EXISTS (SELECT 1 FROM events AS e WHERE e.event_id = ANY (p_event_ids)) THEN""",
    """IF NOT EXISTS (SELECT FROM unnest(p_event_ids) AS u(id)
                   WHERE (SELECT true FROM events AS e WHERE e.event_id = u.id)) THEN""",
).replace("LANGUAGE plpgsql AS $$", "LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$", 1)
assert APPEND_TAGGED_FUNCTION_V2.count("force_generic_plan") == 1

# Version 3: a checkpoint is "from the future" only if no event, live or archived, has reached its
# position. Archiving the newest events lowered `max(position)` of `events` below checkpoints that reads
# had handed out, and conditional appends on them were refused. The archive is only looked at then.
_FUTURE_V2 = """            IF p_after_xid > pg_snapshot_xmax(pg_current_snapshot())::text::bigint
               OR p_after_position > coalesce((SELECT max(e.position) FROM events AS e), 0) THEN
                RETURN QUERY"""
_FUTURE_V3 = """            IF p_after_xid > pg_snapshot_xmax(pg_current_snapshot())::text::bigint
               OR (p_after_position > coalesce((SELECT max(e.position) FROM events AS e), 0)
                   AND p_after_position > coalesce((SELECT max(a.position) FROM events_archive AS a), 0)) THEN
                RETURN QUERY"""
APPEND_TAGGED_FUNCTION_V3 = APPEND_TAGGED_FUNCTION_V2.replace(_FUTURE_V2, _FUTURE_V3, 1)
assert APPEND_TAGGED_FUNCTION_V3.count("events_archive") == 1

DROP_APPEND_TAGGED_FUNCTION = (
    "DROP FUNCTION IF EXISTS eventstore_append_tagged(text, bigint, uuid[], text[], jsonb[], jsonb[], text[], int[],"
    " bigint[], int[], text[], text[], jsonb[], jsonb[], bigint, bigint, bigint[])"
)

APPEND_TAGGED = (
    "SELECT * FROM eventstore_append_tagged($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
)



def _read_query(visible: str, tail: str = "") -> str:
    return f"""
SELECT {EVENT_COLUMNS}{tail} FROM events
WHERE position = ANY (ARRAY(SELECT page.position FROM (
    SELECT DISTINCT m.log_xid, m.position FROM {_BRANCHES.format(tags="$4", types="$5", type_sets="$6", others="$7")}
    CROSS JOIN LATERAL (
        (SELECT t.log_xid, t.position FROM event_tags AS t
         WHERE b.tag IS NOT NULL AND t.tag = b.tag AND (t.log_xid, t.position) > ($1, $2){visible.format(x="t")}
           AND (b.types IS NULL OR b.types ? t.event_type)
           AND {_HAS_OTHER_TAGS}
         ORDER BY t.log_xid, t.position
         LIMIT $3)
        UNION ALL
        (SELECT e.log_xid, e.position FROM events AS e
         WHERE b.tag IS NULL AND e.event_type = b.type AND (e.log_xid, e.position) > ($1, $2){visible.format(x="e")}
         ORDER BY e.event_type, e.log_xid, e.position
         LIMIT $3)
    ) AS m
    ORDER BY m.log_xid, m.position
    LIMIT $3
) AS page))
ORDER BY log_xid, position
"""


READ_QUERY = _read_query(f" AND {{x}}.log_xid < {LOG_HORIZON}")
"""($1, $2 after; $3 limit; $4-$7 branches) Events matching a query, in log order, with read_all's visibility.

Each branch reads at most a page in index order, so a page costs what a category's does.
"""

READ_QUERY_COMMITTED = _read_query("", f", {LOG_HORIZON} AS horizon")
"""READ_QUERY over every committed event, each row with the horizon of the statement's snapshot.

For decisions: every event below the horizon is final, so the append condition needs only the horizon
and the events read above it, and a decision never waits for the log to show a commit.
"""

# Version 1 of the query reads as functions. Both statements are planned afresh on every call as
# prepared statements (PostgreSQL keeps choosing custom plans for them: 0.2-0.3 ms of planning against
# 0.1 ms of execution, measured), so they run inside PL/pgSQL functions that keep one generic plan per
# session, as `eventstore_append_tagged` does since the same migration. A later `CREATE OR REPLACE` of
# any of the three must keep the `SET plan_cache_mode` clause.
_QUERY_FUNCTION = """
CREATE FUNCTION {name}(
    p_after_xid bigint, p_after_position bigint, p_limit bigint,
    p_tags text[], p_types text[], p_type_sets jsonb[], p_others jsonb[]
) RETURNS TABLE (event_id uuid, event_type text, data jsonb, metadata jsonb, stream_id text,
                 stream_version bigint, "position" bigint, log_xid bigint, recorded_at timestamptz{extra})
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan AS $body$
#variable_conflict use_column
BEGIN
    RETURN QUERY {query};
END
$body$
"""

APPEND_TAGGED_SIGNATURE = (
    "eventstore_append_tagged(text, bigint, uuid[], text[], jsonb[], jsonb[], text[], int[], bigint[], int[], "
    "text[], text[], jsonb[], jsonb[], bigint, bigint, bigint[])"
)

GENERIC_PLANS_V1 = (
    _QUERY_FUNCTION.format(name="eventstore_read_query", extra="", query=READ_QUERY),
    _QUERY_FUNCTION.format(name="eventstore_read_query_committed", extra=", horizon bigint", query=READ_QUERY_COMMITTED),
    f"ALTER FUNCTION {APPEND_TAGGED_SIGNATURE} SET plan_cache_mode = force_generic_plan",
)
DROP_GENERIC_PLANS_V1 = (
    "DROP FUNCTION eventstore_read_query(bigint, bigint, bigint, text[], text[], jsonb[], jsonb[])",
    "DROP FUNCTION eventstore_read_query_committed(bigint, bigint, bigint, text[], text[], jsonb[], jsonb[])",
    f"ALTER FUNCTION {APPEND_TAGGED_SIGNATURE} RESET plan_cache_mode",
)

CALL_READ_QUERY = "SELECT * FROM eventstore_read_query($1, $2, $3, $4, $5, $6, $7)"
"""`READ_QUERY` through its function (one generic plan per session)."""

CALL_READ_QUERY_COMMITTED = "SELECT * FROM eventstore_read_query_committed($1, $2, $3, $4, $5, $6, $7)"
"""`READ_QUERY_COMMITTED` through its function (one generic plan per session)."""

# -- personal data (crypto-shredding, `eventstore.personal`) -------------------------------------------

SUBJECT_KEYS = """
SELECT subject, key_id, wrapped_key FROM subject_keys WHERE subject = ANY($1::text[])
"""
"""($1 subjects): their wrapped data keys; wrapped_key is NULL once a subject is forgotten."""

SUBJECT_KEY_SAMPLE = """
SELECT subject, key_id, wrapped_key FROM subject_keys
WHERE wrapped_key IS NOT NULL
ORDER BY key_id = $1, subject
LIMIT 1
"""
"""One stored key, one wrapped by another master key than $1 first: what a starting store checks."""

CREATE_SUBJECT_KEYS = """
INSERT INTO subject_keys (subject, key_id, wrapped_key)
SELECT s.subject, $2, s.wrapped_key FROM unnest($1::text[], $3::bytea[]) AS s(subject, wrapped_key)
ON CONFLICT (subject) DO NOTHING
"""

LOCK_SUBJECT = "SELECT forgotten_at FROM subject_keys WHERE subject = $1 FOR UPDATE"

FORGET_SUBJECT = """
UPDATE subject_keys SET wrapped_key = NULL, key_id = NULL, forgotten_at = coalesce(forgotten_at, now())
WHERE subject = $1
"""

# Snapshots cache aggregate states in plaintext: those of streams holding a forgotten subject's data go
# (the next load replays the events, now redacted). The partial index on the subjects makes it cheap.
DROP_SUBJECT_SNAPSHOTS = """
DELETE FROM snapshots WHERE stream_id IN (
    SELECT stream_id FROM events
    WHERE metadata ? 'personal_data' AND metadata -> 'personal_data' -> 'subjects' ? $1
    UNION
    SELECT stream_id FROM events_archive
    WHERE metadata ? 'personal_data' AND metadata -> 'personal_data' -> 'subjects' ? $1)
"""
"""Archived streams too: a save can write a snapshot just after its stream was archived."""

_SUBJECT_LOCKS = 0x45530001
"""The first key of the two-key advisory locks on subjects (a space apart from the one-key locks)."""

HOLD_SUBJECTS = f"""
SELECT pg_advisory_xact_lock_shared({_SUBJECT_LOCKS}, hashtext(s)) FROM unnest($1::text[]) AS s ORDER BY s
"""
"""($1 subjects): in an append's transaction, a shared hold on the subjects its events were sealed for,
until it commits. A `forget` (`FORGET_LOCK`) waits for the append, whose inline projections it then
scrubs; an append that waited for a `forget` finds the key gone (`LIVE_SUBJECTS`) and is refused,
instead of storing events sealed with a deleted key and handing their plaintext to inline projections.
An advisory lock, not a row lock: a row lock would give the transaction an id before its append, and
the append function would take a concurrent conditional append for one that overtook it."""

LIVE_SUBJECTS = "SELECT subject FROM subject_keys WHERE subject = ANY($1::text[]) AND wrapped_key IS NOT NULL"
"""($1 subjects): those not forgotten; read after `HOLD_SUBJECTS` (a statement of its own, so it sees a
`forget` that committed while the hold waited)."""

FORGET_LOCK = f"SELECT pg_advisory_xact_lock({_SUBJECT_LOCKS}, hashtext($1))"

# -- stream lifecycle (`eventstore.lifecycle`) -----------------------------------------------------------

STREAM_TOMBSTONED = "ES002"
"""The SQLSTATE with which a tombstoned stream refuses an append (`StreamTombstoned`)."""

STREAM_ARCHIVED = "ES003"
"""The SQLSTATE with which an archived stream refuses an append until it is restored (`StreamArchived`)."""

DELETED_PREFIX = "$deleted-"
DELETED_HASHED_PREFIX = "$deleted#"
"""A deletion is recorded in `$deleted-<stream id>`, or `$deleted#<sha256 of the id>` for an id too long
to take the prefix (no stream id of the first form can be one of the second)."""

STREAM_DELETED = "$StreamDeleted"
"""The event the maintenance function records for each stream it hard-deletes (in `$deleted-<stream id>`)."""

# A guard on the row every append locks and moves on: appends never pay more than the WHEN test, and
# the append function itself stays as it is. Its only writes of `version` are appends, so a change of
# version on an archived or tombstoned stream is an append to refuse.
DELETION_RECORDS = f"""
SELECT DISTINCT ON (stream_id) {EVENT_COLUMNS} FROM events
WHERE stream_id = ANY($1::text[]) AND event_type = '{STREAM_DELETED}'
ORDER BY stream_id, stream_version DESC
"""
"""($1 deletion record streams): the `STREAM_DELETED` event each got last (in a deletion's transaction: its own)."""

STREAMS_LAST_WRITTEN = """
SELECT x.stream_id, max(x.recorded_at) AS last_at FROM (
    SELECT stream_id, recorded_at FROM events WHERE stream_id = ANY($1::text[])
    UNION ALL
    SELECT stream_id, recorded_at FROM events_archive WHERE stream_id = ANY($1::text[])) AS x
GROUP BY x.stream_id
"""
"""($1 stream ids): when each was last written, live or archived (retention's check under the lock)."""

LOCK_STREAMS = "SELECT stream_id FROM streams WHERE stream_id = ANY($1::text[]) ORDER BY stream_id FOR UPDATE"

STREAM_GUARD_V1 = (
    f"""
CREATE FUNCTION eventstore_stream_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.tombstoned_at IS NOT NULL THEN
        RAISE EXCEPTION 'stream % is tombstoned: it can never be written again', OLD.stream_id
            USING ERRCODE = '{STREAM_TOMBSTONED}';
    END IF;
    RAISE EXCEPTION 'stream % is archived: restore it before writing to it', OLD.stream_id
        USING ERRCODE = '{STREAM_ARCHIVED}';
END
$$
""",
    """
CREATE TRIGGER streams_lifecycle BEFORE UPDATE OF version ON streams FOR EACH ROW
WHEN ((OLD.tombstoned_at IS NOT NULL OR OLD.archived_at IS NOT NULL) AND NEW.version IS DISTINCT FROM OLD.version)
EXECUTE FUNCTION eventstore_stream_guard()
""",
)

_ARCHIVE_COLUMNS = "position, log_xid, stream_id, stream_version, event_id, event_type, data, metadata, recorded_at"

# The one way past the append-only triggers. SECURITY DEFINER, so it runs as its owner (the role that
# migrated the schema), which may set session_replication_role: with it at `replica` no ordinary
# trigger fires, neither the append-only guard nor the outbox (a restored event is not published
# again). Every call locks the streams it touches, moves or deletes their events, and a deletion is
# recorded as a `$StreamDeleted` event of its own, appended the ordinary way (triggers on again).
def _maintenance_function(streams: str, archived: str, record: str) -> str:
    """`eventstore_maintenance`: its versions differ in how they take the streams (`streams`: the locks,
    `v_ids`, `v_counts`), in what an archive drops besides moving the events, and in the record's stream id."""
    moved_out = ", ".join("e." + c for c in _ARCHIVE_COLUMNS.split(", "))
    moved_back = ", ".join("a." + c for c in _ARCHIVE_COLUMNS.split(", "))
    return f"""
CREATE FUNCTION eventstore_maintenance(p_action text, p_stream_ids text[], p_reason text)
RETURNS TABLE (o_stream_id text, o_events bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path FROM CURRENT
SET session_replication_role = origin
AS $$
DECLARE
    v_ids text[];
    v_counts bigint[];
    i int;
BEGIN
    IF p_action NOT IN ('archive', 'restore', 'delete') THEN
        RAISE EXCEPTION 'unknown maintenance action %', p_action USING ERRCODE = 'invalid_parameter_value';
    END IF;
{streams}
    PERFORM set_config('session_replication_role', 'replica', true);
    IF p_action = 'archive' THEN
        WITH moved AS (
            DELETE FROM events AS e WHERE e.stream_id = ANY (v_ids)
            RETURNING {moved_out})
        INSERT INTO events_archive ({_ARCHIVE_COLUMNS}) SELECT {_ARCHIVE_COLUMNS} FROM moved;
{archived}        UPDATE streams SET archived_at = now() WHERE stream_id = ANY (v_ids);
    ELSIF p_action = 'restore' THEN
        WITH moved AS (
            DELETE FROM events_archive AS a WHERE a.stream_id = ANY (v_ids)
            RETURNING {moved_back})
        INSERT INTO events ({_ARCHIVE_COLUMNS}) SELECT {_ARCHIVE_COLUMNS} FROM moved;
        UPDATE streams SET archived_at = NULL WHERE stream_id = ANY (v_ids);
    ELSE
        DELETE FROM events WHERE stream_id = ANY (v_ids);
        DELETE FROM events_archive WHERE stream_id = ANY (v_ids);
        DELETE FROM snapshots WHERE stream_id = ANY (v_ids);
        UPDATE streams SET tombstoned_at = coalesce(tombstoned_at, now()), archived_at = NULL
        WHERE stream_id = ANY (v_ids);
    END IF;
    PERFORM set_config('session_replication_role', 'origin', true);

    IF p_action = 'delete' THEN
        FOR i IN 1 .. cardinality(v_ids) LOOP
            PERFORM eventstore_append(
                {record}, ARRAY[gen_random_uuid()], ARRAY['{STREAM_DELETED}'],
                ARRAY[jsonb_build_object('stream_id', v_ids[i], 'events', v_counts[i], 'reason', p_reason)],
                ARRAY[jsonb_build_object('maintenance', 'delete', 'by', session_user)]);
        END LOOP;
    END IF;
    RETURN QUERY SELECT u.stream_id, u.n FROM unnest(v_ids, v_counts) AS u(stream_id, n);
END
$$
"""


_COUNTS = """
        SELECT x.stream_id, count(*) AS n FROM (
            SELECT e.stream_id FROM events AS e WHERE e.stream_id = ANY ({ids})
            UNION ALL
            SELECT a.stream_id FROM events_archive AS a WHERE a.stream_id = ANY ({ids})) AS x
        GROUP BY x.stream_id"""

MAINTENANCE_FUNCTION_V1 = _maintenance_function(
    streams=f"""    SELECT array_agg(s.stream_id ORDER BY s.stream_id),
           array_agg(coalesce(c.n, 0) ORDER BY s.stream_id)
    INTO v_ids, v_counts
    FROM (SELECT st.stream_id FROM streams AS st WHERE st.stream_id = ANY (p_stream_ids)
          ORDER BY st.stream_id FOR UPDATE) AS s
    LEFT JOIN ({_COUNTS.format(ids="p_stream_ids")}) AS c ON c.stream_id = s.stream_id;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
""",
    archived="",
    record="'$deleted-' || v_ids[i], -2",
)

# Version 2: the streams are locked in a statement of their own, and everything after it reads what
# committed while it waited (in a PL/pgSQL function each statement takes a new snapshot, but a statement
# that waited for a lock still reads with the one it took before waiting). Version 1 counted the events
# in its locking statement and the caller dropped the tag index and snapshots before the function took
# the locks: an append committing in between was moved or deleted but not counted, and its tags and a
# snapshot written meanwhile were left behind. A stream id too long for the record's prefix is hashed.
MAINTENANCE_FUNCTION_V2 = _maintenance_function(
    streams=f"""    SELECT array_agg(s.stream_id ORDER BY s.stream_id) INTO v_ids
    FROM (SELECT st.stream_id FROM streams AS st WHERE st.stream_id = ANY (p_stream_ids)
          ORDER BY st.stream_id FOR UPDATE) AS s;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(coalesce(c.n, 0) ORDER BY u.stream_id) INTO v_counts
    FROM unnest(v_ids) AS u(stream_id)
    LEFT JOIN ({_COUNTS.format(ids="v_ids")}) AS c ON c.stream_id = u.stream_id;
    IF p_action IN ('archive', 'delete') THEN
        DELETE FROM event_tags AS t USING events AS e
        WHERE e.stream_id = ANY (v_ids) AND t.log_xid = e.log_xid AND t.position = e.position;
    END IF;
""",
    archived="        DELETE FROM snapshots WHERE stream_id = ANY (v_ids);\n",
    record=f"""CASE WHEN char_length(v_ids[i]) <= {MAX_STREAM_ID_LENGTH - len(DELETED_PREFIX)}
                     THEN '{DELETED_PREFIX}' || v_ids[i]
                     ELSE '{DELETED_HASHED_PREFIX}' || encode(sha256(convert_to(v_ids[i], 'UTF8')), 'hex') END,
                -2""",
).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)

EVENTS_ARCHIVE_SUBJECTS_INDEX = (
    "CREATE INDEX events_archive_personal_subjects_idx ON events_archive "
    "USING gin ((metadata -> 'personal_data' -> 'subjects')) WHERE metadata ? 'personal_data'"
)
"""A `forget` looks for the subject's streams in the archive too (their snapshots go)."""

DROP_LIFECYCLE_V1 = (
    "DROP FUNCTION IF EXISTS eventstore_maintenance(text, text[], text)",
    "DROP TRIGGER IF EXISTS streams_lifecycle ON streams",
    "DROP FUNCTION IF EXISTS eventstore_stream_guard()",
)

MAINTENANCE = "SELECT o_stream_id, o_events FROM eventstore_maintenance($1, $2, $3)"

def _tags_of(events: str) -> str:
    """The tag index rows of the events matching `events` (a condition on `e`), from their metadata's tags.

    Only strings that are valid tags: metadata written before `tags` was reserved may hold anything there.
    """
    return f"""
INSERT INTO event_tags (tag, log_xid, position, event_type)
SELECT t.v #>> '{{}}', e.log_xid, e.position, e.event_type
FROM events AS e
CROSS JOIN LATERAL jsonb_array_elements(
    CASE WHEN jsonb_typeof(e.metadata -> 'tags') = 'array' THEN e.metadata -> 'tags' ELSE '[]' END) AS t(v)
WHERE {events} AND e.metadata ? 'tags'
  AND jsonb_typeof(t.v) = 'string' AND char_length(t.v #>> '{{}}') BETWEEN 1 AND {_MAX_TAG_LENGTH}
ON CONFLICT DO NOTHING
"""


_MAX_TAG_LENGTH = 255  # `eventstore.query.MAX_TAG_LENGTH`

REBUILD_TAG_INDEX = _tags_of("true")
"""The tag index of every event (the upgrade that creates it, which may follow a downgrade that dropped it)."""

RESTORE_STREAM_TAGS = _tags_of("e.stream_id = ANY ($1::text[])")
"""After a restore: the tag index rebuilt from the tags each event keeps in its metadata."""

STREAM_STATES = """
SELECT stream_id, version, archived_at, tombstoned_at FROM streams WHERE stream_id = ANY($1::text[])
"""

TOMBSTONE = """
UPDATE streams SET tombstoned_at = coalesce(tombstoned_at, now()) WHERE stream_id = $1
RETURNING tombstoned_at
"""

# Streams of a category with the time of their last event, newest first (live and archived events).
CATEGORY_STREAMS = f"""
SELECT x.stream_id, max(x.recorded_at) AS last_at, now() - max(x.recorded_at) AS age
FROM (
    SELECT stream_id, recorded_at FROM events WHERE category = $1
    UNION ALL
    SELECT stream_id, recorded_at FROM events_archive WHERE {CATEGORY} = $1) AS x
GROUP BY x.stream_id
ORDER BY last_at DESC, x.stream_id
"""
