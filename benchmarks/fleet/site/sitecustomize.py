"""Loaded by every Python process of a fleet node (the harness puts this folder on PYTHONPATH): when
FLEET_SHARED_BUCKETS is set, fastload's reads of the shared mount are paced, whichever process makes
them (a plain replica, or ``bentoml serve``'s parent prefetching before its workers start); when
FLEET_PEER_UPLINKS is set (``ADDRESS=PATH=RATE,...``), so are its fills from a peer's RAM, on this node's
network (FLEET_NODE_BUCKET) and the serving node's uplink."""

import os

if os.environ.get("FLEET_SHARED_BUCKETS") and os.environ.get("FASTLOAD_SHARED_DIR"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from throttle import buckets_from, throttle_shared_reads

    throttle_shared_reads(os.environ["FASTLOAD_SHARED_DIR"], buckets_from(os.environ["FLEET_SHARED_BUCKETS"]))

if os.environ.get("FLEET_PEER_UPLINKS") and os.environ.get("FLEET_NODE_BUCKET"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from throttle import buckets_from, throttle_peer_reads

    uplinks = {}
    for item in os.environ["FLEET_PEER_UPLINKS"].split(","):
        address, spec = item.split("=", 1)
        uplinks[address] = buckets_from(spec)[0]
    throttle_peer_reads(buckets_from(os.environ["FLEET_NODE_BUCKET"]), uplinks)
