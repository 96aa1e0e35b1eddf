"""What a fresh process's GPU set-up costs, piece by piece: a cost model from one short GPU lease.

The load benchmark says how long a first load takes; this says why. In one process (CUDA context made
first, not timed), it times what fastload's GPU path pays once: pinning staging buffers by
``cudaHostRegister`` of faulted-in huge pages and by ``cudaHostAlloc`` at several sizes, the same
registrations from 16 threads at once (does the driver serialise them?), faulting the pages in, the
copy streams and the device allocation. It also asks whether the driver registers a read-only
mapping of the checkpoint's page-cache pages itself (copying from the page cache with no staging at
all), and what that costs per GiB. The pinning figures are medians of ``--repeats`` fresh buffers; the
concurrent registrations and the file registration are one sample each.

Usage: python benchmarks/gpu_probe.py FILE [--json OUT] [--repeats 5]
Needs CUDA; exits 1 with a message where there is none.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import threading
import time
from typing import Any

import torch

from fastload_core.loader.cuda import faulted_mapping

MIB = 1 << 20
REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly


def _empty_host_cache() -> bool:
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
    return empty is not None


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def probe_pinning(repeats: int) -> dict[str, Any]:
    cudart = torch.cuda.cudart()
    out: dict[str, Any] = {}
    for size_mib in (4, 16, 64, 256):
        nbytes = size_mib * MIB
        fault: list[float] = []
        register: list[float] = []
        alloc: list[float] = []
        for _ in range(repeats):
            started = time.perf_counter()
            mapping, tensor = faulted_mapping(nbytes)
            registering = time.perf_counter()
            error = int(cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0))
            registered = time.perf_counter()
            if error:
                out[f"register_{size_mib}MiB_error"] = error
                break
            fault.append(registering - started)
            register.append(registered - registering)
            cudart.cudaHostUnregister(tensor.data_ptr())
            del tensor, mapping
            if len(alloc) < len(register):  # where the host cache cannot be emptied, once only (then cache hits)
                started = time.perf_counter()
                pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                alloc.append(time.perf_counter() - started)
                del pinned
                if not _empty_host_cache():
                    alloc.append(float("nan"))  # no more samples: dropped below
        out[f"{size_mib}MiB"] = {"fault_ms": _median_ms(fault), "register_ms": _median_ms(register),
                                 "alloc_ms": _median_ms([a for a in alloc if a == a])}
    return out


def probe_concurrent_registration(threads: int, size_mib: int) -> dict[str, Any]:
    """The same registrations one after another and from ``threads`` threads at once."""
    cudart = torch.cuda.cudart()
    nbytes = size_mib * MIB
    buffers = [faulted_mapping(nbytes) for _ in range(2 * threads)]
    serial_started = time.perf_counter()
    for _, tensor in buffers[:threads]:
        cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    serial = time.perf_counter() - serial_started
    barrier = threading.Barrier(threads + 1)  # the clock starts when this thread releases them all
    each: list[float] = []

    def register(tensor: torch.Tensor) -> None:
        barrier.wait()
        started = time.perf_counter()
        cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0)
        each.append(time.perf_counter() - started)

    workers = [threading.Thread(target=register, args=(tensor,)) for _, tensor in buffers[threads:]]
    for worker in workers:
        worker.start()
    barrier.wait()
    parallel_started = time.perf_counter()
    for worker in workers:
        worker.join()
    parallel = time.perf_counter() - parallel_started
    for _, tensor in buffers:
        cudart.cudaHostUnregister(tensor.data_ptr())
    return {"threads": threads, "size_mib": size_mib, "serial_ms": round(serial * 1e3, 3),
            "parallel_wall_ms": round(parallel * 1e3, 3), "parallel_each_median_ms": _median_ms(each)}


def probe_file_registration(path: str, device: torch.device) -> dict[str, Any]:
    """Can the copy engine read the page cache directly (a registered read-only mapping of the file)?"""
    cudart = torch.cuda.cudart()
    size = os.path.getsize(path)
    length = min(size - size % mmap.PAGESIZE, 1024 * MIB)
    out: dict[str, Any] = {"bytes": length}
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), length, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    view = torch.frombuffer(mapping, dtype=torch.uint8)  # a read-only buffer: torch warns, nothing writes
    for flags, name in ((REGISTER_READ_ONLY, "read_only"), (0, "default")):
        started = time.perf_counter()
        error = int(cudart.cudaHostRegister(view.data_ptr(), length, flags))
        out[name] = {"error": error, "ms": round((time.perf_counter() - started) * 1e3, 3)}
        if error == 0:
            destination = torch.empty(length, dtype=torch.uint8, device=device)
            torch.cuda.synchronize()
            started = time.perf_counter()
            destination.copy_(view, non_blocking=True)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            out[name].update(copy_ms=round(seconds * 1e3, 3), copy_gbps=round(length / seconds / 1e9, 2),
                             identical=bool(torch.equal(destination[:MIB].cpu(), view[:MIB])))
            cudart.cudaHostUnregister(view.data_ptr())
            break
    del view
    return out


def probe_device_setup(device: torch.device, nbytes: int) -> dict[str, Any]:
    started = time.perf_counter()
    streams = [torch.cuda.Stream(device=device) for _ in range(4)]
    allocating = time.perf_counter()
    tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
    allocated = time.perf_counter()
    torch.cuda.synchronize()
    del tensor, streams
    return {"four_streams_ms": round((allocating - started) * 1e3, 3),
            "device_alloc_ms": round((allocated - allocating) * 1e3, 3), "device_alloc_bytes": nbytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the checkpoint (read once into the page cache, e.g. just written)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_probe: torch.cuda.is_available() is False; run it on a CUDA machine", file=sys.stderr)
        return 1
    if not os.path.isfile(args.file):
        print(f"gpu_probe: {args.file} is not a file", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    torch.empty(1, device=device)
    torch.cuda.synchronize()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    results["device_setup"] = probe_device_setup(device, os.path.getsize(args.file))
    results["pinning"] = probe_pinning(args.repeats)
    results["concurrent_registration"] = [probe_concurrent_registration(16, 16), probe_concurrent_registration(16, 4)]
    try:
        results["file_registration"] = probe_file_registration(args.file, device)
    except (OSError, RuntimeError, ValueError) as exc:
        results["file_registration"] = {"error": f"{type(exc).__name__}: {exc}"}
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
