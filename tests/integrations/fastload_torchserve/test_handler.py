"""FastloadHandler.initialize with TorchServe's own MockContext: weights from the archive (safetensors or a
legacy pickle) or from a URI through the tiers, the device from gpu_id, the pt2 section through the
compile cache, and one clear log line for every way a worker's load can fail."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from fastload_torchserve import ArchiveError, FastloadHandler, HandlerConfigError, worker_device
from fastload_torchserve.handler import within

from fastload_core.errors import CheckpointError
from fastload_core.serving import WeightsUnavailableError
from fastload_core.storage import TieredStore, writethrough
from fastload_devservices.faultproxy import FaultProxy
from fastload_devservices.s3 import BUCKET
from tests.integrations.fastload_torchserve.conftest import MakeContext, reference_outputs

INPUTS = torch.linspace(-2.0, 2.0, 3 * 16).reshape(3, 16)


def _outputs(handler: FastloadHandler, inputs: torch.Tensor = INPUTS) -> torch.Tensor:
    """Through TorchServe's own request path: handle → preprocess → inference → postprocess."""

    class Rows(FastloadHandler):  # the example handler's request shape, without importing examples/
        def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
            return torch.tensor([request["body"] for request in data])

    handler.__class__ = Rows
    rows = handler.handle([{"body": row.tolist()} for row in inputs], handler.context)
    return torch.tensor(rows)


def _shm_entries() -> list[Any]:
    store = TieredStore.from_env()
    return [info for info in store.ls(tier="shm")]


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fastload.torchserve" and r.levelno >= logging.ERROR]


def test_safetensors_in_the_archive(make_context: MakeContext, model_dir: Path, example_weights: Path) -> None:
    (model_dir / "model.safetensors").write_bytes((example_weights / "model.safetensors").read_bytes())
    handler = FastloadHandler()
    handler.initialize(make_context(serialized="model.safetensors"))
    assert handler.initialized
    assert handler.device == torch.device("cpu")
    assert handler.load_report is not None and handler.load_report.strategy == "cpu-mmap"
    assert not any(p.is_meta for p in handler.model.parameters())
    assert torch.equal(_outputs(handler), reference_outputs(example_weights, INPUTS))


def test_legacy_pickle_in_the_archive_is_converted_once(
    make_context: MakeContext, model_dir: Path, example_weights: Path
) -> None:
    (model_dir / "model.pth").write_bytes((example_weights / "model.pth").read_bytes())
    first = FastloadHandler()
    first.initialize(make_context(serialized="model.pth"))
    assert first.load_report is not None and first.load_report.strategy == "cpu-mmap+converted"
    converted = list((Path(os.environ["FASTLOAD_CACHE_DIR"]) / "converted").glob("*.safetensors"))
    assert len(converted) == 1
    written = converted[0].stat().st_mtime_ns
    second = FastloadHandler()  # a second worker of the same model reuses the conversion
    second.initialize(make_context(serialized="model.pth"))
    assert converted[0].stat().st_mtime_ns == written
    assert torch.equal(_outputs(second), reference_outputs(example_weights, INPUTS))


