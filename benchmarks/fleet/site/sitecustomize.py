"""Loaded by every Python process of a fleet node (the harness puts this folder on PYTHONPATH): when
FLEET_SHARED_BUCKETS is set, fastload's reads of the shared mount are paced, whichever process makes
them (a plain replica, or ``bentoml serve``'s parent prefetching before its workers start)."""

import os

if os.environ.get("FLEET_SHARED_BUCKETS") and os.environ.get("FASTLOAD_SHARED_DIR"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from throttle import buckets_from, throttle_shared_reads

    throttle_shared_reads(os.environ["FASTLOAD_SHARED_DIR"], buckets_from(os.environ["FLEET_SHARED_BUCKETS"]))
