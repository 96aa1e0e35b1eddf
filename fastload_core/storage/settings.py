"""Storage settings: arguments win, then ``FASTLOAD_*`` environment variables, then defaults that need no
server (shm under /dev/shm, local disk under the fastload cache dir, no shared tier, no Redis)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import cache_dir
from .errors import StorageError

TIER_ORDER = ("shm", "local_disk", "shared_fs")  # fastest first
VERIFY_MODES = ("size", "sample", "full")  # how hard a cache hit is checked (storage/verify.py)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str, *, variable: str = "size") -> int | float | None:
    """``"8GiB"``, ``"500M"``, ``"1.5g"``, ``"123"`` → bytes (int); ``"50%"`` → fraction of the filesystem
    (float); ``"none"``/``"unlimited"`` → None."""
    value = text.strip().lower()
    if value in ("", "none", "unlimited", "inf"):
        return None
    if value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise StorageError(f"{variable}={text!r}: a percentage must be in (0, 100]")
        return percent / 100
    match = _SIZE.match(value)
    if not match:
        raise StorageError(f"{variable}={text!r}: expected a size such as 512MiB, 8G or 50%")
    number, unit, binary = match.groups()
    base = 1024 if binary or unit == "" else 1000
    power = " kmgtp".index(unit or " ")
    return int(float(number) * base**power)


def _env_size(variable: str, default: str) -> int | float | None:
    return parse_size(os.environ.get(variable, default), variable=variable)


def _env_int(variable: str, default: int) -> int:
    raw = os.environ.get(variable)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StorageError(f"{variable}={raw!r}: expected an integer") from None
    if value < 1:
        raise StorageError(f"{variable}={raw!r}: must be at least 1")
    return value


def _env_float(variable: str, default: float) -> float:
    """A number of seconds, finite and above zero: a negative lock timeout means "wait forever" to filelock,
    and a zero lease TTL a Redis lock that never expires."""
    raw = os.environ.get(variable)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"{variable}={raw!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise StorageError(f"{variable}={raw!r}: expected a number of seconds above zero")
    return value


def _default_shm_dir() -> Path | None:
    configured = os.environ.get("FASTLOAD_SHM_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "none") else Path(configured)
    return Path("/dev/shm/fastload") if os.path.isdir("/dev/shm") else None


@dataclass(frozen=True)
class S3Settings:
    concurrency: int = 16
    part_size: int = 16 * 1024 * 1024
    max_attempts: int = 8
    retry_mode: str = "standard"

    @classmethod
    def from_env(cls) -> S3Settings:
        part = _env_size("FASTLOAD_S3_PART_SIZE", "16MiB")
        if not isinstance(part, int) or part < 64 * 1024:
            raise StorageError("FASTLOAD_S3_PART_SIZE must be a byte size of at least 64KiB, such as 16MiB")
        return cls(
            concurrency=_env_int("FASTLOAD_S3_CONCURRENCY", 16),
            part_size=part,
            max_attempts=_env_int("FASTLOAD_S3_MAX_ATTEMPTS", 8),
            retry_mode=os.environ.get("FASTLOAD_S3_RETRY_MODE", "standard"),
        )


@dataclass(frozen=True)
class StorageSettings:
    shm_dir: Path | None = field(default_factory=_default_shm_dir)
    local_dir: Path = field(default_factory=lambda: cache_dir() / "storage")
    shared_dir: Path | None = None
    shm_capacity: int | float | None = 0.5
    local_disk_capacity: int | float | None = 0.8
    shared_fs_capacity: int | float | None = None
    default_tier: str = "local_disk"
    fetch_timeout: float = 3600.0
    redis_url: str | None = None
    lease_ttl: float = 60.0
    offline: bool = False
    verify: str = "size"
    redis_timeout: float = 2.0

    @classmethod
    def from_env(cls) -> StorageSettings:
        shared = os.environ.get("FASTLOAD_SHARED_DIR")
        default_tier = os.environ.get("FASTLOAD_TIER", "local_disk")
        if default_tier not in TIER_ORDER:
            raise StorageError(f"FASTLOAD_TIER={default_tier!r}: expected one of {', '.join(TIER_ORDER)}")
        verify = os.environ.get("FASTLOAD_VERIFY", "").strip().lower() or "size"
        if verify not in VERIFY_MODES:
            raise StorageError(f"FASTLOAD_VERIFY={verify!r}: expected one of {', '.join(VERIFY_MODES)} (size: "
                               "every hit's file sizes; sample: also a few blocks per file; full: every block)")
        return cls(
            shm_dir=_default_shm_dir(),
            local_dir=cache_dir() / "storage",
            shared_dir=Path(shared) if shared else None,
            shm_capacity=_env_size("FASTLOAD_SHM_CAPACITY", "50%"),
            local_disk_capacity=_env_size("FASTLOAD_LOCAL_DISK_CAPACITY", "80%"),
            shared_fs_capacity=_env_size("FASTLOAD_SHARED_FS_CAPACITY", "none"),
            default_tier=default_tier,
            fetch_timeout=_env_float("FASTLOAD_FETCH_TIMEOUT", 3600.0),
            redis_url=os.environ.get("FASTLOAD_REDIS_URL") or None,
            lease_ttl=_env_float("FASTLOAD_LEASE_TTL", 60.0),
            offline=os.environ.get("FASTLOAD_OFFLINE", "").strip().lower() in ("1", "true", "yes"),
            verify=verify,
            redis_timeout=_env_float("FASTLOAD_REDIS_TIMEOUT", 2.0),
        )
