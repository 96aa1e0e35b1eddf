"""``fastload serve``: this node's tiers as a read-only, SigV4-checked S3 endpoint, for any S3 client and for
peer nodes (see storage/peers.py)."""

from __future__ import annotations

from ..errors import FastloadError


class ServeError(FastloadError):
    """``fastload serve`` cannot start: missing credentials, a bad address, a port in use."""


__all__ = ["ServeError"]
