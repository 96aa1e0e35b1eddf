"""``fastload convert``, ``fastload inspect`` and ``fastload plugins``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import plugins
from ..errors import CheckpointError
from .formats import convert
from .header import DTYPE_NAMES, read_header


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    convert = subparsers.add_parser("convert", help="convert a torch.save checkpoint to safetensors (weights_only)")
    convert.add_argument("source", type=Path, help="a .bin/.pt/.pth checkpoint (or any registered format)")
    convert.add_argument("target", type=Path, help="the .safetensors file to write")
    convert.set_defaults(func=_convert)

    inspect = subparsers.add_parser("inspect", help="show a safetensors file's tensors and metadata")
    inspect.add_argument("path", type=Path)
    inspect.set_defaults(func=_inspect)

    listing = subparsers.add_parser("plugins", help="list loaded plugins and the hooks each implements")
    listing.set_defaults(func=_plugins)


def _convert(args: argparse.Namespace) -> int:
    source: Path = args.source
    if not source.is_file():
        raise CheckpointError(source, "does not exist or is not a file")
    args.target.parent.mkdir(parents=True, exist_ok=True)
    state = convert(source, args.target)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {args.target}: {len(state)} tensors, {nbytes / 1e9:.3f} GB (read with weights_only=True)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    header = read_header(args.path)
    print(f"{args.path}: {len(header.tensors)} tensors, {header.data_bytes / 1e9:.3f} GB of data")
    if header.metadata:
        for key, value in sorted(header.metadata.items()):
            print(f"  metadata {key} = {value}")
    for entry in header.tensors:
        print(f"  {entry.name:<60} {DTYPE_NAMES[entry.dtype]:<8} {list(entry.shape)}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    for info in plugins.plugin_infos():
        print(f"{info.name}  ({info.source})")
        for hook in info.hooks:
            print(f"    {hook}")
    return 0
