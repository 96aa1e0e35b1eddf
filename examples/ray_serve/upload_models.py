"""Put the example's demo weights on an S3 endpoint: the embedder (a new S3 version on every run with a
new --seed) and N small adapters. Prints what it wrote as JSON, the embedder's VersionId included, for
``user_config["fastload"]["revision"]``.

    python examples/ray_serve/upload_models.py --endpoint-url http://127.0.0.1:9000 [--bucket models]
        [--seed 0] [--adapters 8]

Credentials come from the usual AWS variables (any value for a local test server).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `examples.`


def weights(module: Any) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.contiguous() for name, tensor in module.state_dict().items()})




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint-url", required=True, help="S3 endpoint, e.g. http://127.0.0.1:9000")
    parser.add_argument("--bucket", default="models")
    parser.add_argument("--seed", type=int, default=0, help="the embedder's weights (a new seed: a new version)")
    parser.add_argument("--adapters", type=int, default=8, help="how many adapters a0, a1, ... (0: none)")
    args = parser.parse_args(argv)
    if args.adapters < 0:
        parser.error("--adapters cannot be negative")

    import boto3  # imported after the arguments are checked: a usage error should not wait for torch
    import torch
    from botocore.exceptions import BotoCoreError, ClientError

    from examples.ray_serve.models import WIDTH, Adapter, Embedder

    try:
        client = boto3.client("s3", endpoint_url=args.endpoint_url)
    except ValueError as exc:  # botocore checks the URL's form here (a missing scheme), before any request
        parser.error(f"--endpoint-url {args.endpoint_url!r}: {exc}; write a URL, e.g. http://127.0.0.1:9000")
    try:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if args.bucket not in existing:
            client.create_bucket(Bucket=args.bucket)
        client.put_bucket_versioning(Bucket=args.bucket, VersioningConfiguration={"Status": "Enabled"})
        torch.manual_seed(args.seed)
        put = client.put_object(Bucket=args.bucket, Key="embedder/model.safetensors", Body=weights(Embedder()))
        written: dict[str, Any] = {
            "embedder": {"uri": f"s3://{args.bucket}/embedder/model.safetensors", "revision": put.get("VersionId")},
            "adapters": [],
        }
        for index in range(args.adapters):
            key = f"adapters/a{index}/model.safetensors"
            torch.manual_seed(1000 + index)
            client.put_object(Bucket=args.bucket, Key=key, Body=weights(Adapter()))
            written["adapters"].append(f"a{index}")
    except (BotoCoreError, ClientError) as exc:
        print(f"upload_models: cannot write to s3://{args.bucket} at {args.endpoint_url}: {exc}. Is the server "
              "running, and are AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY set?", file=sys.stderr)
        return 1
    written["width"] = WIDTH
    print(json.dumps(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
