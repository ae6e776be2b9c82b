"""A static feature browser for a run's SAE: every latent on a page that opens from the file system.

Chapter 03 calls :func:`build_browser` (``outputs/<run>/browser/``); the runner calls
:func:`add_contrast_scores` after chapter 05 to put its contrastive scores into the index; chapter 05
calls :func:`refresh_browser` so that its top contrastive latents have pages.
Modules: ``gather`` (one streaming pass over held-out shards), ``effects`` (logit effects, similar
decoder directions), ``pages`` (what each page shows), ``site`` (writing the files), ``inline``
(one latent's view for a notebook), ``static/`` (the HTML/CSS/JS).
"""

from mechlib.browser.gather import LatentStats, ShardTokens, gather_latent_stats, iter_store_shards
from mechlib.browser.inline import featured_latent, first_with_page, latent_html
from mechlib.browser.site import (
    DEFAULT_CONTEXTS,
    DEFAULT_MAX_LATENTS,
    BrowserError,
    BrowserSite,
    ContrastView,
    SiteInfo,
    add_contrast_scores,
    browser_folder,
    build_browser,
    build_site,
    contrast_view,
    refresh_browser,
)

__all__ = [
    "DEFAULT_CONTEXTS",
    "DEFAULT_MAX_LATENTS",
    "BrowserError",
    "BrowserSite",
    "ContrastView",
    "LatentStats",
    "ShardTokens",
    "SiteInfo",
    "add_contrast_scores",
    "browser_folder",
    "build_browser",
    "build_site",
    "contrast_view",
    "featured_latent",
    "first_with_page",
    "gather_latent_stats",
    "iter_store_shards",
    "latent_html",
    "refresh_browser",
]
