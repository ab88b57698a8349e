"""Worked examples built with the framework's own aggregates, projections and outbox."""
