"""The chat page (``GET /``) and its files (``GET /page/<file>``), shipped in the package.

Everything the page needs is in ``page/`` next to this module (no build step, nothing
fetched from elsewhere), so it works offline and from an installed wheel. Only files
that are in that folder's listing are served: a request path is looked up as a
literal name in the listing, never joined onto a directory, so ``..``, encoded dots,
backslashes and directories cannot reach anything else.

The page and its files are served without an API key (the page must load before it
can ask for one); only the API behind them checks the key.
"""

import functools
from pathlib import Path
from typing import Dict, Optional, Tuple

PAGE_DIR = Path(__file__).with_name("page")
PREFIX = "/page/"

# A strict policy: only our own files, no inline script or style, no plugins, no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE files
}

Response = Tuple[int, Dict[str, str], bytes]


@functools.lru_cache(maxsize=1)
def listing() -> Dict[str, Path]:
    """Every servable file: its path relative to ``page/`` (with ``/``) -> the file."""
    files = {}
    for path in sorted(PAGE_DIR.rglob("*")):
        rel = path.relative_to(PAGE_DIR)
        if path.is_file() and not any(part.startswith((".", "__")) for part in rel.parts) \
                and path.suffix in CONTENT_TYPES:
            files[rel.as_posix()] = path
    return files


def headers(content_type: str, length: int) -> Dict[str, str]:
    return {"Content-Type": content_type, "Content-Length": str(length), "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def page_response(path: str) -> Optional[Response]:
    """``(status, headers, body)`` for the page's paths; None for every other path (the API's).

    ``/`` is the page itself; ``/page/<file>`` one of its files, or 404 if there is no such file.
    """
    route = path.split("?", 1)[0].split("#", 1)[0]
    if route in ("/", "/index.html"):
        name = "index.html"
    elif route.startswith(PREFIX):
        name = route[len(PREFIX):]
    else:
        return None
    file = listing().get(name)
    if file is None:
        body = b"not found\n"
        return 404, headers(CONTENT_TYPES[".txt"], len(body)), body
    body = file.read_bytes()
    return 200, headers(CONTENT_TYPES[file.suffix], len(body)), body
