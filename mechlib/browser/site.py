"""Write the static feature browser: ``browser/index.html``, ``latent.html`` and their data files.

Why ``.js`` data files: the site must open from ``file://`` with no server, and browsers block
``fetch()`` of local JSON there; a ``<script src="data/….js">`` that assigns to a global loads
everywhere. The same data is written as plain ``.json`` beside it for other tools.

Size follows the caps: the index lists every latent (a few numbers each); pages — contexts,
quantile examples, logit effects, similar latents — are written for at most ``max_latents``
latents (chapter 05's contrastive features first when they exist, then a seeded random sample of
the latents that fired), each with at most ``contexts`` top contexts.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechlib.browser.effects import logit_effects, similar_latents
from mechlib.browser.gather import ShardTokens, gather_latent_stats, iter_store_shards
from mechlib.browser.pages import Decoder, IndexData, latent_record, top_tokens
from mechlib.io import atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:  # types only: the model stack and the SAE are imported where a build needs them
    from torch import nn

    from mechlib.activations.shards import ActivationStore
    from mechlib.models import Tokenizer
    from mechlib.params import BookParams
    from mechlib.paths import RunPaths
    from mechlib.sae.model import TopKSAE

# Sized for the default run (d_sae 4608, 16 k held-out tokens): a site of about 5 MB.
DEFAULT_MAX_LATENTS = 512
DEFAULT_CONTEXTS = 10
STATIC_FILES = ("index.html", "latent.html", "browser.css", "browser.js")
INDEX_GLOBAL = "MECHBOOK_INDEX"
LATENT_GLOBAL = "MECHBOOK_LATENT"
VOCAB_GLOBAL = "MECHBOOK_VOCAB"
BUILD_FILE = "build.json"
BUILD_FORMAT = 1  # bump when the data files change shape


class BrowserError(ValueError):
    """A browser folder or input that cannot be used; the message names it."""


@dataclass(frozen=True)
class BrowserSite:
    folder: Path
    n_latents: int
    n_pages: int
    n_tokens: int
    gather_seconds: float
    seconds: float
    bytes: int
    reused: bool = False  # an earlier build from the same SAE, activations and caps was kept

    @property
    def index_html(self) -> Path:
        return self.folder / "index.html"


@dataclass(frozen=True)
class SiteInfo:
    run: str
    model: str
    layer: int


def _write_data(folder: Path, name: str, global_name: str, data: object) -> None:
    """``name.json`` and ``name.js`` (``window.GLOBAL = …;``), both atomically."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    atomic_write_text(folder / f"{name}.json", text)
    atomic_write_text(folder / f"{name}.js", f"window.{global_name} = {text};\n")


def copy_static(folder: Path) -> None:
    static = resources.files("mechlib.browser") / "static"
    for name in STATIC_FILES:
        atomic_write_text(folder / name, (static / name).read_text(encoding="utf-8"))


def contrast_file(metrics_dir: Path, layer: int) -> Path:
    return Path(metrics_dir) / f"contrastive_features_L{layer}.json"


def read_contrast(path: Path) -> list[tuple[int, float]]:
    """Chapter 05's ranked SAE features as ``(latent, score = mean correct − mean wrong)``, best first."""
    data = read_json(path)
    feats = data.get("features") if isinstance(data, dict) else None
    if not isinstance(feats, list):
        raise BrowserError(f"{path}: no 'features' list (a chapter 05 contrastive-features file expected)")
    return [(int(f["feature"]), float(f["score"])) for f in feats]


def choose_pages(counts: torch.Tensor, max_latents: int, seed: int, first: Sequence[int] = ()) -> torch.Tensor:
    """Latents that get a page: ``first`` (if they fired), then a seeded random sample of the others that fired."""
    fired = counts > 0
    chosen = [f for f in dict.fromkeys(int(f) for f in first) if 0 <= f < counts.numel() and fired[f]][:max_latents]
    taken = torch.zeros_like(fired)
    taken[chosen] = True
    rest = (fired & ~taken).nonzero().squeeze(1)
    rest = rest[torch.randperm(rest.numel(), generator=torch.Generator().manual_seed(seed))]
    return torch.tensor(sorted(chosen + rest[: max_latents - len(chosen)].tolist()), dtype=torch.long)


