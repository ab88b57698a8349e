"""Alembic environment and revisions for every table the framework owns."""

from sqlalchemy import MetaData


def target_metadata() -> MetaData:
    """Every component's tables: each registers them on eventstore's metadata when its schema loads."""
    import outbox.schema  # noqa: F401
    import projections.schema  # noqa: F401
    from eventstore.schema import metadata

    return metadata
