"""What a compiled artifact depends on, reduced to one key.

A restored artifact that does not fit the process is worse than none: inductor may reject it (and we
paid the download for nothing) or, for the parts it does not re-check, run code built for another
machine. So the key names everything that changes generated code: the torch build, Triton, Python,
the device (GPU name and capability; CPU instruction set and thread count, which inductor bakes into
its C++ kernels), the compile options, the model's code, structure (which module sits where, with
its settings such as ``eps``) and parameter layout, the warm-up inputs' shapes and grad mode, and a
user-supplied extra. It deliberately leaves out host names and paths, so two replicas of one model on
the same kind of node share an entry.

Every field is kept in readable form next to the digest: the packed entry records them, so a listing
can say what an entry is for and a restore can refuse an entry whose recorded fields disagree.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import importlib.metadata
import inspect
import json
import marshal
import os
import platform
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Bumped when the packed layout or the meaning of a field changes; old entries then simply miss.
FORMAT_VERSION = 1

# Variables that steer inductor or dynamo change generated code; these ones only move files around or
# change how many workers build it, so they must not split replicas into different entries.
_ENV_PREFIXES = ("TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE_", "TRITON_")
_ENV_IGNORED = frozenset(
    {"TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_COMPILE_THREADS", "TRITON_CACHE_DIR", "TRITON_HOME"}
)
# ``<object at 0x7f...>`` in a repr differs between processes; kept, it would give every replica its own key.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# What every ``nn.Module`` keeps in ``__dict__`` for torch's own bookkeeping: tensors and submodules are
# covered by the layout and by the module list, hooks are described separately (their ids are counters).
_MODULE_BOOKKEEPING = frozenset(vars(torch.nn.Module()))


@dataclass(frozen=True)
class CompileKey:
    """The key an entry is stored under, and the readable fields it was derived from."""

    digest: str
    fields: Mapping[str, str]

    def __str__(self) -> str:
        return self.digest


def key_from_fields(fields: Mapping[str, str]) -> CompileKey:
    """Hash the fields canonically; equal fields give equal keys in any process on any host."""
    canonical = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:40]
    return CompileKey(digest=f"v{FORMAT_VERSION}-{digest}", fields=dict(fields))


def derive_key(
    model: Callable[..., Any],
    *,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    compile_kwargs: Mapping[str, Any],
    extra: str = "",
    more_inputs: Sequence[tuple[tuple[Any, ...], Mapping[str, Any]]] = (),
    serve: str = "",
) -> CompileKey:
    """The key for compiling ``model`` with ``compile_kwargs`` and first calling it with these inputs
    (then with each of ``more_inputs``: the graphs those calls compile are part of the same entry).
    ``serve`` names a path other than torch.compile's (``aoti-package``), whose entries hold other
    artifacts; left empty, the key is what it was before that path existed."""
    device = _device_of(model, args, kwargs)
    fields: dict[str, str] = {
        "format": str(FORMAT_VERSION),
        **environment_fields(device),
        "compile_options": _digest(_canonical(dict(compile_kwargs))),
        "compile_env": _digest(_canonical(_compile_env())),
        "model": _qualname(type(model) if isinstance(model, torch.nn.Module) else model),
        "model_code": code_digest(model),
        "model_layout": layout_digest(model) if isinstance(model, torch.nn.Module) else "-",
        "model_structure": structure_digest(model) if isinstance(model, torch.nn.Module) else "-",
        "inputs": _inputs_digest([(args, kwargs), *more_inputs]),
        "grad_mode": f"grad={torch.is_grad_enabled()},inference={torch.is_inference_mode_enabled()}",
        "extra": extra,
    }
    if serve:
        fields["serve"] = serve
    if _freezing(compile_kwargs) and isinstance(model, torch.nn.Module):
        # Freezing folds weights into the generated code as constants, so the values matter too.
        fields["weights"] = weights_digest(model)
    return key_from_fields(fields)


def _inputs_digest(calls: Sequence[tuple[tuple[Any, ...], Mapping[str, Any]]]) -> str:
    """One digest per primed call, joined; a single call hashes exactly as before ``more_inputs`` existed."""
    return "+".join(
        _digest(_canonical([_signature(a) for a in args])
                + _canonical({name: _signature(value) for name, value in kwargs.items()}))
        for args, kwargs in calls
    )


def environment_fields(device: torch.device) -> dict[str, str]:
    """The software and hardware facts an artifact built on this process's device depends on."""
    fields = {
        "torch": torch.__version__,
        "torch_git": str(getattr(torch.version, "git_version", "")),
        "torch_cuda": str(torch.version.cuda),
        "torch_hip": str(getattr(torch.version, "hip", None)),
        "triton": triton_version(),
        "python": f"{sys.implementation.name}-{platform.python_version()}",
        "arch": f"{sys.platform}-{platform.machine()}",
        "device": device.type,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        fields["device_name"] = torch.cuda.get_device_name(index)
        fields["device_capability"] = f"sm_{major}{minor}"
    elif device.type == "cpu":
        fields["cpu_isa"] = torch.backends.cpu.get_cpu_capability()
        fields["threads"] = str(torch.get_num_threads())
    return fields


def code_digest(model: Callable[..., Any]) -> str:
    """A digest of the code that runs: the source files of the model's own classes or function.

    Whole files are hashed rather than single classes because ``forward`` usually calls helpers defined
    next to it; an unrelated edit in the same file costs one recompile, a missed edit would cost a
    wrong artifact. Classes that ship with torch are covered by the torch build and named only.
    """
    if isinstance(model, torch.nn.Module):
        objects: list[Any] = sorted({type(m) for m in model.modules()}, key=_qualname)
    else:
        objects = [inspect.unwrap(model)]
    parts = []
    for obj in objects:
        module = getattr(obj, "__module__", "") or ""
        if module == "torch" or module.startswith("torch."):
            parts.append(_qualname(obj))
        else:
            parts.append(f"{_qualname(obj)}:{_source_digest(obj)}")
    return _digest("\n".join(parts))


def layout_digest(model: torch.nn.Module) -> str:
    """Names, shapes, dtypes and devices of parameters and buffers, and which submodules train.

    Values are left out on purpose: replicas that load different fine-tunes of one architecture
    compile to the same code (unless freezing is on, see ``weights_digest``).
    """
    lines = [
        f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device.type}:{t.requires_grad}:{_strides(t)}"
        for name, t in _named_tensors(model)
    ]
    lines += [f"{name}:training={m.training}" for name, m in model.named_modules()]
    return _digest("\n".join(lines))


