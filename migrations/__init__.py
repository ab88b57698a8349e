"""Alembic environment and revisions for every table the framework owns (installed as `eventstore_migrations`).

The one place where the components' tables meet: each component owns its MetaData, and this
environment combines them to compare and migrate.
"""

from sqlalchemy import MetaData


def target_metadata() -> MetaData:
    """Every component's tables in one MetaData (copies: the components' own stay apart)."""
    import eventstore.schema
    import outbox.schema
    import projections.schema

    combined = MetaData()
    for component in (eventstore.schema.metadata, projections.schema.metadata, outbox.schema.metadata):
        for table in component.tables.values():
            table.to_metadata(combined)
    return combined
