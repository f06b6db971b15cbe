"""Who may use a replica: bearer tokens, and the Origin and Host allow-lists. No Ray, no ASGI.

:class:`Guard` judges one request from its path and headers and returns the refusal, or None:

* ``Host`` not on ``allowed_hosts`` (when there is a list) → 421 ``host_not_allowed``: a page on another site
  that rebinds its DNS name to this server's address still sends its own name as Host.
* ``Origin`` not on ``allowed_origins`` (empty by default) → 403 ``origin_not_allowed``: a multipart POST is
  a CORS "simple" request, so a browser sends it without asking first and the server would do the work.
* with tokens configured: no ``Authorization: Bearer`` → 401 ``auth_required``, a wrong one → 401
  ``auth_invalid``, both with ``WWW-Authenticate: Bearer``. The token is compared with every configured one in
  constant time (:func:`hmac.compare_digest`, no early exit), so timing tells neither which nor how much matched.

The viewer's files (:data:`serve.viewer.PAGE_PATHS`: a page that holds no data, whose token field then serves the
API calls) need no token; the Host and Origin checks still apply to them. ``open_paths`` (liveness, readiness)
pass every check: they tell nothing but up or ready, and readiness costs at
most one probe inference a second per replica.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import NamedTuple

from kdray import KdrayError
from serve.options import AccessOptions
from serve.viewer import is_page_request


class Refused(NamedTuple):
    status: int
    reason: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


CHALLENGE = b'Bearer realm="kdray"'
CHALLENGE_INVALID = b'Bearer realm="kdray", error="invalid_token"'


def load_tokens(path: str, min_chars: int) -> tuple[bytes, ...]:
    """The tokens in ``path``: one a line, blank lines and ``#`` comments skipped. A file that cannot be read, or
    holds no token or a short one, is an error: authentication configured must never silently turn off."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise KdrayError(f"auth tokens file {path}: cannot be read ({type(exc).__name__})") from None
    tokens = tuple(line.encode() for line in lines if line and not line.startswith("#"))
    if not tokens:
        raise KdrayError(f"auth tokens file {path}: holds no token (one a line)")
    if any(len(t) < min_chars or b" " in t for t in tokens):  # the message never shows a token
        raise KdrayError(f"auth tokens file {path}: every token needs at least {min_chars} characters and no spaces")
    return tokens


class Guard:
    def __init__(self, options: AccessOptions):
        self.tokens = load_tokens(options.tokens_file, options.min_token_chars) if options.tokens_file else ()
        self.origins = frozenset(o.encode() for o in options.allowed_origins)
        self.hosts = frozenset(h.lower().encode() for h in options.allowed_hosts)
        self.open_paths = tuple(options.open_paths)

    def check(self, path: str, headers: dict[bytes, bytes]) -> Refused | None:
        if path.endswith(self.open_paths):  # in front of Serve the path still carries the route prefix
            return None
        if self.hosts and host_name(headers.get(b"host", b"")) not in self.hosts:
            return Refused(421, "host_not_allowed", "this server does not answer for that Host name")
        origin = headers.get(b"origin")
        if origin is not None and origin not in self.origins and not self._same_origin(origin, headers):
            return Refused(403, "origin_not_allowed", "cross-origin requests from that Origin are not allowed")
        if self.tokens and not is_page_request(path, headers.get(b"accept")):
            return self._check_token(headers.get(b"authorization"))
        return None

    def _same_origin(self, origin: bytes, headers: dict[bytes, bytes]) -> bool:
        """A page of this server itself (``/docs``): its Origin names the Host asked. Only for a Host on the
        allow-list, or an address or ``localhost`` when there is none: a rebound DNS name (the one way a page of
        another site becomes "same-origin") never passes."""
        host = headers.get(b"host", b"").strip().lower()
        if not host or origin.lower().partition(b"://")[2] != host:
            return False
        name = host_name(host)
        return name in self.hosts if self.hosts else _is_address(name)

    def _check_token(self, authorization: bytes | None) -> Refused | None:
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return Refused(401, "auth_required", "this server needs an Authorization: Bearer token",
                           ((b"www-authenticate", CHALLENGE),))
        token = token.strip()
        matched = False
        for known in self.tokens:  # every token, always: no early exit
            matched |= hmac.compare_digest(known, token)
        if not matched:
            return Refused(401, "auth_invalid", "the bearer token is not valid",
                           ((b"www-authenticate", CHALLENGE_INVALID),))
        return None

    def allows_origin(self, origin: bytes | None) -> bool:
        return origin is not None and origin in self.origins


def host_name(host: bytes) -> bytes:
    """The name in a Host header, lower-case, without its port (``[::1]:8000`` → ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith(b"["):
        return host.partition(b"]")[0] + b"]"
    return host.rpartition(b":")[0] if host.count(b":") == 1 else host


def _is_address(name: bytes) -> bool:
    """Whether a Host name is ``localhost`` or an IP address (``[::1]`` too): names no DNS can rebind."""
    if name == b"localhost":
        return True
    try:
        ipaddress.ip_address(name.decode("ascii").strip("[]"))
    except ValueError:
        return False
    return True
