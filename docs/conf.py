"""Sphinx configuration: the docs are Markdown pages (MyST), built with
``sphinx-build -W -n docs <out>`` in CI, so a broken link is an error."""

from __future__ import annotations

project = "quartmail"
author = "The quartmail developers"
copyright = "2026, The quartmail developers"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
# Links to a page's section (settings.md#mail_port) resolve to its headings.
myst_heading_anchors = 3

html_theme = "furo"
html_title = "quartmail"
