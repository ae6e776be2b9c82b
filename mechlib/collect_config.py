"""Old import path kept for the notebooks until they import :mod:`mechlib.activations` (issue 16; delete then)."""

from mechlib.activations.collect_config import collect_for_book, open_store, open_train_store

__all__ = ["collect_for_book", "open_store", "open_train_store"]
