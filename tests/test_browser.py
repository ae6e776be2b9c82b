"""The feature browser: one-pass statistics against brute force, the site's files, and the site in headless Chromium.

The Chromium tests skip (with how to install it) only where chromium/chromedriver/selenium are missing;
``make setup`` installs them as root on Debian. ``test_run_site_in_chromium`` checks a real run's site
(``MECHBOOK_TEST_RUN``, default ``default``) and leaves its screenshots in ``outputs/<run>/browser/screenshots/``.
"""

from __future__ import annotations

import json
import math
import os

import html5lib
import pytest
import torch

from mechlib import paths, report
from mechlib.browser import ShardTokens, SiteInfo, add_contrast_scores, build_site, gather_latent_stats
from mechlib.browser.effects import logit_effects, similar_latents
from mechlib.browser.pages import Decoder
from mechlib.browser.site import STATIC_FILES, choose_pages
from mechlib.sae import TopKSAE, dense_code

SEQ, D_SAE, K = 16, 48, 4


def make_shards(n_shards: int = 3, rows_per_shard: int = 5, d_model: int = 64, vocab: int = 200, seed: int = 0):
    """Random activations of packed rows; positions 0 and a random few more are excluded, as collection does."""
    gen = torch.Generator().manual_seed(seed)
    shards, first_row = [], 0
    for _ in range(n_shards):
        ctx = torch.randint(3, vocab, (rows_per_shard, SEQ), generator=gen, dtype=torch.int32)
        keep = torch.rand(rows_per_shard, SEQ, generator=gen) > 0.15
        keep[:, 0] = False
        ctx[:, 0] = 2  # BOS
        r, p = keep.nonzero(as_tuple=True)
        acts = torch.randn(r.numel(), d_model, generator=gen) * (1 + torch.rand(r.numel(), 1, generator=gen))
        shards.append(ShardTokens(acts, r + first_row, p.to(torch.int32), ctx, first_row))
        first_row += rows_per_shard
    return shards


def brute_force(sae, shards):
    """Dense activations of every token, with (shard, row, position) per token, in stream order."""
    x = torch.cat([s.activations for s in shards])
    with torch.no_grad():
        dense = dense_code(sae.encode(x), sae.d_sae)
    where = [(si, int(r) - s.first_row, int(p)) for si, s in enumerate(shards) for r, p in zip(s.row, s.position)]
    return dense, where


def window_oracle(shards, dense, where, token, latent, before, after):
    si, r, p = where[token]
    sh = shards[si]
    local = {(int(rr) - sh.first_row, int(pp)): i for i, (rr, pp) in enumerate(zip(sh.row, sh.position))}
    offset = sum(s.activations.shape[0] for s in shards[:si])
    ids, acts = [], []
    for q in range(p - before, p + after + 1):
        if not 0 <= q < SEQ:
            ids.append(-1)
            acts.append(math.nan)
            continue
        ids.append(int(sh.context_ids[r, q]))
        u = local.get((r, q))
        acts.append(math.nan if u is None else float(dense[offset + u, latent]))
    return ids, acts


@pytest.fixture(scope="module")
def tiny():
    sae = TopKSAE(64, D_SAE, K, seed=1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(D_SAE, generator=torch.Generator().manual_seed(3)) * 0.5)
    shards = make_shards()
    return sae, shards


def test_one_pass_equals_brute_force(tiny):
    sae, shards = tiny
    before, after, n_ctx = 3, 2, 5
    stats = gather_latent_stats(sae, shards, contexts=n_ctx, sample=6, before=before, after=after, batch_tokens=7)
    dense, where = brute_force(sae, shards)
    assert stats.n_tokens == dense.shape[0]
    fired = dense > 0
    assert torch.equal(stats.counts, fired.sum(0))
    torch.testing.assert_close(stats.sums, dense.double().sum(0), rtol=1e-5, atol=1e-4)
    assert int(stats.hist.sum()) == int(fired.sum())
    assert int((stats.counts > 0).sum()) > D_SAE // 2  # the test means something: most latents fired
    for f in range(D_SAE):
        col = dense[:, f]
        order = torch.argsort(col, descending=True, stable=True)[:n_ctx]
        order = order[col[order] > 0]
        got = stats.top.tokens[f][: order.numel()]
        assert got.tolist() == order.tolist(), f"latent {f}: top tokens differ"
        assert torch.isinf(stats.top.keys[f][order.numel() :]).all()
        torch.testing.assert_close(stats.top.acts[f][: order.numel()], col[order])
        for j, t in enumerate(order.tolist()):
            ids, acts = window_oracle(shards, dense, where, t, f, before, after)
            assert stats.top.ids[f, j].tolist() == ids
            torch.testing.assert_close(
                stats.top.window[f, j].float(), torch.tensor(acts), atol=2e-2, rtol=1e-3, equal_nan=True
            )
        # the firing sample: distinct firing tokens, min(sample, count) of them, activations as computed
        n_s = int(torch.isfinite(stats.sample.keys[f]).sum())
        assert n_s == min(6, int(fired[:, f].sum()))
        toks = stats.sample.tokens[f][:n_s]
        assert len(set(toks.tolist())) == n_s and bool(fired[toks, f].all())
        torch.testing.assert_close(stats.sample.acts[f][:n_s], col[toks])


