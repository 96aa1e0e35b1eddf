"""``fastload doctor --serve URL``: is a ``fastload serve`` endpoint up, and does it accept this node's serve
credentials? One signed request for a peer key that cannot exist: ``404 NoSuchKey`` means reachable, signed
correctly and really fastload; ``403`` means the credentials differ from the server's."""

from __future__ import annotations

import os

from ..storage.peers import ACCESS_KEY_VARIABLE, PEER_BUCKET, SECRET_KEY_VARIABLE

URL_VARIABLE = "FASTLOAD_SERVE_URL"


def check_endpoint(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    key, secret = os.environ.get(ACCESS_KEY_VARIABLE), os.environ.get(SECRET_KEY_VARIABLE)
    if not key or not secret:
        return False, f"set {ACCESS_KEY_VARIABLE} and {SECRET_KEY_VARIABLE} to check it"
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.session.Session().client(
        "s3", endpoint_url=url, aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1",
        config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1},
                      s3={"addressing_style": "path"}))
    try:
        client.get_object(Bucket=PEER_BUCKET, Key="doctor-probe/0/meta.json")
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code", "")
        if status == 404 and code == "NoSuchKey":
            return True, "answers and accepts this node's serve credentials"
        if status == 403:
            return False, f"refused the signature ({code}): {ACCESS_KEY_VARIABLE}/{SECRET_KEY_VARIABLE} differ " \
                          "from the server's, or the clocks differ by more than 15 minutes"
        return False, f"answered {status} {code}: not a fastload serve endpoint?"
    except BotoCoreError as exc:
        return False, f"unreachable: {exc}"
    finally:
        client.close()
    return False, "answered a probe that should not exist: not a fastload serve endpoint?"
