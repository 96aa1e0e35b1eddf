"""Real servers on free loopback ports, for the tests and the benchmarks alike (a dev package, not shipped).

Each helper starts an actual server process -- redis-server, moto's S3 server, SeaweedFS, TorchServe,
``bentoml serve`` -- on a port nobody else holds, waits until it answers, and stops it (it can be stopped
and started again on the same port, to simulate an outage). Never mocks: fastload's code talks to these
over real sockets, as it would in production. The pytest fixtures that wrap them live in
``tests/services``; the benchmarks import this package directly, so they no longer reach into ``tests``.
It sits at the repository root, found through pytest's ``pythonpath`` and the benchmarks' own
``sys.path`` entry, and the wheel leaves it out (``[tool.setuptools.packages.find] include``).
"""
