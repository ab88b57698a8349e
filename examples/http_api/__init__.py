"""The shop's carts over HTTP: a FastAPI service whose lifespan starts and stops the shop's `Application`.

    eventstore migrate                                  # once per database (EVENTSTORE_DATABASE_URL)
    uvicorn eventstore_examples.http_api:api            # pip install 'eventstore[http]'

    POST /carts               {"customer": "ann"}                      -> 201, the cart, ETag: "0"
    POST /carts/{id}/items    {"sku": "tea", "quantity": 2, "price": 450}  -> 201, the cart, ETag: "1"
    GET  /carts/{id}                                                   -> 200, the cart, ETag: "1"

Each command loads the cart, runs, and appends expecting the version it loaded; a concurrent write in
between is retried (`Repository.execute`, `retries` times) and, if it still conflicts, answered with
409. A client that sends `If-Match: "N"` (the ETag it saw) has its command run only on version N, with
no retry: a cart that moved on since is a 409 and nothing is written. A missing cart is a 404; a
command the cart refuses (a business rule) and a malformed request are 422, with a message that says
why. `create_api(app, retries=...)` builds the service for any application that declares `Cart`
(a test passes `APP.using(database_url=...)`); `api` is the shop's, configured from the environment.
"""

from ..shop.app import APP
from .carts import create_api

api = create_api(APP)

__all__ = ["api", "create_api"]
