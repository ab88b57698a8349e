"""Every SQL statement of the projections, by name. The rest of the package calls these names.

Reads of the global log reuse the event store's statements, or build on its columns and visibility
rule (a reader never passes an event whose transaction commits later), never on copies of them.
"""

from __future__ import annotations

from eventstore import sql as log

# -- the global log --------------------------------------------------------------------------------

READ_LOG = log.READ_ALL_TYPES
"""($1 log_xid, $2 position, $3 limit, $4 types): the next events a projection handles."""

READ_LOG_OF_TYPE = log.READ_ALL_TYPE
"""`READ_LOG` for a projection that handles one type ($4 the type)."""

LOG_HEAD = log.HEAD

READ_COMMITTED = log.per_type("(log_xid, position) > ($1, $2)", "$4", "$3")
"""Every committed event after a checkpoint, also behind transactions still running.

Only for inline projections, while holding their checkpoint row exclusively: then no append can be
between writing its events and running its hook, so what this reads is exactly what the hooks of
committed transactions have applied.
"""

WAKE_RUNNERS = log.NOTIFY
"""Sent after an operator resumes a failed projection: its runner waits for a NOTIFY, not for its poll."""

COUNT_LOG = f"""
SELECT count(*) FROM events
WHERE (log_xid, position) > ($1, $2) AND event_type = ANY($3::text[]) AND {log.LOG_VISIBLE}
"""

# -- checkpoints -----------------------------------------------------------------------------------

_CHECKPOINT = """
name, mode, version, generation, tables, log_xid, position, status, runner, last_error,
failed_event_id, failed_event_type, failed_log_xid, failed_position, failed_at, updated_at, partitions,
partition_key
"""

INSERT_CHECKPOINT = """
INSERT INTO projection_checkpoints (name, mode, version, generation, tables, partitions, partition_key)
VALUES ($1, $2, $3, 1, $4, $5, $6)
ON CONFLICT (name) DO NOTHING
RETURNING generation
"""

SELECT_CHECKPOINT = f"SELECT {_CHECKPOINT} FROM projection_checkpoints WHERE name = $1"

LOCK_CHECKPOINT = f"SELECT {_CHECKPOINT} FROM projection_checkpoints WHERE name = $1 FOR UPDATE"
"""Taken first by every transaction that writes a projection's tables or moves its checkpoint."""

LOCK_BATCH = f"""
SELECT c.*, set_config('search_path', quote_ident($2) || ', ' || $3, true) AS search_path,
       head.log_xid AS head_log_xid, head.position AS head_position, {log.LOG_HELD_BACK} AS held
FROM ({LOCK_CHECKPOINT}) AS c LEFT JOIN LATERAL ({log.HEAD}) AS head ON true
"""
"""A runner's batch begins with one round trip instead of four: `LOCK_CHECKPOINT`, `USE_GENERATION`
for the generation the runner expects ($2 its schema, $3 the connection's own search_path; set again
if the row names another), `LOG_HEAD`, read before the batch's events as `read_batch` needs, and
whether the log holds events back (`held`: what a batch that comes back short waits for)."""

SHARE_GENERATION = "SELECT pg_advisory_xact_lock_shared(key) FROM unnest($1::bigint[]) AS key"
"""Taken by every append whose inline hooks write a projection's tables, until the append commits."""

HOLD_GENERATION = "SELECT pg_advisory_xact_lock($1)"
"""Taken by a swap or reset: waits for the appends writing into the old generation, holds off new ones."""

APPLIED_SETTING = "projections.inline_applied"
"""Names of the inline projections whose hooks ran in this transaction, comma-separated."""

INLINE_STATE = f"""
SELECT name, mode, version, generation, tables, partitions, partition_key, current_setting('search_path') AS search_path,
       set_config('{APPLIED_SETTING}',
                  concat_ws(',', nullif(current_setting('{APPLIED_SETTING}', true), ''), $2::text), true)
FROM projection_checkpoints WHERE name = ANY($1::text[])
"""
"""Read after SHARE_GENERATION, in a statement of its own, so it sees a swap that committed meanwhile.

It also records ($2) that this transaction applies those projections, for their guards (below).
"""

# -- guards of inline projections --------------------------------------------------------------------

