"""load_model: a ready module, built without random init, equal to the stock path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

import fastload_core
from fastload_core.errors import DeviceError, StateDictMismatchError
from fastload_core.report import LoadReport


class TinyLM(nn.Module):
    """Tied embedding/head, a norm with persistent buffers, and a non-persistent rotary table."""

    init_devices: ClassVar[list[str]] = []

    def __init__(self, vocab: int = 32, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        inv_freq = 1.0 / (10000 ** (torch.arange(0, width, 2).float() / width))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        TinyLM.init_devices.append(self.block[0].weight.device.type)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens).mean(1)
        hidden = self.norm(hidden + self.block(hidden)) * self.inv_freq.repeat(2)
        return self.head(hidden)


@pytest.fixture
def trained(tmp_path: Path) -> tuple[TinyLM, Path]:
    torch.manual_seed(0)
    model = TinyLM().eval()
    model.norm.running_mean.uniform_()  # a persistent buffer that must come from the checkpoint
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))  # drops the tied duplicate, as HF checkpoints do
    return model, path


TOKENS = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options", [{}, {"copy": True}, {"lazy": True}], ids=["mmap", "copy", "lazy"])
def test_class_factory_and_instance_give_the_same_outputs(
    trained: tuple[TinyLM, Path], options: dict[str, bool]
) -> None:
    reference, path = trained
    expected = reference(TOKENS)
    for spec in (TinyLM, lambda: TinyLM(vocab=32), TinyLM()):
        model = fastload_core.load_model(spec, path, **options).eval()
        assert torch.equal(model(TOKENS), expected)
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_parameters_are_built_on_meta_without_random_init(trained: tuple[TinyLM, Path]) -> None:
    TinyLM.init_devices.clear()
    fastload_core.load_model(TinyLM, trained[1])
    assert TinyLM.init_devices == ["meta"]


def test_tied_weights_stay_one_parameter(trained: tuple[TinyLM, Path], tmp_path: Path) -> None:
    model = fastload_core.load_model(TinyLM, trained[1])
    assert model.head.weight is model.embed.weight
    assert len(list(model.parameters())) == len(list(trained[0].parameters()))
    both = tmp_path / "both.safetensors"  # a checkpoint that stores both names, as torch.save would
    save_file({k: v.clone() for k, v in trained[0].state_dict().items()}, both)
    from_both = fastload_core.load_model(TinyLM, both)
    assert from_both.head.weight is from_both.embed.weight


def test_non_persistent_buffer_is_computed_not_loaded(trained: tuple[TinyLM, Path]) -> None:
    model = fastload_core.load_model(TinyLM, trained[1])
    assert torch.equal(model.inv_freq, trained[0].inv_freq)
    assert torch.equal(model.norm.running_mean, trained[0].norm.running_mean)


def test_strict_names_missing_unexpected_and_mismatched_keys(trained: tuple[TinyLM, Path], tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in trained[0].state_dict().items() if k != "head.weight"}
    del state["block.2.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["block.0.bias"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(StateDictMismatchError) as info:
        fastload_core.load_model(TinyLM, path)
    error = info.value
    assert error.missing == ["block.2.bias"]
    assert error.unexpected == ["extra.weight"]
    assert error.mismatched == [("block.0.bias", (64,), (3,))]
    assert "strict=False" in str(error)


def test_non_strict_initialises_what_is_missing(trained: tuple[TinyLM, Path], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    state = {k: v.clone() for k, v in trained[0].state_dict().items() if not k.startswith("block.2.")}
    state["extra"] = torch.zeros(1)
    path = tmp_path / "partial.safetensors"
    save_file(state, path)
    model = fastload_core.load_model(TinyLM, path, strict=False)
    assert torch.equal(model.block[0].weight, trained[0].block[0].weight)
    fresh = model.block[2].weight
    assert not fresh.is_meta and fresh.abs().sum() > 0  # Linear.reset_parameters ran
    assert fresh.abs().max() <= 1 / math.sqrt(fresh.shape[1])
    assert "block.2.weight" in caplog.text


def test_the_model_comes_back_in_eval_mode(trained: tuple[TinyLM, Path]) -> None:
    model = fastload_core.load_model(TinyLM().train(), trained[1])
    assert not any(module.training for module in model.modules())


def test_dtype_and_report(trained: tuple[TinyLM, Path]) -> None:
    report = LoadReport(source="", device="")
    model = fastload_core.load_model(TinyLM, trained[1], dtype=torch.bfloat16, report=report)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.norm.num_batches_tracked.dtype == torch.int64
    assert {"build", "read", "assign"} <= set(report.stages)
    assert report.tensors == len(trained[0].state_dict()) - 1  # the tied head is not stored


def test_from_a_legacy_pickle(trained: tuple[TinyLM, Path], tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(trained[0].state_dict(), path)
    model = fastload_core.load_model(TinyLM, tmp_path).eval()
    assert torch.equal(model(TOKENS), trained[0](TOKENS))
    assert model.head.weight is model.embed.weight


def test_factory_must_build_a_module(trained: tuple[TinyLM, Path]) -> None:
    with pytest.raises(TypeError, match=r"not a torch\.nn\.Module"):
        fastload_core.load_model(lambda: object(), trained[1])  # type: ignore[arg-type, return-value]


class InitHeavy(nn.Module):
    """Initialisers on parameters (skipped on meta) and on a real buffer (must still run)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 4))
        nn.init.normal_(self.weight)
        self.register_buffer("scale", nn.init.ones_(torch.empty(4)), persistent=False)


