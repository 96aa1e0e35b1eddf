"""The test servers' harness: ports that outgoing connections cannot take, and no leaked log on a failed start."""

from __future__ import annotations

import gc
import sys
import warnings

import pytest

from fastload_devservices._process import ServerProcess, _ephemeral_ports, free_port


def test_free_ports_lie_outside_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    ephemeral = _ephemeral_ports()
    ports = [free_port() for _ in range(50)]
    pairs = [free_port(also_free_at=10_000) for _ in range(20)]
    assert not any(port in ephemeral for port in ports + pairs + [p + 10_000 for p in pairs])
    handed = ports + pairs + [p + 10_000 for p in pairs]
    assert len(set(handed)) == len(handed)


def test_a_server_that_exits_at_start_raises_its_stderr_and_leaks_no_log_file() -> None:
    server = ServerProcess(
        lambda port: [sys.executable, "-c", f"import sys; sys.exit('port {port} is not available')"],
        ready=lambda port: False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(RuntimeError, match=f"exited early: port {server.port} is not available"):
            server.start(timeout=10)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert server.pid is None


def test_a_host_whose_ephemeral_range_covers_every_port_still_gets_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastload_devservices import _process

    monkeypatch.setattr(_process, "_ephemeral_ports", lambda: range(1024, 65536))
    ports = [free_port() for _ in range(5)] + [free_port(also_free_at=10_000) for _ in range(3)]
    assert len(set(ports)) == len(ports)