# An inline projection is only current if every event it handles passes through its hook, and a process
# that does not run the hook (a script that imported only the event store) would append around it.
# So each inline projection has a guard on the events table: a constraint trigger, deferred to commit,
# that refuses an event of the projection's types unless the transaction ran the projection's hook.
GUARD_FUNCTION_V1 = f"""
CREATE FUNCTION projections_inline_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT coalesce(
        TG_ARGV[0] = ANY (string_to_array(current_setting('{APPLIED_SETTING}', true), ',')), false
    ) THEN
        RAISE EXCEPTION 'event % of stream % is handled by the inline projection %, which the writing process '
            'does not run: append from a process that attaches it, or drop the projection',
            NEW.event_type, NEW.stream_id, TG_ARGV[0]
            USING ERRCODE = '{log.APPEND_REFUSED}';
    END IF;
    RETURN NULL;
END
$$;
"""

DROP_GUARD_FUNCTION_V1 = "DROP FUNCTION IF EXISTS projections_inline_guard()"

GUARD_ARGUMENTS = """
SELECT t.tgargs FROM pg_trigger AS t
WHERE t.tgrelid = (SELECT c.oid FROM pg_class AS c
                   WHERE c.relname = 'events' AND c.relnamespace = $2::regnamespace)
  AND t.tgname = $1
"""
"""($1 trigger name, $2 the events table's schema): the arguments of a projection's guard, if it has one."""

EVENTS_SCHEMA = """
SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = 'events'::regclass
"""

ADVANCE = """
UPDATE projection_checkpoints
SET log_xid = $2, position = $3, status = 'running', runner = $4, updated_at = now()
WHERE name = $1
"""

CLAIM = """
UPDATE projection_checkpoints
SET status = CASE WHEN status = 'failed' THEN 'failed' ELSE 'running' END, runner = $2, updated_at = now()
WHERE name = $1
"""

RELEASE = """
UPDATE projection_checkpoints
SET status = CASE WHEN status = 'failed' THEN 'failed' ELSE 'stopped' END, runner = NULL, updated_at = now()
WHERE name = $1 AND runner = $2
"""

FAIL = """
UPDATE projection_checkpoints
SET status = 'failed', last_error = $3, failed_event_id = $4, failed_event_type = $5,
    failed_log_xid = $6, failed_position = $7, failed_at = now(), updated_at = now()
WHERE name = $1 AND generation = $2
"""

RESUME = """
UPDATE projection_checkpoints
SET status = 'stopped', failed_event_id = NULL, failed_event_type = NULL, failed_log_xid = NULL,
    failed_position = NULL, failed_at = NULL, updated_at = now()
WHERE name = $1 AND status = 'failed'
RETURNING name
"""

SWAP = """
UPDATE projection_checkpoints
SET generation = $2, version = $3, mode = $4, tables = $5, log_xid = $6, position = $7, partitions = $8,
    partition_key = $9,
    status = CASE WHEN status = 'failed' THEN 'stopped' ELSE status END,
    failed_event_id = NULL, failed_event_type = NULL, failed_log_xid = NULL, failed_position = NULL,
    failed_at = NULL, updated_at = now()
WHERE name = $1
"""
"""Point a projection at another generation of its tables, built up to checkpoint ($6, $7), in $8 partitions
by key $9 (NULL: the stream id)."""

# -- partitions ------------------------------------------------------------------------------------

_PARTITION_KEY = """COALESCE(CASE $7::text WHEN 'data' THEN data #>> $8::text[]
                               WHEN 'metadata' THEN metadata #>> $8::text[] END, stream_id)"""

READ_PARTITION = log.per_type(
    f"(log_xid, position) > ($1, $2) AND {log.LOG_VISIBLE}"
    f" AND (hashtextextended({_PARTITION_KEY}, 0) & 9223372036854775807) % $5 = $6",
    "$4", "$3",
)
"""`READ_LOG` for partition $6 of $5: events whose key ($7 'data'/'metadata' and path $8, else the stream id)
hashes there, by PostgreSQL's own hash (hash partitioning relies on it staying stable)."""

DELETE_PARTITIONS = "DELETE FROM projection_partitions WHERE name = $1"

INSERT_PARTITIONS = """
INSERT INTO projection_partitions (name, partition, log_xid, position)
SELECT $1, p, $3, $4 FROM generate_series(0, $2 - 1) AS p WHERE $2 > 1
"""
"""($1 name, $2 partitions, $3 log_xid, $4 position): every partition of a new generation starts at its checkpoint."""

SHARE_CHECKPOINT = f"SELECT {_CHECKPOINT} FROM projection_checkpoints WHERE name = $1 FOR SHARE"
"""The projection's row, shared: its partitions run side by side, and a swap (which locks the row
exclusively) waits for their batches in flight."""

LOCK_PARTITION = f"""
SELECT log_xid, position, runner, {log.LOG_HELD_BACK} AS held
FROM projection_partitions WHERE name = $1 AND partition = $2 FOR UPDATE
"""
"""A partition's checkpoint, locked, and whether the log holds events back (see `LOCK_BATCH`)."""

