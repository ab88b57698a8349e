"""Errors the console shows to its user, each with the HTTP status it answers with."""

from __future__ import annotations


class ConsoleError(Exception):
    """A request the console cannot serve; its message is shown (escaped) to the operator."""

    status = 400


class NotFound(ConsoleError):
    status = 404


class Forbidden(ConsoleError):
    status = 403


class Conflict(ConsoleError):
    """The operation clashes with the state it found (a rebuild already running elsewhere, say)."""

    status = 409


class Unavailable(ConsoleError):
    """The database cannot answer now, or lacks a component's tables."""

    status = 503