def test_initialisers_skip_meta_parameters_but_not_real_buffers(tmp_path: Path) -> None:
    originals = {name: getattr(nn.init, name) for name in ("normal_", "ones_")}
    weight = torch.randn(4, 4)
    save_file({"weight": weight}, tmp_path / "m.safetensors")
    model = fastload_core.load_model(InitHeavy, tmp_path / "m.safetensors")
    assert torch.equal(model.weight, weight)
    assert torch.equal(model.scale, torch.ones(4))
    assert all(getattr(nn.init, name) is function for name, function in originals.items())  # restored


@pytest.mark.slow
def test_load_model_compiles_through_the_cache(trained: tuple[TinyLM, Path], tmp_path: Path) -> None:
    """A real inductor compile at start-up: stored in the cache, same outputs as eager."""
    from fastload_core.compile_cache import list_entries

    url = f"file://{tmp_path / 'compile-cache'}"
    report = LoadReport(source="", device="")
    with torch.inference_mode():
        model = fastload_core.load_model(
            TinyLM, trained[1], compile=True, compile_cache=url, example_inputs=TOKENS, report=report
        )
        compiled = fastload_core.report_of(model)
        torch.testing.assert_close(model(TOKENS), trained[0](TOKENS))
    assert compiled is not None and compiled.status == "miss" and compiled.stored
    assert "compile" in report.stages
    assert [entry.key for entry in list_entries(url)] == [compiled.key]


def test_load_model_async_loads_off_the_event_loop(trained: tuple[TinyLM, Path]) -> None:
    """The load runs in a worker thread: the loop keeps running other coroutines while it works, and the
    result equals ``load_model``'s."""
    import asyncio
    import threading

    reference, path = trained
    loop_thread: list[int] = []
    build_threads: list[int] = []

    def build() -> TinyLM:
        build_threads.append(threading.get_ident())
        return TinyLM()

    async def main() -> TinyLM:
        loop_thread.append(threading.get_ident())
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        report = LoadReport(source=str(path), device="cpu")
        model = await fastload_core.load_model_async(build, path, "cpu", report=report)
        assert report.tensors > 0
        ticker.cancel()
        assert ticks > 0  # the loop kept turning during the load
        return model

    model = asyncio.run(main())
    assert build_threads and build_threads[0] != loop_thread[0]
    torch.testing.assert_close(model(TOKENS), reference(TOKENS), rtol=0, atol=0)


