"""The BentoML example's tests need BentoML (see tests/integrations/fastload_bentoml/conftest.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("bentoml", reason="the BentoML example's tests need bentoml (scripts/setup.sh ...,bentoml)")
