"""A web console to see and operate an event store: streams, the live log, projections and the outbox.

    eventstore admin --app eventstore_examples.shop.app:APP            # read-only, on 127.0.0.1:8000
    EVENTSTORE_ADMIN_TOKEN=... eventstore admin --app ...           # operators sign in with the token

Or embed it: `create_app(AdminSettings(database_url=url, projections=[...], token=...))` is an ASGI
application (Starlette) whose lifespan opens and closes its connections. Needs the `admin` extra.
Every call into the library is in `eventstore_admin.backend`.
"""

from eventstore_admin.app import create_app
from eventstore_admin.errors import ConsoleError
from eventstore_admin.settings import AdminSettings

__all__ = ["AdminSettings", "ConsoleError", "create_app"]