def test_similar_latents_and_logit_effects_match_brute_force(tiny):
    from mechlib.models import final_norm, output_embedding
    from mechlib.tiny import tiny_model

    sae, _ = tiny
    which = torch.tensor([0, 5, 17])
    near = similar_latents(sae.W_dec, which, top=4, chunk=2)
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    for row, f in enumerate(which.tolist()):
        cos = unit @ unit[f]
        cos[f] = -2
        assert near.ids[row].tolist() == cos.topk(4).indices.tolist()
    model = tiny_model("llama", seed=0)
    eff = logit_effects(sae.W_dec.detach()[which], model, top=5, chunk=2)
    with torch.no_grad():
        logits = final_norm(model)(sae.W_dec.detach()[which]) @ output_embedding(model).weight.T
    assert eff.promoted_ids.tolist() == logits.topk(5).indices.tolist()
    assert eff.suppressed_ids.tolist() == (-logits).topk(5).indices.tolist()


def test_pages_put_contrastive_latents_first():
    counts = torch.tensor([0, 3, 1, 0, 7, 2, 9, 4])
    pages = choose_pages(counts, 3, seed=0, first=[6, 3, 6]).tolist()  # 3 never fired: no page
    assert 6 in pages and 3 not in pages and len(pages) == 3 and all(counts[p] > 0 for p in pages)


@pytest.fixture(scope="module")
def site(tiny, tmp_path_factory):
    from mechlib.tiny import tiny_model, tiny_tokenizer

    sae, shards = tiny
    with pytest.MonkeyPatch.context() as mp:  # RunPaths reads OUTPUTS_DIR on each access
        mp.setattr(paths, "OUTPUTS_DIR", tmp_path_factory.mktemp("outputs"))
        run = paths.RunPaths("tiny").make()
        built = build_site(
            run.root / "browser",
            shards,
            sae,
            tiny_model("llama", seed=0),
            tiny_tokenizer(),
            SiteInfo("tiny", "tiny-llama", 1),
            max_latents=20,
            contexts=4,
        )
        yield built, run


def test_site_files_and_contrast_scores(site):
    built, run = site
    folder = built.folder
    for name in STATIC_FILES:
        assert (folder / name).is_file()
    index = json.loads((folder / "data" / "index.json").read_text())
    assert (folder / "data" / "index.js").read_text().startswith("window.MECHBOOK_INDEX = ")
    assert len(index["density"]) == D_SAE and sum(index["page"]) == built.n_pages == 20
    pages = sorted(int(p.stem) for p in (folder / "data" / "latents").glob("*.json"))
    assert pages == [i for i, p in enumerate(index["page"]) if p]
    rec = json.loads((folder / "data" / "latents" / f"{pages[0]}.json").read_text())
    assert 0 < len(rec["top"]) <= 4 and rec["promoted"] and rec["similar"] and rec["hist"]["counts"]
    # chapter 05's file: scores and ranks land in the index, twice gives the same file
    contrast = {"features": [{"feature": pages[1], "score": -0.5}, {"feature": 3, "score": 0.25}], "layer": 1}
    (run.metrics / "contrastive_features_L1.json").write_text(json.dumps(contrast))
    assert add_contrast_scores(run) == 2
    first = (folder / "data" / "index.json").read_bytes()
    assert add_contrast_scores(run) == 2 and (folder / "data" / "index.json").read_bytes() == first
    index = json.loads(first)
    assert index["contrast"][pages[1]] == -0.5 and index["contrast_rank"][pages[1]] == 1
    assert index["contrast_rank"][3] == 2 and index["contrast"][0 if pages[1] else 1] is None
    # REPORT.md links it, in the SAE section
    from result_examples import EXAMPLES

    from mechlib import results

    results.save(run, EXAMPLES[results.Evaluated])  # chapter 03 ran: the report shows its SAE section
    text = report.render_report("tiny")
    assert "[browser/index.html](browser/index.html)" in text and f"all {D_SAE} latents" in text


def validate_html(text: str, where: str) -> None:
    try:
        html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(text)
    except html5lib.html5parser.ParseError as exc:
        pytest.fail(f"{where}: invalid HTML ({exc})")


