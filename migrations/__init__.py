"""Alembic environment and revisions for every table the framework owns."""
