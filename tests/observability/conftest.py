from tests.outbox.conftest import collector, outbox_store, topic

__all__ = ["collector", "outbox_store", "topic"]
