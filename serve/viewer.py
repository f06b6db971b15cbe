"""The viewer: one static page of the Serve app (``GET /``), its stylesheet and script, served from memory.

The files live in ``serve/viewer/`` (no build step, no CDN: the page works offline) and are read once at import.
The page posts the chosen file to ``/predict?explain=true`` and asks ``/model`` for the card's essentials; it
holds no data itself, so its three paths are open with authentication on (:class:`serve.auth.Guard`), where the
page's token field then serves the API calls. ``GET /`` answers the page to a browser (``Accept: text/html``)
and the JSON index to anything else. Its headers keep it to its own origin (Content-Security-Policy) and out of
other sites' frames."""

from __future__ import annotations

import json
from pathlib import Path

from kdray.reason_words import PLAIN_WORDS

FOLDER = Path(__file__).with_name("viewer")
PAGE_PATHS = frozenset({"/", "/viewer.css", "/viewer.js"})
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: "
                               "blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _page() -> bytes:
    words = json.dumps(PLAIN_WORDS).replace("<", "\\u003c")  # inside <script type="application/json">
    return (FOLDER / "index.html").read_text(encoding="utf-8").replace("{{REASON_WORDS}}", words).encode()


#: path → (body, media type)
FILES: dict[str, tuple[bytes, str]] = {
    "/": (_page(), "text/html; charset=utf-8"),
    "/viewer.css": ((FOLDER / "viewer.css").read_bytes(), "text/css; charset=utf-8"),
    "/viewer.js": ((FOLDER / "viewer.js").read_bytes(), "text/javascript; charset=utf-8"),
}


def wants_page(accept: bytes | str | None) -> bool:
    """Whether a request for ``/`` is a browser's (it asks for HTML): it gets the page, anything else the JSON."""
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    return "text/html" in (accept or "").lower()


def is_page_request(path: str, accept: bytes | None) -> bool:
    """A request for one of the viewer's files (``/`` only when it asks for HTML)."""
    return path in PAGE_PATHS and (path != "/" or wants_page(accept))
