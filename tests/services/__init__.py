"""Real services for tests: each fixture starts its own server on a free loopback port."""