def build_site(
    folder: str | Path,
    shards: Iterable[ShardTokens],
    sae: TopKSAE,
    model: nn.Module,
    tokenizer: Tokenizer,
    info: SiteInfo,
    *,
    max_latents: int = DEFAULT_MAX_LATENTS,
    contexts: int = DEFAULT_CONTEXTS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    priority: Sequence[int] = (),
    progress: bool = False,
) -> BrowserSite:
    """Gather the stats in one pass over ``shards``, then write the whole site into ``folder``."""
    if max_latents < 1 or contexts < 1:
        raise BrowserError(f"browser: max_latents and contexts must be >= 1 (got {max_latents}, {contexts})")
    t0 = time.perf_counter()
    folder = Path(folder)
    stats = gather_latent_stats(sae, shards, contexts=contexts, seed=seed, device=device, progress=progress)
    pages = choose_pages(stats.counts, max_latents, seed, priority)
    W_dec = sae.W_dec.detach()
    effects = logit_effects(W_dec[pages.to(W_dec.device)], model)
    near = similar_latents(W_dec, pages)
    decode = Decoder(tokenizer)
    has_page = torch.zeros(sae.d_sae, dtype=torch.bool)
    has_page[pages] = True

    data = folder / "data"
    if (data / "latents").exists():
        shutil.rmtree(data / "latents")  # pages of an earlier build with other caps
    (data / "latents").mkdir(parents=True, exist_ok=True)
    for row, f in enumerate(pages.tolist()):
        _write_data(
            data / "latents", str(f), LATENT_GLOBAL, latent_record(stats, f, row, effects, near, has_page, decode)
        )
    index = IndexData(
        run=info.run,
        model=info.model,
        layer=info.layer,
        d_sae=sae.d_sae,
        k=sae.k,
        n_tokens=stats.n_tokens,
        density=[round(float(d), 7) for d in stats.density],
        mean=[round(float(m), 4) for m in stats.mean_activation],
        max=[round(float(v), 4) if c else 0.0 for v, c in zip(stats.top.acts[:, 0], stats.counts)],
        top_tokens=top_tokens(stats, decode),
        page=has_page.tolist(),
        contrast=[None] * sae.d_sae,
        contrast_rank=[None] * sae.d_sae,
        special_ids=sorted(int(i) for i in getattr(tokenizer, "all_special_ids", [])),
    )
    _write_data(data, "index", INDEX_GLOBAL, index.to_json())
    _write_data(data, "vocab", VOCAB_GLOBAL, decode.vocab())
    copy_static(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return BrowserSite(folder, sae.d_sae, len(pages), stats.n_tokens, stats.seconds, time.perf_counter() - t0, size)


def browser_folder(run_paths: RunPaths) -> Path:
    return Path(run_paths.root) / "browser"


def build_browser(
    params: BookParams,
    run_paths: RunPaths,
    heldout: ActivationStore,
    sae: TopKSAE,
    *,
    max_latents: int = DEFAULT_MAX_LATENTS,
    contexts: int = DEFAULT_CONTEXTS,
    progress: bool = True,
) -> BrowserSite:
    """Chapter 03's one call: the run's site in ``outputs/<run>/browser/`` from its held-out activations.

    Loads the run's model for its tokenizer, final norm and unembedding (the cached conversion of the
    default model loads in seconds). A build from the same SAE, held-out activations, model and caps is
    kept (``browser/build.json`` holds the key), so rerunning the chapter does not redo it. Contrast scores
    are (re)added by :func:`add_contrast_scores` whenever chapter 05's file exists. A kept build is
    rebuilt when one of chapter 05's top ``max_latents`` contrastive latents fired but has no page.
    """
    from mechlib.activations.provenance import fingerprint_of_store
    from mechlib.metrics import sae_fingerprint
    from mechlib.models import load_model
    from mechlib.sae import card_state

    folder = browser_folder(run_paths)
    key = {
        "format": BUILD_FORMAT,
        "sae": sae_fingerprint(card_state(sae)),
        "heldout": fingerprint_of_store(heldout).digest,
        "model": params.model,
        "max_latents": max_latents,
        "contexts": contexts,
        "seed": params.seed,
    }
    layer = int(heldout.layer)
    cfile = contrast_file(run_paths.metrics, layer)
    priority = [f for f, _ in read_contrast(cfile)] if cfile.is_file() else []
    saved = _read_build(folder)
    if (
        saved is not None
        and saved.get("key") == key
        and (folder / "data" / "index.js").is_file()
        and not _pages_missing(folder, priority[:max_latents])
    ):
        copy_static(folder)  # the pages' code may be newer than the data
        add_contrast_scores(run_paths)
        s = saved["site"]
        return BrowserSite(
            folder, s["n_latents"], s["n_pages"], s["n_tokens"], s["gather_seconds"], s["seconds"], s["bytes"], True
        )
    lm = load_model(params.model, params.model_dtype, params.device)
    site = build_site(
        folder,
        iter_store_shards(heldout),
        sae,
        lm.model,
        lm.tokenizer,
        SiteInfo(params.run, params.model, layer),
        max_latents=max_latents,
        contexts=contexts,
        seed=params.seed,
        device=next(sae.parameters()).device,
        priority=priority,
        progress=progress,
    )
    add_contrast_scores(run_paths)
    atomic_write_json(
        folder / BUILD_FILE,
        {
            "key": key,
            "site": {
                f: getattr(site, f) for f in ("n_latents", "n_pages", "n_tokens", "gather_seconds", "seconds", "bytes")
            },
        },
    )
    return site


def refresh_browser(
    params: BookParams, run_paths: RunPaths, heldout: ActivationStore, sae: TopKSAE, *, progress: bool = True
) -> BrowserSite | None:
    """Chapter 05's call: give its contrastive latents pages in the browser chapter 03 built.

    Why: chapter 03 runs before chapter 05 has ranked any latent, so its pages are a random sample and
    most of the top contrastive latents have none. This rebuilds the site (with chapter 03's caps, read
    from ``build.json``) putting them first, exactly as a rerun of chapter 03 would; when each of them
    already has a page the build is kept and only the scores are added. ``None`` when chapter 03 built no
    browser for this run.
    """
    saved = _read_build(browser_folder(run_paths))
    caps = saved.get("key") if saved is not None else None
    if not isinstance(caps, dict) or "max_latents" not in caps or "contexts" not in caps:
        return None
    return build_browser(
        params,
        run_paths,
        heldout,
        sae,
        max_latents=int(caps["max_latents"]),
        contexts=int(caps["contexts"]),
        progress=progress,
    )


@dataclass(frozen=True, repr=False)
class ContrastView:
    """What chapter 05 shows of the browser: a line saying where it is, and one feature's page (if any).

    A notebook shows it as the cell's value: ``_repr_html_`` gives the line and the page, the plain-text
    repr the line alone (what nbval and a terminal see).
    """

    note: str
    latent: int | None
    html: str | None

    def __repr__(self) -> str:
        return self.note

    def _repr_html_(self) -> str:
        return f"<p>{escape(self.note)}</p>" + (self.html or "")


def contrast_view(
    params: BookParams, run_paths: RunPaths, sae: TopKSAE, scores: Sequence[tuple[int, float]]
) -> ContrastView:
    """:func:`refresh_browser` with the run's held-out shards, then the page of the best-scoring feature of
    ``scores`` (``(latent, mean correct − mean wrong)``) that has one: a feature that never fired on the
    held-out corpus tokens has no page, so the next one is shown. The line is marked when the run's labels
    are placeholders (:func:`mechlib.placeholder.mark_text`)."""
    from mechlib.activations.collect_config import open_store
    from mechlib.browser.inline import first_with_page, latent_html
    from mechlib.placeholder import mark_text

    def view(note: str, latent: int | None = None, page: str | None = None) -> ContrastView:
        return ContrastView(mark_text(note, params.placeholder_labels), latent, page)

    site = refresh_browser(params, run_paths, open_store(params, run_paths, "heldout"), sae, progress=False)
    if site is None:
        return view("no feature browser in this run (chapter 03 builds it)")
    best = first_with_page(site.folder, [f for f, _ in sorted(scores, key=lambda fs: -fs[1])])
    where = f"feature browser: {run_paths.rel(site.index_html)}"
    if best is None:
        return view(f"{where}; none of the ranked features fired on its held-out tokens")
    return view(f"{where}; below, feature {best} (top score with a page)", best, latent_html(site.folder, best))


def _pages_missing(folder: Path, latents: Sequence[int]) -> list[int]:
    """Of ``latents``, those that fired on the held-out tokens but have no page in ``folder``'s build."""
    if not latents:
        return []
    try:
        index = IndexData.from_json(read_json(folder / "data" / "index.json"), str(folder))
    except (OSError, ValueError):  # no readable index: the caller rebuilds anyway
        return list(latents)
    return [f for f in latents if 0 <= f < index.d_sae and index.density[f] > 0 and not index.page[f]]


def _read_build(folder: Path) -> dict[str, Any] | None:
    try:
        saved = read_json(folder / BUILD_FILE)
    except (OSError, ValueError):  # missing or damaged: rebuilt
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("site"), dict) else None


def add_contrast_scores(run_paths: RunPaths) -> int:
    """Put chapter 05's contrastive scores (correct − wrong) and ranks into the browser's index.

    Idempotent: the contrast columns are rebuilt from the file each time, and only the index data
    (``data/index.json`` and ``.js``) is rewritten. Returns how many latents got a score (0 when there
    is no browser or no contrastive-features file for its layer yet).
    """
    data = browser_folder(run_paths) / "data"
    path = data / "index.json"
    if not path.is_file():
        return 0
    index = IndexData.from_json(read_json(path), str(path))
    cfile = contrast_file(run_paths.metrics, index.layer)
    if not cfile.is_file():
        return 0
    index.contrast, index.contrast_rank = [None] * index.d_sae, [None] * index.d_sae
    ranked = [(f, s) for f, s in read_contrast(cfile) if 0 <= f < index.d_sae]
    for rank, (f, score) in enumerate(ranked, start=1):
        index.contrast[f], index.contrast_rank[f] = round(score, 4), rank
    index.contrast_source = f"metrics/{cfile.name}"
    _write_data(data, "index", INDEX_GLOBAL, index.to_json())
    return len(ranked)
