"""Per-client tokens derived from a job secret (HMAC-SHA256), checked by the service."""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["client_token", "verify_token"]


def client_token(secret: str, job_id: str, client_id: int) -> str:
    """The token client `client_id` presents for `job_id`; only the secret's holder can mint it."""
    return hmac.new(secret.encode(), f"{job_id}:{client_id}".encode(), hashlib.sha256).hexdigest()


def verify_token(secret: str, job_id: str, client_id: int, token: str) -> bool:
    return hmac.compare_digest(client_token(secret, job_id, client_id), token or "")
