"""fastload adapter for torchserve: filled in by its own issue."""