ADVANCE_PARTITION = """
UPDATE projection_partitions SET log_xid = $3, position = $4, runner = $5, updated_at = now()
WHERE name = $1 AND partition = $2
"""

RELEASE_PARTITION = """
UPDATE projection_partitions SET runner = NULL, updated_at = now()
WHERE name = $1 AND partition = $2 AND runner = $3
"""
"""A partition's runner lets it go: `runner` names the partition's owner while it is owned."""

PARTITION_RUNNER_PREFIX = "eventstore partitions "

PARTITION_MISMATCHED_PREFIX = "eventstore partitions-mismatched "
"""The session name of a partition worker whose declaration differs from the live one (a runner of the
old version during a rolling deploy): `PARTITION_RUNNERS` does not count it, so it takes no fair share
from the runners that can run the projection."""

NAME_PARTITION_SESSION = "SELECT set_config('application_name', $1, false)"
"""A partition worker's session says whose it is: `PARTITION_RUNNER_PREFIX` + runner tag + ' ' + a hash of the
projection's name + ' ' + the name (for people only: PostgreSQL cuts the whole at 63 bytes)."""

PARTITION_RUNNERS = f"""
SELECT count(DISTINCT split_part(application_name, ' ', 3)) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE '{PARTITION_RUNNER_PREFIX}%'
  AND split_part(application_name, ' ', 4) = $1
"""
"""How many runners have partition workers of projection $1 (the hash of its name) connected: they share its
partitions."""

_FLOOR = """
LEFT JOIN LATERAL (
    SELECT p.log_xid, p.position FROM projection_partitions p WHERE p.name = c.name
    ORDER BY p.log_xid, p.position LIMIT 1
) f ON true
"""
"""The checkpoint of a partitioned projection's slowest partition: how far the whole of it has got."""

# -- rebuilds --------------------------------------------------------------------------------------

_REBUILD = "name, generation, version, tables, log_xid, position, events_done, last_error, started_at, updated_at"

LOCK_REBUILD = f"SELECT {_REBUILD} FROM projection_rebuilds WHERE name = $1 FOR UPDATE"

INSERT_REBUILD = """
INSERT INTO projection_rebuilds (name, generation, version, tables) VALUES ($1, $2, $3, $4)
"""

ADVANCE_REBUILD = """
UPDATE projection_rebuilds
SET log_xid = $2, position = $3, events_done = events_done + $4, last_error = NULL, updated_at = now()
WHERE name = $1
"""

FAIL_REBUILD = "UPDATE projection_rebuilds SET last_error = $2, updated_at = now() WHERE name = $1"

DELETE_REBUILD = "DELETE FROM projection_rebuilds WHERE name = $1"

DELETE_CHECKPOINT = "DELETE FROM projection_checkpoints WHERE name = $1"
"""Its rebuild row goes with it (ON DELETE CASCADE)."""

# -- status ----------------------------------------------------------------------------------------

STATUS = f"""
SELECT c.name, c.mode, c.version, c.generation, c.tables, COALESCE(f.log_xid, c.log_xid) AS log_xid,
       COALESCE(f.position, c.position) AS position, c.status, c.runner, c.partitions, c.partition_key,
       c.last_error, c.failed_event_id, c.failed_event_type, c.failed_log_xid, c.failed_position,
       c.failed_at, c.updated_at,
       r.generation AS rebuild_generation, r.version AS rebuild_version, r.log_xid AS rebuild_log_xid,
       r.position AS rebuild_position, r.events_done AS rebuild_events_done, r.last_error AS rebuild_last_error,
       r.started_at AS rebuild_started_at, r.updated_at AS rebuild_updated_at,
       (SELECT array_agg(p.runner ORDER BY p.partition) FROM projection_partitions p WHERE p.name = c.name)
           AS partition_runners
FROM projection_checkpoints c LEFT JOIN projection_rebuilds r ON r.name = c.name {_FLOOR}
ORDER BY c.name
"""
"""`partition_runners`: the runner recorded by each partition (by number), of which those holding its lease run it."""

CHECKPOINTS = f"""
SELECT c.name, c.mode, c.version, c.tables, c.partitions, c.partition_key, COALESCE(f.log_xid, c.log_xid) AS log_xid,
       COALESCE(f.position, c.position) AS position, c.status
FROM projection_checkpoints c {_FLOOR}
WHERE c.name = ANY($1::text[])
"""

# -- leases ----------------------------------------------------------------------------------------

