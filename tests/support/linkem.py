"""A link with delay and loss in user space, where the kernel has no netem (tests only).

    ip netns exec SWITCH python linkem.py IF_A IF_B --delay 0.05 --loss 0.01

Forwards every Ethernet frame arriving on IF_A out of IF_B and back, each held `delay`
seconds and dropped with probability `loss`, independently per direction: what
`tc qdisc add ... netem delay 50ms loss 1%` does on both ends of a link. tests/netns.py
splices it between a host's cable and the switch when `tc netem` is unavailable (some
kernels are built without sch_netem). Packet sockets with PACKET_VNET_HDR carry the
offload header, so segmentation-offloaded frames (up to 64 KiB) pass as they came.
Runs until SIGTERM; prints "ready" once both sockets are bound and, at the end,
"forwarded=N dropped=M" (frames, both directions).
"""

from __future__ import annotations

import argparse
import heapq
import random
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
FRAME_MAX = 65536 + 64  # a GSO frame plus the virtio-net header


def bind(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    a, b = bind(args.a), bind(args.b)
    peer = {a: b, b: a}
    due: list[tuple[float, int, socket.socket, bytes]] = []  # (send at, order, out, frame)
    order = forwarded = dropped = 0
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while not stopping:
        wait = max(0.0, due[0][0] - time.monotonic()) if due else 0.5
        try:
            readable, _, _ = select.select([a, b], [], [], wait)
        except InterruptedError:
            continue
        for sock in readable:
            while True:
                try:
                    frame, addr = sock.recvfrom(FRAME_MAX)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:  # our own sends, seen on the way out
                    continue
                if rng.random() < args.loss:
                    dropped += 1
                    continue
                order += 1
                heapq.heappush(due, (time.monotonic() + args.delay, order, peer[sock], frame))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, frame = heapq.heappop(due)
            try:
                out.send(frame)
                forwarded += 1
            except OSError:
                dropped += 1  # the link is being taken apart, or the frame was refused
    print(f"forwarded={forwarded} dropped={dropped}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
