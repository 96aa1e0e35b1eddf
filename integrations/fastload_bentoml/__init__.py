"""fastload adapter for bentoml: filled in by its own issue."""
