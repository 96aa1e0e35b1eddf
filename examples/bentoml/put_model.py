"""Write the demo model and put it where the service reads it: an S3 prefix or a local directory.

    python put_model.py s3://models/demo-mlp/              # boto3's usual settings (AWS_ENDPOINT_URL, keys)
    python put_model.py s3://models/demo-mlp/ --endpoint-url http://127.0.0.1:9000 --create-bucket
    python put_model.py /tmp/demo-mlp/                      # a local path: serve with DEMO_WEIGHTS=/tmp/demo-mlp/
    python put_model.py s3://models/big/ --width 4096 --layers 32 --pickle-to s3://models/big-stock/   # 2 GiB

Prints the model's size in bytes. ``--pickle-to`` also writes the same weights as ``model.pt``
(``torch.save`` of the state dict, the file a stock service ``torch.load``s) to a second place; not
beside the safetensors file, since fastload fetches everything under a prefix.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import torch
from demo_model import PICKLE_NAME, WEIGHTS_NAME, make
from safetensors.torch import save_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="s3://bucket/prefix/ or a local directory")
    parser.add_argument("--width", type=int, default=64, help="layer width (default 64)")
    parser.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--pickle-to", metavar="TARGET",
                        help=f"also write the weights as {PICKLE_NAME} (for a stock service) to this target")
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: boto3's, e.g. AWS_ENDPOINT_URL_S3)")
    parser.add_argument("--create-bucket", action="store_true", help="create the bucket if it is missing")
    args = parser.parse_args(argv)
    if args.width < 1 or args.layers < 1:
        parser.error("--width and --layers must be at least 1")
    targets = [_target(parser, args.target)]
    if args.pickle_to:
        targets.append(_target(parser, args.pickle_to))
    with tempfile.TemporaryDirectory() as scratch:
        nbytes = _write(Path(scratch), args.width, args.layers, args.seed, bool(args.pickle_to))
        for (target, text), files in zip(targets, ([WEIGHTS_NAME], [PICKLE_NAME]), strict=False):
            if target.scheme == "s3":
                error = _upload(Path(scratch), files, target.netloc, target.path.strip("/"), args)
                if error:
                    print(f"put_model: {error}", file=sys.stderr)
                    return 1
            else:
                destination = Path(target.path if target.scheme == "file" else text)
                destination.mkdir(parents=True, exist_ok=True)
                for name in files:
                    (Path(scratch) / name).replace(destination / name)
                    (destination / name).chmod(0o644)
    print(nbytes)
    return 0


def _target(parser: argparse.ArgumentParser, text: str) -> tuple[SplitResult, str]:
    target = urlsplit(text)
    if target.scheme not in ("", "s3", "file"):
        parser.error(f"target {text!r}: expected s3://bucket/prefix/ or a local directory")
    if target.scheme == "s3" and not target.netloc:
        parser.error(f"target {text!r}: an s3:// target needs a bucket, as in s3://models/demo-mlp/")
    return target, text


def _write(scratch: Path, width: int, layers: int, seed: int, pickle: bool) -> int:
    model = make(width, layers, seed)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, scratch / WEIGHTS_NAME, metadata={"width": str(width), "layers": str(layers)})
    if pickle:
        torch.save(state, scratch / PICKLE_NAME)
    return sum(t.numel() * t.element_size() for t in state.values())


def _upload(scratch: Path, names: list[str], bucket: str, prefix: str, args: argparse.Namespace) -> str:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=args.endpoint_url)
    config = TransferConfig(multipart_chunksize=64 * 2**20, max_concurrency=8)
    try:
        if args.create_bucket:
            try:
                client.head_bucket(Bucket=bucket)
            except ClientError:
                client.create_bucket(Bucket=bucket)
        for name in names:
            key = f"{prefix}/{name}" if prefix else name
            client.upload_file(str(scratch / name), bucket, key, Config=config)
    except (BotoCoreError, ClientError) as exc:
        return f"cannot upload to s3://{bucket}/{prefix}: {exc}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
