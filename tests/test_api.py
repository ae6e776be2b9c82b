"""The curated public API of ``mechlib``: every advertised name resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mechlib


@pytest.mark.parametrize("name", mechlib.__all__)
def test_every_public_name_resolves(name):
    obj = getattr(mechlib, name)
    assert obj is not None
    if name != "results":  # a module; the rest are defined where the table says
        assert obj.__module__.startswith(mechlib._API[name])


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = mechlib.nope


def test_import_mechlib_is_cheap():
    """``import mechlib`` loads neither torch nor transformers (the runner and CLIs import it first)."""
    code = "import sys, mechlib; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_all_lists_exactly_the_api_table():
    assert mechlib.__all__ == sorted(mechlib._API)
