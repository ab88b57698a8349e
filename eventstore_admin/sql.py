"""The console's own SQL, by name: reads the library has no call for (browsing streams, slot leases).

Each statement runs after BOUNDED, with `plan_cache_mode = force_custom_plan`: the optional filters
(`$1::text IS NULL OR ...`) then fold away at planning, and each search gets the plan for its own
filters instead of one generic plan for all of them.
"""

from __future__ import annotations

_EVENT_COLUMNS = (
    "event_id, event_type, data, metadata, stream_id, stream_version, position, log_xid, recorded_at"
)

# -- streams ---------------------------------------------------------------------------------------

# A stream is found by its first event (stream_version = 0): the partial indexes events_stream_start_*
# hold one entry per stream, and its position orders streams by creation. Keyset paging on that
# position: a page costs the same however deep it is.
_STREAM_COLUMNS = "e.stream_id, e.position, e.recorded_at, s.version"

_STREAMS = """
SELECT {columns}
FROM events AS e JOIN streams AS s ON s.stream_id = e.stream_id
WHERE e.stream_version = 0 AND ($1::text IS NULL OR e.category = $1) AND {keyset}
ORDER BY e.position {order}
LIMIT $3
"""

STREAMS_OLDER = _STREAMS.format(
    columns=_STREAM_COLUMNS, keyset="($2::bigint IS NULL OR e.position < $2)", order="DESC"
)
"""($1 category or NULL, $2 before this position or NULL, $3 limit): newest first, walking an index."""

STREAMS_NEWER = _STREAMS.format(columns=_STREAM_COLUMNS, keyset="e.position > $2", order="")
"""($1 category or NULL, $2 after this position, $3 limit): oldest first, for the page before."""

# By prefix, newest first. Walking streams newest first and skipping those without the prefix is fast
# when matches are recent or common, but reads every stream when they are rare and old (ids and age go
# together: `order-000...` are the oldest), and the planner cannot tell which. So a search first walks
# a bounded window of the newest streams (PREFIX_WALK); only if that leaves the page short does it take
# the matches from the prefix's range of events_stream_start_id_idx (index only: it includes the
# position) and sort the page out of them (PREFIX_RANGE), at one index entry per matching stream.
# `~>=~` / `~<~` compare bytes, so [prefix, successor) is exactly the ids that start with the prefix
# whatever the collation; starts_with() keeps it exact regardless.
_PREFIX_WALK = """
WITH walked AS MATERIALIZED (
    SELECT e.stream_id, e.position FROM events AS e
    WHERE e.stream_version = 0 AND ($1::text IS NULL OR e.category = $1) AND {keyset}
    ORDER BY e.position {order}
    LIMIT $5
)
SELECT m.stream_id, m.position, e.recorded_at, s.version, (SELECT count(*) FROM walked) AS walked
FROM (SELECT w.stream_id, w.position FROM walked AS w WHERE starts_with(w.stream_id, $2)
      ORDER BY w.position {order} LIMIT $4) AS m
JOIN events AS e ON e.position = m.position
JOIN streams AS s ON s.stream_id = m.stream_id
ORDER BY m.position {order}
"""

PREFIX_WALK_OLDER = _PREFIX_WALK.format(keyset="($3::bigint IS NULL OR e.position < $3)", order="DESC")
"""($1 category or NULL, $2 prefix, $3 before this position or NULL, $4 limit, $5 streams to walk at most)."""

PREFIX_WALK_NEWER = _PREFIX_WALK.format(keyset="e.position > $3", order="")
"""($1 category or NULL, $2 prefix, $3 after this position, $4 limit, $5 streams to walk at most)."""

# OFFSET 0 keeps the planner from pushing the ORDER BY into the subquery (which would make walking the
# position index look cheap again); the range is scanned once and the page kept by a top-N sort.
_PREFIX_RANGE = """
SELECT m.stream_id, m.position, e.recorded_at, s.version
FROM (
    SELECT r.stream_id, r.position FROM (
        SELECT e.stream_id, e.position FROM events AS e
        WHERE e.stream_version = 0 AND e.stream_id ~>=~ $2 AND ($3::text IS NULL OR e.stream_id ~<~ $3)
          AND starts_with(e.stream_id, $2) AND {keyset}
          -- events.category's own definition, read off the index's stream id rather than the table
          AND ($1::text IS NULL OR split_part(e.stream_id, '-', 1) = $1)
        OFFSET 0
    ) AS r
    ORDER BY r.position {order}
    LIMIT $5
) AS m
JOIN events AS e ON e.position = m.position
JOIN streams AS s ON s.stream_id = m.stream_id
ORDER BY m.position {order}
"""

PREFIX_RANGE_OLDER = _PREFIX_RANGE.format(keyset="($4::bigint IS NULL OR e.position < $4)", order="DESC")
"""($1 category or NULL, $2 prefix, $3 its successor or NULL, $4 before this position or NULL, $5 limit)."""

PREFIX_RANGE_NEWER = _PREFIX_RANGE.format(keyset="e.position > $4", order="")
"""($1 category or NULL, $2 prefix, $3 its successor or NULL, $4 after this position, $5 limit)."""

CATEGORIES = """
WITH RECURSIVE found(category) AS (
    (SELECT category FROM events ORDER BY category LIMIT 1)
    UNION ALL
    SELECT (SELECT e.category FROM events AS e WHERE e.category > f.category ORDER BY e.category LIMIT 1)
    FROM found AS f
    WHERE f.category IS NOT NULL
)
SELECT category FROM found WHERE category IS NOT NULL LIMIT $1
"""
"""The categories, one index probe each on events_category_log_idx (a loose index scan), not a scan of the log."""

STREAM_ENDS = """
SELECT s.version, first.recorded_at AS created_at, last.recorded_at AS updated_at
FROM streams AS s
JOIN events AS first ON first.stream_id = s.stream_id AND first.stream_version = 0
JOIN events AS last ON last.stream_id = s.stream_id AND last.stream_version = s.version
WHERE s.stream_id = $1
"""

EVENT_AT = f"SELECT {_EVENT_COLUMNS} FROM events WHERE position = $1"

# -- outbox ----------------------------------------------------------------------------------------

SLOTS = """
SELECT slot, CASE WHEN lease_until > now() THEN owner END AS owner, lease_until
FROM outbox_slots
ORDER BY slot
"""

# -- session ---------------------------------------------------------------------------------------

BOUNDED = """
SELECT set_config('plan_cache_mode', 'force_custom_plan', true), set_config('statement_timeout', $1, true)
"""
"""For the rest of the transaction: plans for the arguments at hand (above), and ($1) a time limit, so a
page that cannot be served fast fails instead of loading the server."""

NOW = "SELECT now()"
