"""Synthetic transformer-like checkpoints for the load benchmark, and the module that matches them.

Real checkpoints mix a few very large tensors (embeddings, output head) with many mid-sized ones
(attention and MLP projections) and hundreds of tiny ones (norms, biases). Loaders behave
differently on each — per-tensor overhead dominates the tiny ones, bandwidth the large ones — so a
benchmark on one big tensor would flatter everybody. The shapes here follow a GPT-style decoder,
scaled so the file lands within one embedding row of the requested size.

The checkpoint is written twice, as safetensors and as a pickled ``torch.save`` state dict, from the
same tensors, so every method reads the same bytes. ``SyntheticTransformer(config)`` has exactly the
checkpoint's keys and shapes, which makes the "model ready" scenario (build + load) an honest
comparison between ``Model()`` + ``load_state_dict(torch.load(...))`` and ``load_model``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .._atomic import publish_file

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 1 << 30
_HIDDEN_CHOICES = (2048, 1024, 512, 256, 128, 64, 32, 16)
_EMBEDDING_SHARE = 0.12  # of the file: embeddings + head, about what a 1B-parameter decoder has


@dataclass(frozen=True)
class TransformerConfig:
    """Shapes of the synthetic decoder; ``for_size`` picks them for a target file size."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    dtype: str = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    @property
    def layer_elements(self) -> int:
        h, i = self.hidden, self.intermediate
        attention = 4 * (h * h + h)  # q, k, v, o weights and biases
        mlp = h * i + i + i * h + h  # up and down, weights and biases
        norms = 2 * 2 * h  # attention and MLP LayerNorm, weight and bias
        return attention + mlp + norms

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data: what every method must end up with resident."""
        elements = 2 * self.vocab * self.hidden + self.layers * self.layer_elements + 2 * self.hidden
        return elements * self.itemsize

    @property
    def tensor_count(self) -> int:
        return 2 + 16 * self.layers + 2

    @classmethod
    def for_size(cls, nbytes: int, dtype: str = "bf16") -> TransformerConfig:
        """The widest decoder that still has at least ~14 layers, its vocabulary filling the rest.

        Width shrinks with size so that a tiny test checkpoint keeps the same *shape* of problem (many
        tensors of mixed sizes) as the 2 GiB one instead of degenerating into one embedding.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}; synthetic checkpoints are bf16 or fp16")
        itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
        for hidden in _HIDDEN_CHOICES:
            probe = cls(vocab=1, hidden=hidden, intermediate=4 * hidden, layers=1, dtype=dtype)
            layer_bytes = probe.layer_elements * itemsize
            if 16 * layer_bytes <= nbytes or hidden == _HIDDEN_CHOICES[-1]:
                break
        layers = max(1, int(nbytes * (1 - _EMBEDDING_SHARE)) // layer_bytes)
        remaining = nbytes - layers * layer_bytes - 2 * hidden * itemsize
        vocab = max(1, remaining // (2 * hidden * itemsize))
        return cls(vocab=vocab, hidden=hidden, intermediate=4 * hidden, layers=layers, dtype=dtype)


class Block(nn.Module):
    """Pre-norm decoder block: causal attention and a GELU MLP, with biases.

    The one transformer block of the project: the synthetic checkpoints stack it (single-head, bf16,
    sized by ``TransformerConfig``), and the compile-cache tests and ``benchmarks/bench_compile.py``
    compile it alone (multi-head, float32, a few dozen features), so that what is measured and what
    is tested is the same code. ``heads=1`` keeps the single-head form the checkpoints were written
    with: same parameter names and shapes, same forward.
    """

    def __init__(self, hidden: int, intermediate: int, *, heads: int = 1, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if heads < 1 or hidden % heads:
            raise ValueError(f"hidden size {hidden} does not split into {heads} heads")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(hidden, dtype=dtype)
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, dtype=dtype) for _ in range(4))
        self.mlp_norm = nn.LayerNorm(hidden, dtype=dtype)
        self.up = nn.Linear(hidden, intermediate, dtype=dtype)
        self.down = nn.Linear(intermediate, hidden, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn_norm(x)
        q, k, v = self.q(y), self.k(y), self.v(y)
        if self.heads == 1:
            attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # (batch, tokens, hidden) -> (batch, heads, tokens, hidden / heads) and back
            b, t, d = x.shape
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            attended = attended.transpose(1, 2).reshape(b, t, d)
        x = x + self.o(attended)
        return x + self.down(nn.functional.gelu(self.up(self.mlp_norm(x))))


class SyntheticTransformer(nn.Module):
    """The module whose state dict is exactly the synthetic checkpoint.

    ``positions`` is a non-persistent buffer computed in ``__init__`` (like rotary frequencies in
    real models): it is not in the checkpoint, so it also checks that a loader leaves such buffers
    alone.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        dtype = config.torch_dtype
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden, dtype=dtype)
        self.layers = nn.ModuleList(
            Block(config.hidden, config.intermediate, dtype=dtype) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.hidden, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False, dtype=dtype)
        scale = torch.arange(config.hidden, dtype=torch.float32) / config.hidden
        self.register_buffer("positions", (1.0 / 10000**scale).to(config.torch_dtype), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


@dataclass(frozen=True)
class Checkpoint:
    """One synthetic checkpoint on disk: the same tensors as safetensors and as a pickle."""

    config: TransformerConfig
    safetensors: Path
    pickle: Path

    @property
    def nbytes(self) -> int:
        return self.config.nbytes

    def copy_to(self, directory: Path) -> Checkpoint:
        """The same checkpoint in ``directory`` (e.g. /dev/shm for the warm scenario), copied if absent."""
        directory.mkdir(parents=True, exist_ok=True)
        copies = []
        for source in (self.safetensors, self.pickle):
            target = directory / source.name
            if not source.exists():  # written without its pickle (a GPU-only run needs none)
                copies.append(target)
                continue
            if not (target.exists() and target.stat().st_size == source.stat().st_size):
                publish_file(target, functools.partial(shutil.copyfile, source))
            copies.append(target)
        return Checkpoint(self.config, copies[0], copies[1])

    def remove(self) -> None:
        for path in (self.safetensors, self.pickle, _spec_path(self.safetensors)):
            path.unlink(missing_ok=True)


def synthetic_state_dict(config: TransformerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (N(0, 0.02), like a fresh init) with the keys and shapes of the module.

    The module is built on the meta device so only the shapes are computed, not a real init.
    Each tensor has its own generator (seeded from ``seed`` and its position), so the tensors are drawn
    in parallel threads (``normal_`` releases the GIL): a 4 GiB checkpoint is built in seconds on a
    many-core machine instead of a minute on one core, with the same bytes on every run.
    """
    with torch.device("meta"):
        template = SyntheticTransformer(config)
    shapes = [(name, meta.shape, meta.dtype) for name, meta in template.state_dict().items()]

    def draw(index: int) -> torch.Tensor:
        _, shape, dtype = shapes[index]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        tensors = list(pool.map(draw, range(len(shapes))))
    return {name: tensor for (name, _, _), tensor in zip(shapes, tensors, strict=True)}


def ensure_checkpoint(
    directory: Path, size_bytes: int, dtype: str = "bf16", seed: int = 0, *, pickle: bool = True
) -> Checkpoint:
    """Write the synthetic checkpoint for ``size_bytes`` into ``directory`` unless it is already there
    (the pickle only with ``pickle=True``: it doubles the time and the disk a large build needs).

    Files are written under temporary names, fsynced and renamed, so an interrupted run never leaves
    a torn checkpoint that a later run would reuse; fsync also leaves the pages clean, which the cold
    scenario needs to evict them.
    """
    checkpoint, spec = _planned(directory, size_bytes, dtype, seed)
    if existing_checkpoint(directory, size_bytes, dtype, seed, pickle=pickle) is not None:
        return checkpoint
    config = checkpoint.config
    spec_path = _spec_path(checkpoint.safetensors)
    directory.mkdir(parents=True, exist_ok=True)
    state = synthetic_state_dict(config, seed)
    metadata = {"fastload.bench.config": json.dumps(asdict(config))}
    if not checkpoint.safetensors.exists() or not (spec_path.exists() and json.loads(spec_path.read_text()) == spec):
        publish_file(checkpoint.safetensors, lambda path: save_file(state, str(path), metadata=metadata))
    if pickle:
        publish_file(checkpoint.pickle, lambda path: torch.save(state, path))
    spec_path.write_text(json.dumps(spec))
    return checkpoint


def existing_checkpoint(
    directory: Path, size_bytes: int, dtype: str = "bf16", seed: int = 0, *, pickle: bool = True
) -> Checkpoint | None:
    """The checkpoint ``ensure_checkpoint`` would reuse (with its pickle unless ``pickle=False``), or
    None when it would write one."""
    checkpoint, spec = _planned(directory, size_bytes, dtype, seed)
    spec_path = _spec_path(checkpoint.safetensors)
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec and _files_present(checkpoint, pickle):
        return checkpoint
    return None


def _planned(directory: Path, size_bytes: int, dtype: str, seed: int) -> tuple[Checkpoint, dict[str, object]]:
    config = TransformerConfig.for_size(size_bytes, dtype)
    stem = f"synthetic-{size_bytes / GIB:.4g}GiB-{dtype}-s{seed}"
    checkpoint = Checkpoint(config, directory / f"{stem}.safetensors", directory / f"{stem}.pt")
    return checkpoint, {"config": asdict(config), "seed": seed, "nbytes": config.nbytes}


def config_from_file(path: str | os.PathLike[str]) -> TransformerConfig:
    """The config a synthetic safetensors file was written with (kept in its header metadata)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if "fastload.bench.config" not in metadata:
        raise ValueError(f"{path} is not a synthetic benchmark checkpoint (no fastload.bench.config metadata)")
    return TransformerConfig(**json.loads(metadata["fastload.bench.config"]))


def _spec_path(safetensors_path: Path) -> Path:
    return safetensors_path.with_suffix(".json")


def _files_present(checkpoint: Checkpoint, pickle: bool) -> bool:
    return checkpoint.safetensors.exists() and (checkpoint.pickle.exists() or not pickle)


def describe(config: TransformerConfig) -> str:
    """One line for the report: shape and size of the synthetic model."""
    params = config.nbytes // config.itemsize
    return (
        f"{config.layers} layers, hidden {config.hidden}, MLP {config.intermediate}, vocab {config.vocab}, "
        f"{config.dtype}; {config.tensor_count} tensors, {params / 1e6:.0f}M parameters, "
        f"{config.nbytes / GIB:.3f} GiB ({config.nbytes / 1e9:.3f} GB)"
    )


__all__ = [
    "Block",
    "Checkpoint",
    "SyntheticTransformer",
    "TransformerConfig",
    "config_from_file",
    "describe",
    "ensure_checkpoint",
    "existing_checkpoint",
    "synthetic_state_dict",
]
