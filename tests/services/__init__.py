"""pytest fixtures over real services: each starts its own server on a free loopback port.

The server classes live in ``fastload_devservices`` (shared with the benchmarks); only fixtures are here."""
