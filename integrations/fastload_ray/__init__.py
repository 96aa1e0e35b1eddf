"""fastload adapter for ray: filled in by its own issue."""
