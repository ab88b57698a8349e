"""A small shop: carts, orders, payments and stock, event-sourced end to end.

`domain` holds the aggregates and their events, `read_models` the projections, `app` the application
that declares them with the outbox routes (what the CLI loads with `--app eventstore_examples.shop.app:APP`),
and `demo` the scenario `eventstore demo` runs and checks. The repository's `examples/` folder is
installed as the package `eventstore_examples`.
"""
