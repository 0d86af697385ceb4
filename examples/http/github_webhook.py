"""A webhook receiver for a SaaS source: GitHub-style webhooks -> Nexus events.

    GITHUB_SECRET=... NEXUS_TOKEN=nxg_... python examples/http/github_webhook.py --port 9000

It checks the webhook's HMAC (X-Hub-Signature-256), maps it to an event
`github.<X-GitHub-Event>` (e.g. github.push) with source `github:<repository>`, the
delivery id (X-GitHub-Delivery) as the event id, and posts it to the gateway. GitHub
redelivers a webhook with the same delivery id: the gateway answers `duplicate` and
journals it once. The webhook gets 2xx only once the event is journaled, so a failed
delivery is retried by GitHub, not lost. Allow the types untyped (contracts_untyped:
["github.*"]) or register contracts for them; the token needs --sources 'github:*'
--types 'github.*'.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re

import aiohttp
from aiohttp import web


def to_event(kind: str, delivery: str, body: dict) -> dict:
    repo = (body.get("repository") or {}).get("full_name", "unknown")
    return {
        "type": "github." + re.sub(r"[^a-z0-9_]", "_", kind.lower()),
        "source": f"github:{repo}"[:128],
        "id": delivery[:64],
        "key": repo,  # one repository's webhooks in order
        "payload": {"action": body.get("action"), "sender": (body.get("sender") or {}).get("login"), "body": body},
    }


def make_app(gateway: str, token: str, secret: bytes) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        raw = await request.read()
        want = "sha256=" + hmac.new(secret, raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, request.headers.get("X-Hub-Signature-256", "")):
            return web.json_response({"error": "bad signature"}, status=401)
        kind, delivery = request.headers.get("X-GitHub-Event", "unknown"), request.headers["X-GitHub-Delivery"]
        event = to_event(kind, delivery, json.loads(raw))
        async with request.app["session"].post(f"{gateway}/v1/events", json=event) as resp:
            answer = await resp.json()
        # 200: journaled; 207: the router rejected it (say why, do not ask GitHub to retry)
        status = 200 if resp.status in (200, 207) else 502
        return web.json_response(answer, status=status)

    async def session(app: web.Application):
        app["session"] = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
        yield
        await app["session"].close()

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/github", receive)
    app.cleanup_ctx.append(session)
    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", default="http://127.0.0.1:8080")
    ap.add_argument("--port", type=int, default=9000)
    args = ap.parse_args()
    web.run_app(make_app(args.gateway, os.environ["NEXUS_TOKEN"], os.environ["GITHUB_SECRET"].encode()), port=args.port)
