"""Root pytest configuration: nbval compares text output only.

Inline SVG/HTML change on every run; PNG is already skipped by nbval. Checked cells print
rounded, deterministic numbers (see docs/CONVENTIONS.md).
"""


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("image/svg+xml", "text/html", "application/javascript", "stderr")
