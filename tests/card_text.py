"""Reading a rendered model card back in tests: its YAML front matter and its markdown tables."""

from __future__ import annotations

import yaml


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_rows(card: str, *header: str) -> list[list[str]]:
    """Body cells of the markdown table whose header row begins with the cells ``header``."""
    lines = card.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("|") and cells(line)[: len(header)] == list(header)
    )
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return rows


def close(cell: str, value: float | int, tol: float = 5e-4) -> bool:
    return abs(float(cell) - float(value)) <= tol + 1e-9
