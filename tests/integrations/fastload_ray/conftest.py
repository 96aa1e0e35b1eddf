"""Ray's own import warns (a pydantic v2 deprecation in ray.serve's schema): import it once here with that
warning silenced, so the rest of the suite keeps warnings as errors for everything of ours."""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using extra keyword arguments on `Field`", category=DeprecationWarning)
    from ray import serve  # noqa: F401