def test_static_pages_are_valid_html(site):
    built, _ = site
    for name in ("index.html", "latent.html"):
        validate_html((built.folder / name).read_text(), name)
    with pytest.raises(pytest.fail.Exception):
        validate_html("<!DOCTYPE html><html><head><title>x</title></head><body><p><div></span></body></html>", "bad")


@pytest.fixture(scope="module")
def chromium():
    from mechlib.browser.drive import ChromiumMissing, open_chromium

    try:
        driver = open_chromium()
    except ChromiumMissing as exc:
        pytest.skip(str(exc))
    yield driver
    driver.quit()


def _rows(driver) -> list[int]:
    return [
        int(x)
        for x in driver.execute_script(
            "return Array.from(document.querySelectorAll('#latents tbody tr')).map(r => r.dataset.id)"
        )
    ]


def test_site_in_chromium(site, chromium):
    from selenium.webdriver.common.by import By

    from mechlib.browser.drive import check_latent_page, load, screenshot

    built, run = site
    shots = run.root / "browser" / "screenshots"
    load(chromium, built.folder / "index.html")
    validate_html("<!DOCTYPE html>" + chromium.page_source, "index.html (rendered)")
    assert _rows(chromium) == list(range(D_SAE))
    assert chromium.find_element(By.ID, "shown").text == f"{D_SAE} of {D_SAE} latents"
    assert len(chromium.find_elements(By.CSS_SELECTOR, "#density-hist rect")) > 3
    index = json.loads((built.folder / "data" / "index.json").read_text())
    # sort: density descending, then ascending
    header = chromium.find_element(By.CSS_SELECTOR, 'th[data-key="density"]')
    header.click()
    rows = _rows(chromium)
    dens = [index["density"][i] for i in rows]
    assert dens == sorted(dens, reverse=True) and rows != list(range(D_SAE))
    header.click()
    assert [index["density"][i] for i in _rows(chromium)] == sorted(dens)
    screenshot(chromium, shots / "index.png")
    # search by id, then by a token (shown visibly or raw, both match)
    box = chromium.find_element(By.ID, "search")
    box.send_keys("7")
    assert _rows(chromium) == [7]
    token = next(t for ts in index["top_tokens"] for t in ts if t.strip())
    box.clear()
    box.send_keys(token)
    expect = [i for i, ts in enumerate(index["top_tokens"]) if any(token.lower() in t.lower() for t in ts)]
    assert sorted(_rows(chromium)) == expect and 0 < len(expect) < D_SAE
    # a latent page: contexts drawn with highlighted tokens, histogram, logit effects
    latent = next(i for i, p in enumerate(index["page"]) if p)
    check = check_latent_page(chromium, built.folder, latent, shots)
    rec = json.loads((built.folder / "data" / "latents" / f"{latent}.json").read_text())
    assert check.contexts == len(rec["top"]) > 0 and check.highlighted >= check.contexts
    assert check.hist_bars == len(rec["hist"]["counts"]) and check.logit_rows == 2 * len(rec["promoted"])
    validate_html("<!DOCTYPE html>" + chromium.page_source, "latent.html (rendered)")
    assert check.screenshot.stat().st_size > 10_000 and (shots / "index.png").is_file()
    # a latent without a page says so
    missing = next(i for i, p in enumerate(index["page"]) if not p)
    load(chromium, built.folder / "latent.html", f"id={missing}")
    assert "no page" in chromium.find_element(By.ID, "summary").text


@pytest.mark.book_outputs
def test_run_site_in_chromium():
    """A real run's site (``MECHBOOK_TEST_RUN``): screenshots of the index and two latent pages."""
    from mechlib.browser.drive import ChromiumMissing, chromium_binaries, screenshot_site

    folder = paths.RunPaths(os.environ.get("MECHBOOK_TEST_RUN", "default")).root / "browser"
    if not (folder / "index.html").is_file():
        pytest.skip(f"{folder}: no browser built (run chapter 03)")
    try:
        chromium_binaries()
    except ChromiumMissing as exc:
        pytest.skip(str(exc))
    shots = screenshot_site(folder)
    assert next(p.name for p in shots) == "index.png" and len(shots) == 3
    assert all(p.stat().st_size > 20_000 for p in shots)


class FakeStore:
    """The part of ``ActivationStore`` the browser reads: manifest, entries, shards, layer."""

    def __init__(self, shards, checksum: str = "a"):
        self.shards = shards
        self.entries = [
            {"index": i, "first_row": s.first_row, "sha256": checksum + str(i)} for i, s in enumerate(shards)
        ]
        self.n_tokens = sum(s.activations.shape[0] for s in shards)
        self.d_model, self.layer = shards[0].activations.shape[1], 1
        self.manifest = {"shards": self.entries, "n_tokens": self.n_tokens, "d_model": self.d_model, "layer": 1}

    def shard(self, i):
        s = self.shards[i]
        return {"activations": s.activations, "row": s.row, "position": s.position, "context_ids": s.context_ids}


