"""Per-client tokens derived from a job secret (HMAC-SHA256), checked by the service.

A token is `<expiry>.<hmac>`: the HMAC covers (job id, client id, expiry), so a token is good for
one client of one job until its expiry (Unix seconds, the server's clock). Anything else that a
client sends as a token (empty, too long, non-ASCII, no expiry, expired, forged) is invalid.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["DEFAULT_TTL_S", "MAX_TOKEN_CHARS", "client_token", "token_expiry", "verify_token"]

DEFAULT_TTL_S = 7 * 24 * 3600
MAX_TOKEN_CHARS = 96  # a 20-digit expiry, a dot and 64 hex digits fit


def _mac(secret: str, job_id: str, client_id: int, expires: int) -> str:
    msg = f"{job_id}:{int(client_id)}:{int(expires)}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def client_token(secret: str, job_id: str, client_id: int, *, expires: int | None = None,
                 ttl_s: float = DEFAULT_TTL_S) -> str:
    """The token client `client_id` presents for `job_id`, valid until `expires` (Unix seconds;
    default now + `ttl_s`); only the secret's holder can mint it."""
    exp = int(expires if expires is not None else time.time() + ttl_s)
    return f"{exp}.{_mac(secret, job_id, client_id, exp)}"


def token_expiry(token: str) -> int | None:
    """The expiry a well-formed token claims (not verified), or None."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.isascii():
        return None
    exp, dot, _ = token.partition(".")
    return int(exp) if dot and exp.isdigit() and len(exp) <= 20 else None


def verify_token(secret: str, job_id: str, client_id: int, token: str, *, now: float | None = None) -> bool:
    """Whether `token` is a valid, unexpired token of (job_id, client_id). Never raises on what a
    client sends: malformed tokens are simply invalid."""
    exp = token_expiry(token)
    if exp is None or exp < (time.time() if now is None else now):
        return False
    want = _mac(secret, job_id, client_id, exp).encode()
    return hmac.compare_digest(want, token.partition(".")[2].encode())
