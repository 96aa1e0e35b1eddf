"""The BentoML adapter's tests need BentoML itself; where it is not installed (a GPU machine that runs
only ``pytest -m gpu``), the whole directory is skipped and says why, instead of failing collection."""

from __future__ import annotations

import pytest

pytest.importorskip("bentoml", reason="the BentoML adapter's tests need bentoml (scripts/setup.sh ...,bentoml)")