def test_build_browser_keeps_a_build_of_the_same_inputs(tiny, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tiny_run import model_folder

    from mechlib.browser import build_browser

    sae, shards = tiny
    monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path / "outputs")
    run = paths.RunPaths("tiny").make()
    contrast = {"features": [{"feature": 11, "score": 0.5}, {"feature": 12, "score": -0.25}]}
    (run.metrics / "contrastive_features_L1.json").write_text(json.dumps(contrast))
    params = SimpleNamespace(model=str(model_folder(tmp_path)), model_dtype="float32", device="cpu", run="tiny", seed=0)
    store = FakeStore(shards)
    first = build_browser(params, run, store, sae, max_latents=6, contexts=3, progress=False)
    index = json.loads((first.folder / "data" / "index.json").read_text())
    assert not first.reused and first.n_pages == 6 and index["page"][11] and index["page"][12]  # contrastive first
    assert index["contrast_rank"][11] == 1 and (first.folder / "latent.html").is_file()
    page = (first.folder / "data" / "latents" / "11.json").read_bytes()
    again = build_browser(params, run, store, sae, max_latents=6, contexts=3, progress=False)
    assert again.reused and again.n_pages == 6 and (first.folder / "data" / "latents" / "11.json").read_bytes() == page
    changed = build_browser(
        params, run, FakeStore(shards, checksum="b"), sae, max_latents=6, contexts=3, progress=False
    )
    assert not changed.reused


def test_refresh_gives_chapter_05s_latents_pages(tiny, tmp_path, monkeypatch):
    """Chapter 03 builds before chapter 05 ranks anything; chapter 05's refresh puts its latents first."""
    from types import SimpleNamespace

    from tiny_run import model_folder

    from mechlib.browser import build_browser, first_with_page, refresh_browser

    sae, shards = tiny
    monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path / "outputs")
    run = paths.RunPaths("tiny").make()
    params = SimpleNamespace(model=str(model_folder(tmp_path)), model_dtype="float32", device="cpu", run="tiny", seed=0)
    store = FakeStore(shards)
    assert refresh_browser(params, run, store, sae, progress=False) is None  # chapter 03 built nothing yet
    first = build_browser(params, run, store, sae, max_latents=4, contexts=3, progress=False)
    index = json.loads((first.folder / "data" / "index.json").read_text())
    lacking = [f for f in range(D_SAE) if index["density"][f] > 0 and not index["page"][f]][:3]
    assert len(lacking) == 3 and first_with_page(first.folder, lacking) is None
    contrast = {"features": [{"feature": f, "score": 0.1 * (i + 1)} for i, f in enumerate(lacking)]}
    (run.metrics / "contrastive_features_L1.json").write_text(json.dumps(contrast))
    refreshed = refresh_browser(params, run, store, sae, progress=False)
    assert refreshed is not None and not refreshed.reused and refreshed.n_pages == 4  # chapter 03's caps
    assert first_with_page(refreshed.folder, lacking) == lacking[0]
    index = json.loads((refreshed.folder / "data" / "index.json").read_text())
    assert all(index["page"][f] for f in lacking) and index["contrast_rank"][lacking[0]] == 1
    again = refresh_browser(params, run, store, sae, progress=False)
    assert again is not None and again.reused  # every ranked latent has its page now: kept
    # chapter 05's view: the best-scoring ranked latent with a page, its page as HTML, the line marked placeholder
    from mechlib.activations import collect_config
    from mechlib.browser import contrast_view

    monkeypatch.setattr(collect_config, "open_store", lambda *_: store)
    params.placeholder_labels = 0.5
    view = contrast_view(params, run, sae, [(f, s["score"]) for f, s in zip(lacking, contrast["features"])])
    assert view.latent == lacking[2] and view.html is not None and "PLACEHOLDER" in repr(view)
    assert view._repr_html_().startswith("<p>PLACEHOLDER") and view.html in view._repr_html_()


def test_decoder_names_lone_bytes(tiny_tok):
    """A lone byte of a multi-byte character shows as <0xNN>, not U+FFFD; whole tokens decode as before."""
    tok = tiny_tok
    decode = Decoder(tok)
    decode(range(len(tok)))
    vocab = decode.vocab()
    assert len(vocab) == len(tok) and not any("\ufffd" in t or t == "" for t in vocab.values())
    clean = [i for i in range(len(tok)) if tok.decode([i]) and "\ufffd" not in tok.decode([i])]
    assert len(clean) < len(tok) and all(vocab[str(i)] == tok.decode([i]) for i in clean)
