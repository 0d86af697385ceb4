"""A producer host for multi-host tests: sends confirmed events, records what was ACKed.

    python sender.py ENDPOINT --total N --acked FILE [--chunk 100] [--pace 0.05]
                     [--source S] [--flush-timeout 120]

After each flush the ids just ACKed are appended to FILE (one per line, fsynced), so
the test reads what was ACKed even if this process is killed. Exit 0 when all were
ACKed; 1 with one line on stderr when a flush failed (then FILE holds what was ACKed
before the failure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from nexus import Producer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--acked", required=True)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--pace", type=float, default=0.0)  # seconds between chunks: the load's rate
    ap.add_argument("--source", default="netns")
    ap.add_argument("--keys", type=int, default=64)
    ap.add_argument("--flush-timeout", type=float, default=120.0)
    args = ap.parse_args()
    with open(args.acked, "a") as acked:
        try:
            with Producer(args.endpoint, source=args.source, ack_timeout=1.0) as producer:
                pending: list[str] = []
                for i in range(args.total):
                    pending.append(producer.send("test.item", {"i": i}, key=f"k{i % args.keys}"))
                    if len(pending) >= args.chunk or i == args.total - 1:
                        producer.flush(args.flush_timeout)
                        acked.write("".join(f"{e}\n" for e in pending))
                        acked.flush()
                        os.fsync(acked.fileno())
                        pending = []
                        if args.pace:
                            time.sleep(args.pace)  # pacing the load, not synchronizing
        except Exception as exc:
            print(f"sender: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
