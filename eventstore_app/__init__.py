"""The composition root of an application on the framework, and the migrations of every component.

    from eventstore_app import Application

    APP = Application("shop", aggregates=[Cart, Order], projections=[OrderSummary()],
                      routes=[Route("shop.orders", ["OrderPlaced"])])

    async with APP as app:
        await app.repository(Order).execute("o1", lambda order: order.place(...))

The CLI's `--app module:attribute` loads such an object; see `Application`.
"""

from eventstore_app.application import Application, ApplicationSettings, Running
from eventstore_app.migrate import migrate, migrate_async

__all__ = ["Application", "ApplicationSettings", "Running", "migrate", "migrate_async"]
