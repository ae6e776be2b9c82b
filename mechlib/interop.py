"""Old import path kept for the notebooks until they import :mod:`mechlib.sae` (issue 16; delete then)."""

from mechlib.sae.interop import HookInfo, export_sae

__all__ = ["HookInfo", "export_sae"]
