"""User text made inert before it enters a model card, a report or front matter."""

from __future__ import annotations

import json
import re

_MD_SPECIAL = re.compile(r"([\\`*\[\]|])")  # code, emphasis, links / images, table cells (HTML is escaped apart)


def md_text(text, limit: int = 300) -> str:
    """User text as inert markdown: one line (no heading or block can start), HTML escaped, the characters of code,
    emphasis, links, images and table cells backslash-escaped, cut at ``limit`` characters."""
    import html

    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return _MD_SPECIAL.sub(r"\\\1", html.escape(s, quote=False))


def yaml_scalar(text) -> str:
    """A YAML scalar for front matter: as it is when plainly safe, else a JSON (double-quoted YAML) string."""
    s = str(text)
    return s if re.fullmatch(r"[A-Za-z0-9_./+-]+", s) and not s.startswith("-") else json.dumps(s)