def test_load_model_async_raises_load_model_errors(trained: tuple[TinyLM, Path], tmp_path: Path) -> None:
    import asyncio

    _, path = trained
    class Wider(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(StateDictMismatchError, match=r"missing keys.*extra\.weight"):
        asyncio.run(fastload_core.load_model_async(Wider, path))


def test_a_device_this_machine_lacks_is_a_fastload_error(tmp_path: Path) -> None:
    """Not torch's bare RuntimeError from a pinned allocation: a DeviceError, before anything is read."""
    save_file(nn.Linear(2, 2).state_dict(), tmp_path / "m.safetensors")
    beyond = f"cuda:{torch.cuda.device_count() + 7}"  # past the visible GPUs, on any machine
    with pytest.raises(DeviceError, match="CUDA"):
        fastload_core.load_model(nn.Linear(2, 2), tmp_path / "m.safetensors", beyond)
    with pytest.raises(DeviceError, match="not a torch device"):
        fastload_core.load_file(tmp_path / "m.safetensors", "gpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available") as raised:
            fastload_core.load_model(nn.Linear(2, 2), tmp_path / "m.safetensors", "cuda:0")
        assert isinstance(raised.value, fastload_core.FastloadError) and raised.value.device == "cuda:0"
        with pytest.raises(DeviceError):
            fastload_core.load_file(tmp_path / "m.safetensors", 0)


def test_overlapping_loads_on_two_threads_leave_no_module_on_meta(tmp_path: Path) -> None:
    """A Ray replica's live swap and a multiplexed load build models on two threads at once: their builds
    overlap (A starts, B starts, A ends, B ends), and a thread building a module meanwhile gets real weights."""
    import threading

    path = tmp_path / "linear.safetensors"
    save_model(nn.Linear(4, 4), str(path))
    a_building, b_building, a_done = threading.Event(), threading.Event(), threading.Event()
    seen_meanwhile: list[torch.device] = []

    def build_a() -> nn.Module:
        a_building.set()
        assert b_building.wait(10)
        return nn.Linear(4, 4)

    def build_b() -> nn.Module:
        b_building.set()
        assert a_done.wait(10)  # A's load ends while B is still building
        seen_meanwhile.append(nn.Linear(2, 2).weight.device)  # the load thread's own modules are meta...
        return nn.Linear(4, 4)

    def load_a() -> None:
        fastload_core.load_model(build_a, path)
        a_done.set()

    threads = [threading.Thread(target=load_a), threading.Thread(target=fastload_core.load_model, args=(build_b, path))]
    threads[0].start()
    assert a_building.wait(10)
    threads[1].start()
    assert b_building.wait(10)
    elsewhere = nn.Linear(2, 2)  # ...but this thread's are not, while both loads build
    for thread in threads:
        thread.join(30)
    assert elsewhere.weight.device.type == "cpu" and seen_meanwhile == [torch.device("meta")]
    assert nn.Linear(2, 2).weight.device.type == "cpu", "a load left later modules on meta"
    assert nn.init.normal_(torch.empty(3)).isfinite().all()


class _Grown(nn.Module):
    """A checkpoint's two layers, the second now a different shape, and a head the checkpoint lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("given", ["class", "instance"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_keys_the_checkpoint_did_not_fill_are_real_and_in_the_loaded_dtype(
    tmp_path: Path, given: str, dtype: torch.dtype | None
) -> None:
    path = tmp_path / "old.safetensors"
    old = nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 3))
    save_file({f"body.{name}": tensor for name, tensor in old.state_dict().items()}, str(path))
    model = fastload_core.load_model(_Grown if given == "class" else _Grown(), path, dtype=dtype, strict=False)
    kinds = {name: (p.device.type, p.dtype) for name, p in model.named_parameters()}
    assert set(kinds.values()) == {("cpu", dtype or torch.float32)}, kinds  # body.1 mis-shaped, head missing
    assert model(torch.ones(1, 4, dtype=dtype or torch.float32)).shape == (1, 2)
    torch.testing.assert_close(model.body[0].weight, old[0].weight.to(dtype or torch.float32))


def test_a_mis_shaped_key_alone_is_not_left_on_meta(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    save_model(nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 3)), str(path))
    model = fastload_core.load_model(lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), path, strict=False)
    assert not any(p.is_meta for p in model.parameters())
    assert model(torch.ones(1, 4)).shape == (1, 2)


def test_a_buffer_computed_at_build_time_takes_the_loaded_dtype(tmp_path: Path) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
            self.register_buffer("positions", torch.arange(4), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.scale

    path = tmp_path / "scaled.safetensors"
    save_model(Scaled(), str(path))
    model = fastload_core.load_model(Scaled, path, dtype=torch.bfloat16)
    assert model.scale.dtype == torch.bfloat16 and model.positions.dtype == torch.int64
    assert model(torch.ones(1, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