def structure_digest(model: torch.nn.Module) -> str:
    """Which module sits where, in order, with each one's non-tensor settings and hooks.

    The code digest hashes the set of module classes and the layout only tensors, yet swapping a ReLU
    and a GELU, or changing ``eps``, ``negative_slope`` or ``approximate``, changes the computation
    without touching either; an AOTInductor package restored under such a key runs the other model's
    code unchecked. So every module contributes its qualified name, class, ``extra_repr()`` and plain
    attributes (what dynamo and ``torch.export`` bake into the graph as constants). Objects are described
    by their type and addresses are stripped, so identical models give identical keys in any process.
    Strings count as they are: a module that keeps a host's path in an attribute gets a key per host.
    """
    lines = []
    for name, module in model.named_modules():
        settings = {attribute: _setting(value) for attribute, value in vars(module).items()
                    if attribute not in _MODULE_BOOKKEEPING}
        hooks = {attribute: [_qualname(hook) for hook in value.values()]
                 for attribute, value in vars(module).items()
                 if attribute in _MODULE_BOOKKEEPING and attribute.endswith("hooks") and value}
        line = f"{name}:{_qualname(type(module))}:{module.extra_repr()}:{_canonical(settings)}:{_canonical(hooks)}"
        lines.append(_ADDRESS.sub("", line))
    return _digest("\n".join(lines))


def _setting(value: Any) -> Any:
    """A module attribute as the key sees it: plain values exactly, anything else by its kind alone."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return f"{_qualname(type(value))}.{value.name}"
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_setting(item) for item in value]]
    if isinstance(value, dict):
        return {str(key): _setting(item) for key, item in value.items()}
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return str(value)
    if isinstance(value, torch.Tensor):  # a tensor attribute that is neither parameter nor buffer
        return _signature(value)
    if isinstance(value, functools.partial):  # partial(F.gelu, approximate="tanh"): its arguments count
        return ["partial", _setting(value.func), _setting(list(value.args)), _setting(dict(value.keywords))]
    if callable(value):
        return _qualname(value)
    return _qualname(type(value))


def weights_digest(model: torch.nn.Module) -> str:
    """Hash of parameter and buffer values, needed only when inductor folds them into the code."""
    h = hashlib.sha256()
    for name, tensor in _named_tensors(model):
        h.update(name.encode())
        flat = tensor.detach().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:32]


def _strides(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.stride())) if tensor.layout == torch.strided else str(tensor.layout)


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _device_of(model: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.device:
    for value in _flatten([*args, *kwargs.values()]):
        if isinstance(value, torch.Tensor):
            return value.device
    if isinstance(model, torch.nn.Module):
        for _, tensor in _named_tensors(model):
            return tensor.device
    return torch.device("cpu")


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value


def _signature(value: Any) -> Any:
    """What dynamo specialises on: tensor metadata, and the values of plain Python scalars."""
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), str(value.dtype), value.device.type, value.requires_grad,
                _strides(value)]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_signature(v) for v in value]]
    if isinstance(value, dict):
        return ["dict", {str(k): _signature(v) for k, v in value.items()}]
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    return [_qualname(type(value))]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_describe)


def _describe(value: Any) -> str:
    """Stable text for options json cannot encode; addresses (``at 0x...``) would split replicas."""
    if callable(value):
        return _qualname(value)
    return f"{_qualname(type(value))}:{value!s}"


def _compile_env() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name.startswith(_ENV_PREFIXES) and name not in _ENV_IGNORED
    }


def _freezing(compile_kwargs: Mapping[str, Any]) -> bool:
    options = compile_kwargs.get("options") or {}
    if "freezing" in options:
        return bool(options["freezing"])
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)


def triton_version() -> str:
    for distribution in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return f"{distribution}-{importlib.metadata.version(distribution)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def _source_digest(obj: Any) -> str:
    if hasattr(obj, "__code__"):
        codes = [obj.__code__]
    elif isinstance(obj, type):
        codes = [member.__code__ for member in vars(obj).values() if hasattr(member, "__code__")]
    else:
        codes = []
    try:
        path = inspect.getsourcefile(obj)
    except (TypeError, OSError):  # e.g. a class whose module is not in sys.modules
        path = None
    for candidate in [path, *(code.co_filename for code in codes)]:
        if candidate and os.path.isfile(candidate):
            with open(candidate, "rb") as file:
                return _digest(file.read())
    # No file (``python -c``, a notebook cell): hash the bytecode instead, which is as specific.
    return _digest(b"".join(marshal.dumps(code) for code in codes)) if codes else "unknown"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:32]