def test_a_pickle_that_would_run_code_is_refused(
    make_context: MakeContext, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, ("touch executed",))

    torch.save({"net.0.weight": Payload()}, model_dir / "model.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        FastloadHandler().initialize(make_context(serialized="model.pth"))
    assert not (model_dir / "executed").exists() and not Path("executed").exists()
    assert len(_errors(caplog)) == 1


def test_weights_by_file_uri_are_shared_from_shm_and_pinned(
    make_context: MakeContext, example_weights: Path
) -> None:
    config = {"handler": {"fastload": {"uri": example_weights.as_uri() + "/model.safetensors", "prefetch": "shm"}}}
    workers = [FastloadHandler(), FastloadHandler()]
    for worker in workers:
        worker.initialize(make_context(config))
    entries = _shm_entries()
    assert len(entries) == 1 and entries[0].in_use  # one copy in /dev/shm, held by the workers
    shm_file = entries[0].entry.path / "files" / "model.safetensors"
    for worker in workers:  # both map that one file, zero-copy
        weight = worker.model.net[0].weight
        assert worker._pin is not None and worker._pin.tier == "shm"
        assert _maps(shm_file, weight)
        assert torch.equal(_outputs(worker), reference_outputs(example_weights, INPUTS))
    workers[0].release()
    assert _shm_entries()[0].in_use  # still held by the other worker
    workers[1].release()
    writethrough.wait(timeout=60)  # the prefetch landed in shm; its copy onto local disk reads the entry meanwhile
    assert not _shm_entries()[0].in_use


def _maps(path: Path, tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory lies in a mapping of ``path`` (a /proc/self/maps line: range, perms,
    offset, device, inode, path)."""
    address = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return len(fields) == 6 and fields[5].strip() == str(path)
    return False


def test_a_worker_holds_the_version_it_warmed(
    make_context: MakeContext, example_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The origin changes between warming the node and holding the weights: the worker still serves the
    version it warmed (and never mixes the two), with no second fetch."""
    import fastload_torchserve.handler as handler_module
    from safetensors.torch import load_file, save_file

    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "model.safetensors").write_bytes((example_weights / "model.safetensors").read_bytes())
    real_warm = handler_module.warm

    def warm_then_publish_a_new_version(*args: Any, **kwargs: Any) -> Any:
        warmed = real_warm(*args, **kwargs)
        changed = {name: tensor + 1 for name, tensor in load_file(origin / "model.safetensors").items()}
        save_file(changed, origin / "model.safetensors")
        return warmed

    monkeypatch.setattr(handler_module, "warm", warm_then_publish_a_new_version)
    handler = FastloadHandler()
    handler.initialize(make_context({"handler": {"fastload": {"uri": origin.as_uri() + "/", "prefetch": "shm"}}}))
    assert torch.equal(_outputs(handler), reference_outputs(example_weights, INPUTS))
    assert len(_shm_entries()) == 1  # the new version was not fetched
    handler.release()


@pytest.mark.s3
def test_weights_by_s3_uri(make_context: MakeContext, example_weights: Path, s3: Any) -> None:
    s3.upload_file(str(example_weights / "model.safetensors"), BUCKET, "tiny/model.safetensors")
    handler = FastloadHandler()
    handler.initialize(make_context({"handler": {"fastload": {"uri": f"s3://{BUCKET}/tiny/", "prefetch": "shm"}}}))
    assert handler._pin is not None and handler._pin.tier == "shm"
    assert torch.equal(_outputs(handler), reference_outputs(example_weights, INPUTS))
    handler.release()


def test_a_uri_wins_over_the_archive_with_a_warning(
    make_context: MakeContext, model_dir: Path, example_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (model_dir / "model.safetensors").write_bytes(b"not read")
    config = {"handler": {"fastload": {"uri": example_weights.as_uri() + "/model.safetensors"}}}
    handler = FastloadHandler()
    handler.initialize(make_context(config, serialized="model.safetensors"))
    assert any("serializedFile 'model.safetensors' is not read" in r.getMessage() for r in caplog.records)
    assert torch.equal(_outputs(handler), reference_outputs(example_weights, INPUTS))
    handler.release()


@pytest.mark.parametrize(
    ("config", "serialized", "error", "says"),
    [
        ({"handler": {"fastload": {"prefetch": "ram"}}}, None, HandlerConfigError, "handler.fastload.prefetch"),
        ({"handler": {"fastload": {}}}, None, HandlerConfigError, "the archive has no weights"),
        (None, "model.safetensors", ArchiveError, "serializedFile is missing"),
        ({"handler": {"fastload": {"uri": "ftp://host/model/"}}}, None, WeightsUnavailableError, "ftp://host/model/"),
        ({"handler": {"fastload": {"uri": "file:///nonexistent/model/"}}}, None, WeightsUnavailableError,
         "file:///nonexistent/model/"),
        ({"handler": {"fastload": {"uri": "s3://user:secret@bucket/m/"}}}, None, WeightsUnavailableError,
         "credentials"),
        ({"handler": {"fastload": {"compile_cache": "memcached://x"}}}, "model.safetensors", HandlerConfigError,
         "handler.fastload.compile_cache"),
    ],
)
def test_bad_config_fails_the_load_with_one_clear_line(
    make_context: MakeContext, model_dir: Path, example_weights: Path, caplog: pytest.LogCaptureFixture,
    config: dict[str, Any] | None, serialized: str | None, error: type[Exception], says: str,
) -> None:
    if config is not None and "compile_cache" in config["handler"]["fastload"]:
        (model_dir / "model.safetensors").write_bytes((example_weights / "model.safetensors").read_bytes())
    handler = FastloadHandler()
    with pytest.raises(error) as raised:
        handler.initialize(make_context(config, serialized=serialized))
    assert says in str(raised.value)
    assert "secret" not in str(raised.value)
    errors = _errors(caplog)
    assert len(errors) == 1
    assert errors[0] == f"fastload: model 'tiny' cannot start: {raised.value}"
    assert not handler.initialized


def test_the_model_file_must_define_one_module_class(
    make_context: MakeContext, model_dir: Path, example_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (model_dir / "model.safetensors").write_bytes((example_weights / "model.safetensors").read_bytes())
    source = (model_dir / "model.py").read_text()
    (model_dir / "model.py").write_text(source + "\n\nclass Helper:\n    pass\n")
    with pytest.raises(ArchiveError, match="exactly one class, the model; it defines Helper, TinyClassifier"):
        FastloadHandler().initialize(make_context(serialized="model.safetensors"))
    assert len(_errors(caplog)) == 1


@pytest.mark.s3
def test_an_unreachable_endpoint_fails_fast(
    make_context: MakeContext, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fastload_devservices._process import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("FASTLOAD_S3_MAX_ATTEMPTS", "2")
    with pytest.raises(WeightsUnavailableError, match="cannot reach the S3 endpoint"):
        FastloadHandler().initialize(make_context({"handler": {"fastload": {"uri": "s3://models/tiny/"}}}))
    assert len(_errors(caplog)) == 1


@pytest.mark.s3
def test_a_fetch_slower_than_startup_timeout_fails_with_fastloads_message(
    make_context: MakeContext, example_weights: Path, s3: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s3.upload_file(str(example_weights / "model.safetensors"), BUCKET, "slow/model.safetensors")
    proxy = FaultProxy(s3_server.port)
    proxy.delay = 3.0  # each ranged GET answers after 3 s; the weights get 0.9 × 2 s
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint_url)
    try:
        config = {"startupTimeout": 2, "handler": {"fastload": {"uri": f"s3://{BUCKET}/slow/"}}}
        with pytest.raises(WeightsUnavailableError, match=r"not fetched within 2s, 90% of startupTimeout \(2s\)"):
            FastloadHandler().initialize(make_context(config))
        assert len(_errors(caplog)) == 1
    finally:
        proxy.close()


@pytest.mark.gpu
def test_a_gpu_worker_loads_onto_its_device(
    make_context: MakeContext, model_dir: Path, example_weights: Path
) -> None:
    """MockContext passes gpu_id 0 where CUDA exists; the weights go through the pinned pipeline to cuda:0."""
    (model_dir / "model.safetensors").write_bytes((example_weights / "model.safetensors").read_bytes())
    handler = FastloadHandler()
    handler.initialize(make_context(serialized="model.safetensors"))
    assert handler.device == torch.device("cuda", 0)
    assert handler.load_report is not None and handler.load_report.strategy == "cuda-pipeline"
    assert all(p.device == torch.device("cuda", 0) for p in handler.model.parameters())
    assert torch.allclose(_outputs(handler), reference_outputs(example_weights, INPUTS), atol=1e-5)


@pytest.mark.parametrize(
    ("gpu_id", "gpu_count", "expected"),
    [
        (None, 2, torch.device("cpu")),  # TorchServe passes no gpu_id to CPU workers
        (1, 0, torch.device("cpu")),  # a gpu_id but no GPU visible to this worker
        (0, 1, torch.device("cuda", 0)),
        (1, 2, torch.device("cuda", 1)),  # TorchServe's counter starts at 1
        (3, 2, torch.device("cuda", 1)),  # number_of_gpu above what this worker sees: wrap
        ("2", 4, torch.device("cuda", 2)),
    ],
)
def test_worker_device(gpu_id: Any, gpu_count: int, expected: torch.device) -> None:
    assert worker_device(gpu_id, gpu_count=gpu_count) == expected


@pytest.mark.parametrize("gpu_id", ["gpu1", -1])
def test_a_bad_gpu_id_is_named(gpu_id: Any) -> None:
    with pytest.raises(HandlerConfigError, match="gpu_id"):
        worker_device(gpu_id, gpu_count=2)


def test_within_returns_raises_or_times_out() -> None:
    assert within(5, lambda: 42) == 42
    with pytest.raises(KeyError):
        within(5, lambda: {}["missing"])
    never_set = threading.Event()
    with pytest.raises(TimeoutError):
        within(0.1, lambda: never_set.wait(10))


def test_pt2_compiles_through_the_compile_cache(
    make_context: MakeContext, model_dir: Path, example_weights: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pt2.compile goes through fastload's compile cache at handler.fastload.compile_cache (the eager
    backend keeps this fast; the cache's hits across processes are tests/compile_cache's)."""
    from fastload_core import report_of

    monkeypatch.delenv("FASTLOAD_COMPILE_CACHE", raising=False)  # restored after the test
    (model_dir / "model.safetensors").write_bytes((example_weights / "model.safetensors").read_bytes())
    cache = (tmp_path / "compile-cache").as_uri()
    config = {"pt2": {"compile": {"enable": True, "backend": "eager"}},
              "handler": {"fastload": {"compile_cache": cache}}}
    context = make_context(config, serialized="model.safetensors")

    class Warmed(FastloadHandler):
        def example_inputs(self) -> Any:
            return INPUTS

    handler = Warmed()
    handler.initialize(context)
    report = report_of(handler.model)
    assert report is not None and report.cache_url == cache  # compiled at start-up, through the cache
    assert report.fields["model"].endswith("TinyClassifier")
    assert os.environ["FASTLOAD_COMPILE_CACHE"] == cache  # inherited by inductor's compile workers
    assert context.model_yaml_config["pt2"]["compile"]["enable"] is True  # the config is left as it was
    assert torch.equal(_outputs(handler), reference_outputs(example_weights, INPUTS))


def test_without_example_inputs_the_first_request_compiles(
    make_context: MakeContext, model_dir: Path, example_weights: Path, tmp_path: Path,
) -> None:
    from fastload_core import report_of

    (model_dir / "model.safetensors").write_bytes((example_weights / "model.safetensors").read_bytes())
    config = {"pt2": "eager"}  # the deprecated form; the default compile cache
    handler = FastloadHandler()
    handler.initialize(make_context(config, serialized="model.safetensors"))
    assert report_of(handler.model) is None
    assert torch.equal(_outputs(handler), reference_outputs(example_weights, INPUTS))
    assert report_of(handler.model) is not None


@pytest.mark.parametrize("warm_at_start", [False, True], ids=["compiled-at-first-request", "compiled-at-start-up"])
def test_pt2_leaves_the_weights_ordinary_tensors(
    make_context: MakeContext, model_dir: Path, example_weights: Path, warm_at_start: bool,
) -> None:
    """Only the compile and its warm-up run under inference_mode: weights loaded inside it would be inference
    tensors, which backward (Captum's explain_handle) and in-place updates under no_grad refuse."""
    (model_dir / "model.safetensors").write_bytes((example_weights / "model.safetensors").read_bytes())

    class Warmed(FastloadHandler):
        def example_inputs(self) -> Any:
            return INPUTS if warm_at_start else None

    handler = Warmed()
    handler.initialize(make_context({"pt2": "eager"}, serialized="model.safetensors"))
    model = handler.model
    assert model is not None
    assert not any(p.is_inference() for p in model.parameters())
    inputs = INPUTS.clone().requires_grad_()
    model(inputs).sum().backward()  # as Captum's attributions do
    assert inputs.grad is not None and all(p.grad is not None for p in model.parameters())
    assert torch.equal(_outputs(handler), reference_outputs(example_weights, INPUTS))
