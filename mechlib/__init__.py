"""mechlib — the thin library behind the mechbook research book.

Each module holds one concept (hooks, collection, the TopK SAE, training, metrics, tasks,
statistics, steering, lens, plots, the papermill runner). Notebooks import from here and
hold narrative, not logic.
"""

__version__ = "0.1.0"
