"""Open a built browser in headless Chromium, check what it draws, and save screenshots.

Why in the library and not only in a test: the same steps check the tiny site of the unit tests and
a real run's site (``python -m mechlib.browser.drive outputs/<run>/browser``), whose screenshots
land in ``outputs/<run>/browser/screenshots/``. Needs Debian's ``chromium`` and ``chromium-driver``
(``make setup`` installs them as root where apt works) and ``selenium`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mechlib.io import read_json

if TYPE_CHECKING:  # selenium is a test dependency (the dev extra), not one of the library's
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM_MISSING = (
    "headless Chromium is not available ({what}); on Debian as root: "
    "apt-get install -y chromium chromium-driver (make setup does this), and pip install selenium"
)


class ChromiumMissing(RuntimeError):
    """Chromium, chromedriver or selenium is not installed; the message says how to install them."""


class PageCheck(NamedTuple):
    """What a latent page drew: contexts, highlighted token spans, histogram bars, logit-effect rows."""

    latent: int
    contexts: int
    highlighted: int
    hist_bars: int
    logit_rows: int
    screenshot: Path


def chromium_binaries() -> tuple[str, str]:
    """``(chromium, chromedriver)`` paths, or :class:`ChromiumMissing` naming what is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise ChromiumMissing(CHROMIUM_MISSING.format(what="no selenium module")) from None
    if not browser or not driver:
        raise ChromiumMissing(CHROMIUM_MISSING.format(what="no chromium binary" if not browser else "no chromedriver"))
    return browser, driver


def open_chromium(width: int = 1280, height: int = 1000) -> WebDriver:
    """A headless Chromium WebDriver (no sandbox: the tests run as root in containers)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_binaries()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def load(driver: WebDriver, page: Path, query: str = "", timeout: float = 30) -> None:
    """Open ``page`` from the file system (``file://``, as a user would) and wait until its script marks it ready."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(page).resolve().as_uri() + (f"?{query}" if query else ""))
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body && document.body.getAttribute('data-ready') === '1'")
    )


def screenshot(driver: WebDriver, path: Path, max_height: int = 6000) -> Path:
    """The whole page (the window grows to the document's height, at most ``max_height`` px)."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    width = int(driver.execute_script("return window.innerWidth"))
    driver.set_window_size(width, min(max(height + 200, 600), max_height))  # + the window's own chrome
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path


def check_latent_page(driver: WebDriver, folder: Path, latent: int, out: Path) -> PageCheck:
    """Open one latent's page and count what it drew; screenshot it into ``out``."""
    load(driver, folder / "latent.html", f"id={latent}")
    count = lambda css: int(driver.execute_script(f"return document.querySelectorAll({css!r}).length"))  # noqa: E731
    highlighted = int(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('#top-contexts .tok'))"
            ".filter(s => s.style.backgroundColor !== '').length"
        )
    )
    return PageCheck(
        latent,
        count("#top-contexts .ctx"),
        highlighted,
        count("#act-hist rect"),
        count("#logits tr"),
        screenshot(driver, out / f"latent_{latent}.png"),
    )


def pages_to_show(folder: Path, n: int = 2) -> list[int]:
    """The latents whose pages get screenshots: the best contrastive latent with a page (if any), then the
    page latents with the most firings."""
    index = read_json(folder / "data" / "index.json")
    pages = [i for i, p in enumerate(index["page"]) if p]
    ranked = sorted((r, i) for i, r in enumerate(index["contrast_rank"]) if r is not None and index["page"][i])
    picks = [i for _, i in ranked[:1]]
    for i in sorted(pages, key=lambda i: -index["density"][i]):
        if len(picks) >= n:
            break
        if i not in picks:
            picks.append(i)
    return picks


def screenshot_site(folder: str | Path, out: str | Path | None = None, n_latents: int = 2) -> list[Path]:
    """Screenshots of the index and of ``n_latents`` latent pages, into ``out`` (``folder/screenshots``)."""
    folder = Path(folder)
    if not (folder / "index.html").is_file():
        raise FileNotFoundError(f"{folder / 'index.html'}: no browser here; run chapter 03 first")
    out = Path(out) if out is not None else folder / "screenshots"
    driver = open_chromium()
    try:
        load(driver, folder / "index.html")
        if read_json(folder / "data" / "index.json").get("contrast_source"):  # chapter 05 ran: its ranking first
            driver.execute_script("document.querySelector('th[data-key=\"contrast_rank\"]').click()")
        shots = [screenshot(driver, out / "index.png", max_height=2400)]
        for latent in pages_to_show(folder, n_latents):
            driver.set_window_size(1280, 1000)
            shots.append(check_latent_page(driver, folder, latent, out).screenshot)
    finally:
        driver.quit()
    return shots


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="screenshot a mechbook feature browser with headless Chromium")
    ap.add_argument("folder", help="the site, e.g. outputs/default/browser")
    ap.add_argument("--out", default=None, help="where the PNGs go (default: FOLDER/screenshots)")
    args = ap.parse_args(argv)
    for path in screenshot_site(args.folder, args.out):
        print(path)


if __name__ == "__main__":
    main()
