"""SigV4 checks for ``fastload serve``: every request must be signed with the operator's serve credentials.

The signature is recomputed with botocore's own signer (``S3SigV4Auth``: canonical request, string to
sign, signing key), fed with exactly the headers the client says it signed, so the server agrees with
every client botocore agrees with and no SigV4 crypto is written here. Only header signatures are
accepted (no presigned query strings, no anonymous access); the request time must be within the
15 minutes S3 allows, so a captured request cannot be replayed for long.
"""

from __future__ import annotations

import datetime
import hmac
import re
from dataclasses import dataclass

MAX_SKEW = datetime.timedelta(minutes=15)
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/,\s]+)/s3/aws4_request"
    r"\s*,\s*SignedHeaders=(?P<signed>[a-z0-9;\-]+)\s*,\s*Signature=(?P<signature>[0-9a-f]{64})\s*$")


class Denied(Exception):
    """The request is not signed with the serve credentials; the message says why (it goes to the debug
    log, the client gets S3's generic AccessDenied or SignatureDoesNotMatch)."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        super().__init__(reason)


@dataclass(frozen=True)
class ServeCredentials:
    access_key: str
    secret_key: str

    def check(self, method: str, raw_path: str, query: str, headers: dict[str, str],
              now: datetime.datetime | None = None) -> None:
        """Raise ``Denied`` unless the request carries a valid signature by these credentials. ``headers``
        have lower-case names; ``raw_path`` and ``query`` are as sent (still percent-encoded)."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        match = _AUTHORIZATION.match(headers.get("authorization", ""))
        if match is None:
            raise Denied("AccessDenied", "no SigV4 Authorization header (unsigned or presigned request)")
        if not hmac.compare_digest(match["key"].encode(), self.access_key.encode()):
            raise Denied("InvalidAccessKeyId", "unknown access key")
        stamp = headers.get("x-amz-date", "")
        try:
            when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            raise Denied("AccessDenied", f"bad or missing X-Amz-Date {stamp!r}") from None
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if abs(now - when) > MAX_SKEW or stamp[:8] != match["date"]:
            raise Denied("RequestTimeTooSkewed", f"request time {stamp} is too far from now")
        signed = match["signed"].split(";")
        if "host" not in signed or "x-amz-content-sha256" not in signed:
            raise Denied("AccessDenied", "the signature must cover host and x-amz-content-sha256")
        if any(name not in headers for name in signed):
            raise Denied("AccessDenied", "a signed header is missing from the request")
        request = AWSRequest(method=method, url=f"http://{headers['host']}{raw_path}" + (f"?{query}" if query else ""),
                             headers={name: headers[name] for name in signed})
        request.context["timestamp"] = stamp
        signer = S3SigV4Auth(Credentials(self.access_key, self.secret_key), "s3", match["region"])
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected, match["signature"]):
            raise Denied("SignatureDoesNotMatch", "signature does not match")
