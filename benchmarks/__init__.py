"""Benchmarks: each module measures one area beside its peer (`eventsourcing`) and limit (raw asyncpg)."""
