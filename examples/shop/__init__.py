"""A small shop: carts, orders, payments and stock, event-sourced end to end.

`domain` holds the aggregates and their events, `read_models` the projections, `app` the wiring
(repositories, outbox routes, the projections list the CLI loads with `--app examples.shop.app:PROJECTIONS`),
and `demo` the scenario `eventstore demo` runs and checks.
"""
