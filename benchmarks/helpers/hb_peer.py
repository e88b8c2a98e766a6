"""Peer of the SIGUSR1 heartbeat: the least a Python process can do to answer a signal.

usage: hb_peer.py REDIS_URL KEY
Blocks SIGUSR1 and SIGTERM, waits for them with sigwait, and on each SIGUSR1 replaces
the hash KEY (DEL, HSET of heartbeat-like fields, EXPIRE) in one MULTI/EXEC with
redis-py: the same round trip baqup-run's heartbeat makes, with nothing around it.
"""

import datetime
import json
import os
import signal
import sys

import redis


def beat(client: "redis.Redis[bytes]", key: str, sequence: int) -> None:
    fields = {
        "type": "heartbeat",
        "job_id": "00000000-0000-4000-8000-000000000000",
        "agent_id": "peer",
        "agent": "peer",
        "role": "snapshot",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "state": "running",
        "intent": json.dumps(None),
        "sequence": json.dumps(sequence),
    }
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping=fields)
    pipe.expire(key, 1800)
    pipe.execute()


def main() -> None:
    url, key = sys.argv[1], sys.argv[2]
    client = redis.Redis.from_url(url)
    wanted = {signal.SIGUSR1, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    sequence = 1
    beat(client, key, sequence)
    while signal.sigwait(wanted) == signal.SIGUSR1:
        sequence += 1
        beat(client, key, sequence)
    client.close()
    os._exit(0)


if __name__ == "__main__":
    main()