TRY_LOCK = "SELECT pg_try_advisory_lock($1)"
"""Session-level: PostgreSQL releases it when the holder's connection ends, also when it is killed."""

UNLOCK = "SELECT pg_advisory_unlock($1)"

HELD_LOCKS = """
SELECT (classid::bigint << 32) | objid::bigint AS key, pid FROM pg_locks
WHERE locktype = 'advisory' AND objsubid = 1 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
"""Keys of the bigint advisory locks held in this database (reassembled from the two oid halves)."""

LEASE_HELD = f"SELECT EXISTS (SELECT 1 FROM ({HELD_LOCKS}) AS held WHERE held.key = $1)"
"""Whether some session holds the advisory lock $1 (a partition's lease) now."""

# -- generations of read-model tables ---------------------------------------------------------------

SEARCH_PATH = "SELECT current_setting('search_path')"

USE_GENERATION = "SELECT set_config('search_path', quote_ident($1) || ', ' || $2, true)"
"""($1 generation schema, $2 the connection's own search_path): for the rest of this transaction."""

RESTORE_SEARCH_PATH = "SELECT set_config('search_path', $1, true)"

VIEW_SCHEMA = """
SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = 'projection_checkpoints'::regclass
"""
"""Readers find a projection's tables as views beside the event store's own tables."""

TABLE_IN_SCHEMA = """
SELECT EXISTS (
    SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
)
"""

RELATION_KIND = """
SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""


def ident(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def create_schema(schema: str) -> str:
    return f"CREATE SCHEMA {ident(schema)}"


def drop_schema(schema: str) -> str:
    return f"DROP SCHEMA IF EXISTS {ident(schema)} CASCADE"


def replace_view(view_schema: str, table: str, generation_schema: str) -> str:
    return (
        f"CREATE OR REPLACE VIEW {ident(view_schema)}.{ident(table)} AS "
        f"SELECT * FROM {ident(generation_schema)}.{ident(table)}"
    )


def drop_view(view_schema: str, table: str) -> str:
    return f"DROP VIEW IF EXISTS {ident(view_schema)}.{ident(table)}"


def literal(value: str) -> str:
    """Quote an SQL string literal (for DDL, which takes no parameters)."""
    return "'" + value.replace("'", "''") + "'"


def guard_name(projection: str) -> str:
    return f"projection_inline_{projection}"


def create_guard(events_schema: str, projection: str, event_types: list[str]) -> str:
    """The guard of an inline projection; its arguments are the projection's name, then its event types."""
    types = ", ".join(literal(t) for t in event_types)
    arguments = ", ".join(literal(a) for a in (projection, *event_types))
    return (
        f"CREATE CONSTRAINT TRIGGER {ident(guard_name(projection))} AFTER INSERT ON "
        f"{ident(events_schema)}.events DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
        f"WHEN (NEW.event_type = ANY (ARRAY[{types}]::text[])) "
        f"EXECUTE FUNCTION projections_inline_guard({arguments})"
    )


def drop_guard(events_schema: str, projection: str) -> str:
    return f"DROP TRIGGER IF EXISTS {ident(guard_name(projection))} ON {ident(events_schema)}.events"

# -- metrics ---------------------------------------------------------------------------------------

PROJECTION_GAUGES = f"""
SELECT c.name,
       CASE WHEN c.partitions = 1 OR c.status = 'failed' THEN c.status
            WHEN EXISTS (SELECT 1 FROM projection_partitions p WHERE p.name = c.name AND p.runner IS NOT NULL)
            THEN 'running' ELSE 'stopped' END AS status,
       (SELECT count(*) FROM (
            SELECT 1 FROM events AS e
            WHERE (e.log_xid, e.position) > (COALESCE(f.log_xid, c.log_xid), COALESCE(f.position, c.position))
              AND e.{log.LOG_VISIBLE}
            LIMIT $2) AS behind) AS lag,
       coalesce((
            SELECT extract(epoch FROM now() - e.recorded_at) FROM events AS e
            WHERE (e.log_xid, e.position) > (COALESCE(f.log_xid, c.log_xid), COALESCE(f.position, c.position))
              AND e.{log.LOG_VISIBLE}
            ORDER BY e.log_xid, e.position
            LIMIT 1), 0)::float8 AS lag_seconds
FROM projection_checkpoints AS c {_FLOOR}
WHERE $1::text[] IS NULL OR c.name = ANY($1::text[])
"""
"""($1 names or NULL for all, $2 cap): each projection's status, the events after its checkpoint (counted up to the
cap, so a projection far behind costs no more than that) and the age of the first of them. A partitioned
projection stands where its slowest partition does, and runs while any of its partitions has a runner."""
