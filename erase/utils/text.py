"""User text made inert before it enters a model card, a report or front matter."""

from __future__ import annotations

import json
import re

_MD_SPECIAL = re.compile(r"([\\`*\[\]|])")  # code, emphasis, links / images, table cells (HTML is escaped apart)
# what GFM and linkify turn into links without any markup: a scheme's "://", an e-mail's "@", a domain's dots
_AUTOLINK = re.compile(r"(:(?=//)|(?<=\w)\.(?=[^\W\d_]))")


def md_text(text, limit: int = 300) -> str:
    """User text as inert markdown: one line (no heading or block can start), HTML escaped, the characters of code,
    emphasis, links, images and table cells backslash-escaped, cut at ``limit`` characters. Bare URLs, domains and
    e-mail addresses are made inert too (GFM and markdown-it's linkify link them with no markup): a scheme's ``:`` and
    a domain's dots are backslash-escaped, which renders the same text and splits what a linkifier scans; an ``@``
    gets a zero-width space before it (cmark-gfm finds e-mails across escapes)."""
    import html

    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return _AUTOLINK.sub(r"\\\1", _MD_SPECIAL.sub(r"\\\1", html.escape(s, quote=False))).replace("@", "&#8203;@")


def yaml_scalar(text) -> str:
    """A YAML scalar for front matter: as it is when plainly safe, else a JSON (double-quoted YAML) string."""
    s = str(text)
    return s if re.fullmatch(r"[A-Za-z0-9_./+-]+", s) and not s.startswith("-") else json.dumps(s)
