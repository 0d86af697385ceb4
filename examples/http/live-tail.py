"""Live tail of a Nexus pipeline over the gateway's WebSocket /v1/subscribe.

    python examples/http/live-tail.py --types 'email.*' [--from SEQ] [--url URL]

The token comes from NEXUS_TOKEN (`nexus tokens create NAME --subscribe 'email.*'`). Each
event is printed as one JSON line. On a dropped connection it reconnects with
from=<the last seq it printed>, so it misses nothing the journal still holds and prints
nothing twice; a gap (events removed by retention before it read them) is reported on
stderr. Needs aiohttp (a Nexus dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import aiohttp


async def tail(url: str, token: str, types: str, start: int | None, count: int) -> None:
    last, printed = start, 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        while True:
            query = {"types": types} | ({} if last is None else {"from": str(last)})
            try:
                async with http.ws_connect(url, params=query, heartbeat=30) as ws:
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        m = json.loads(msg.data)
                        if "gap" in m:
                            print(f"gap: events {m['gap']['from']}..{m['gap']['to']} are gone", file=sys.stderr)
                        if "error" in m:
                            print(f"server: {m['error']}", file=sys.stderr)
                        if "seq" not in m:
                            last = m.get("from", last)  # the start message: where the stream begins
                            continue
                        print(json.dumps(m), flush=True)
                        last, printed = m["seq"], printed + 1
                        if count and printed >= count:
                            return
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status in (400, 401, 403):
                    sys.exit(f"refused ({exc.status}): check the token and --types")
                print(f"handshake failed ({exc.status}); retrying", file=sys.stderr)
            except aiohttp.ClientError as exc:
                print(f"connection lost ({exc}); reconnecting from {last}", file=sys.stderr)
            await asyncio.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080/v1/subscribe")
    ap.add_argument("--types", default="*", help="type globs, comma separated")
    ap.add_argument("--from", dest="start", type=int, help="start after this seq (default: from now)")
    ap.add_argument("--count", type=int, default=0, help="stop after this many events (0: never)")
    args = ap.parse_args()
    token = os.environ.get("NEXUS_TOKEN", "")
    if not token:
        sys.exit("set NEXUS_TOKEN to a gateway token that may subscribe")
    try:
        asyncio.run(tail(args.url, token, args.types, args.start, args.count))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
