"""``fastload convert``, ``fastload inspect`` and ``fastload plugins``."""

from __future__ import annotations

import argparse
import functools
import os
import shutil
from pathlib import Path

from .. import plugins
from .._atomic import publish_file
from ..errors import CheckpointError
from .api import _is_safetensors
from .formats import convert, find_format
from .header import DTYPE_NAMES, read_header


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    convert = subparsers.add_parser(
        "convert", help="convert a torch.save checkpoint to safetensors (weights_only)",
        description="Reads a pickled checkpoint with weights_only=True (nothing in it is executed) and writes "
        "it as safetensors, atomically. The output is readable by whoever can read the input.",
    )
    convert.add_argument("source", type=Path, help="a .bin/.pt/.pth checkpoint (or any registered format)")
    convert.add_argument("target", type=Path,
                         help="the .safetensors file to write, or a directory to write SOURCE.safetensors into")
    convert.set_defaults(func=_convert)

    inspect = subparsers.add_parser("inspect", help="show a safetensors file's tensors and metadata")
    inspect.add_argument("path", type=Path, help="a .safetensors file")
    inspect.set_defaults(func=_inspect)

    listing = subparsers.add_parser("plugins", help="list loaded plugins and the hooks each implements")
    listing.set_defaults(func=_plugins)


def _convert(args: argparse.Namespace) -> int:
    source: Path = args.source
    target: Path = args.target
    _require_file(source)
    if target.is_dir():
        target = target / f"{source.stem}.safetensors"
        if target.is_dir():
            raise CheckpointError(target, "is a directory; name the output file")
    if target.exists() and os.path.samefile(source, target):
        raise CheckpointError(target, f"is the input file {source} itself; converting in place would overwrite "
                                      "the checkpoint: name another output file")
    if _is_safetensors(source):
        header = read_header(source)  # a valid file, or one clear error
        publish_file(target, functools.partial(shutil.copyfile, source), readable_like=source)
        print(f"{source} is already safetensors ({len(header.tensors)} tensors): no conversion needed; "
              f"copied it to {target}")
        return 0
    state = convert(source, target)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {target}: {len(state)} tensors, {nbytes / 1e9:.3f} GB (read with weights_only=True)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    _require_file(args.path)
    if not _is_safetensors(args.path) and (fmt := find_format(args.path)) is not None:
        raise CheckpointError(args.path, f"is a {fmt.name} checkpoint, not safetensors; `fastload convert "
                                         f"{args.path} OUT.safetensors` converts it")
    header = read_header(args.path)
    print(f"{args.path}: {len(header.tensors)} tensors, {header.data_bytes / 1e9:.3f} GB of data")
    if header.metadata:
        for key, value in sorted(header.metadata.items()):
            print(f"  metadata {key} = {value}")
    for entry in header.tensors:
        print(f"  {entry.name:<60} {DTYPE_NAMES[entry.dtype]:<8} {list(entry.shape)}")
    return 0


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(path, "is a directory; name one checkpoint file")
    if not path.exists():
        raise CheckpointError(path, "does not exist")
    if not path.is_file():
        raise CheckpointError(path, "is not a regular file")


def _plugins(args: argparse.Namespace) -> int:
    for info in plugins.plugin_infos():
        print(f"{info.name}  ({info.source})")
        for hook in info.hooks:
            print(f"    {hook}")
    return 0
