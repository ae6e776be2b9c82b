"""One latent's view as self-contained HTML, for showing inline in a notebook (chapter 03).

Why inline styles: a notebook output cannot load the site's CSS, and the same colouring rule
(background proportional to activation, whitespace visible) should read the same in both places.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path
from statistics import median

from mechlib.io import read_json
from mechlib.plots import visible_token


def featured_latent(folder: str | Path) -> int:
    """A typical latent with a page: the one whose firing density is closest to the median of those with pages."""
    index = read_json(Path(folder) / "data" / "index.json")
    pages = [i for i, p in enumerate(index["page"]) if p]
    if not pages:
        raise ValueError(f"{folder}: the browser has no latent pages (no latent fired?)")
    mid = median(index["density"][i] for i in pages)
    return min(pages, key=lambda i: (abs(index["density"][i] - mid), i))


def first_with_page(folder: str | Path, latents: Iterable[int]) -> int | None:
    """The first of ``latents`` that has a page in ``folder``'s build (a latent that never fired on the
    held-out tokens has none), or ``None``."""
    page = read_json(Path(folder) / "data" / "index.json")["page"]
    return next((f for f in latents if 0 <= f < len(page) and page[f]), None)


def _visible(text: str) -> str:
    """As the site shows it: whitespace ␣ ↵ →, other control characters as control pictures (U+2400…)."""
    shown = visible_token(text) if text else "∅"
    return "".join(chr(0x2400 + ord(c)) if ord(c) < 32 else ("\u2421" if c == "\x7f" else c) for c in shown)


def _token(text: str, act: float | None, peak: float, centre: bool, special: bool) -> str:
    shown = f"⟨{text}⟩" if special else _visible(text)
    style = ["padding:0 1px", "border-radius:2px"]
    if act is None:
        style.append("color:#aaa")
    elif act > 0:
        style.append(f"background:rgba(255,120,0,{min(1.0, act / peak):.3f})")
    if centre:
        style.append("outline:1.5px solid #b30000")
    title = "excluded" if act is None else f"{act:.3g}"
    return f'<span style="{";".join(style)}" title="{title}">{html.escape(shown)}</span>'


def latent_html(folder: str | Path, latent: int, contexts: int = 6) -> str:
    """The latent's top contexts and logit effects as one HTML fragment (the site's page, condensed)."""
    folder = Path(folder)
    path = folder / "data" / "latents" / f"{latent}.json"
    if not path.is_file():
        raise ValueError(f"{path}: latent {latent} has no page in this browser build")
    rec = read_json(path)
    special = set(read_json(folder / "data" / "index.json").get("special_ids", []))
    vocab = read_json(folder / "data" / "vocab.json")
    peak = rec["max"] or 1.0
    lines = []
    for c in rec["top"][:contexts]:
        toks = "".join(
            _token(vocab.get(str(t), "?"), a, peak, i == c["center"], t in special)
            for i, (t, a) in enumerate(zip(c["ids"], c["acts"]))
        )
        lines.append(
            f'<div style="font-family:monospace;white-space:nowrap;overflow-x:auto">'
            f'<span style="display:inline-block;width:56px;color:#555">{c["act"]:.2f}</span>{toks}</div>'
        )

    def effects(key: str) -> str:
        return ", ".join(html.escape(_visible(vocab.get(str(t), "?"))) + f" ({v:+.2f})" for t, v in rec[key][:8])

    return (
        f"<div><b>Latent {latent}</b>: fires on {rec['count']} of {rec['n_tokens']} held-out tokens, mean "
        f"activation {rec['mean']:.3g}, max {rec['max']:.3g}. Top contexts:"
        + "".join(lines)
        + f"<div>promotes: {effects('promoted')}</div><div>suppresses: {effects('suppressed')}</div></div>"
    )
