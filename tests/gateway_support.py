"""Shared by the gateway's system tests: a launched pipeline with the gateway on a free
loopback port, a tokens file, and small real-client helpers (aiohttp, curl)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from conftest import recorder_group, write_config

from nexus.gateway.tokens import TokenEntry, hash_token, write
from nexus.testing import free_port, wait_for

API = yaml.safe_load((Path(__file__).parent.parent / "docs" / "http-api.yaml").read_text())

FULL = "nxg_test-full-token-0123456789abcdef"
NARROW = "nxg_test-narrow-token-0123456789abcd"
SLOW = "nxg_test-slow-token-0123456789abcdef"
READER = "nxg_test-reader-token-0123456789abcd"


def gateway_config(tmp: Path, **overrides) -> tuple[Path, str]:
    """(config path, base URL) of a pipeline with the gateway and a recorder group."""
    port = free_port()
    tokens = tmp / "tokens.yaml"
    write(
        str(tokens),
        {
            "full": TokenEntry(hash=hash_token(FULL), sources=["*"], types=["*"]),
            "narrow": TokenEntry(hash=hash_token(NARROW), sources=["parrot"], types=["test.narrow.*"]),
            # one event per 100 s: its bucket holds one, so a second request is always 429
            "slow": TokenEntry(hash=hash_token(SLOW), sources=["*"], types=["*"], rate=0.01),
            "reader": TokenEntry(hash=hash_token(READER), subscribe=["test.*"]),  # reads only
        },
    )
    gateway = {"listen": f"127.0.0.1:{port}", "tokens_file": str(tokens), **overrides.pop("gateway", {})}
    path = write_config(
        tmp,
        gateway=gateway,
        workers=overrides.pop("workers", {"rec": recorder_group(tmp / "out")}),
        **overrides,
    )
    return path, f"http://127.0.0.1:{port}"


def event(type_: str = "test.gw", **fields) -> dict:
    source, payload = fields.pop("source", "gwtest"), fields.pop("payload", {"n": 1})
    return {"type": type_, "source": source, "payload": payload, **fields}


def curl(url: str, body: bytes | str, token: str | None = FULL, content_type: str = "application/json", *extra: str):
    """(status, parsed JSON body) of one curl request."""
    cmd = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", url, "-H", f"Content-Type: {content_type}"]
    if token is not None:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    cmd += [*extra, "--data-binary", "@-"]
    data = body.encode() if isinstance(body, str) else body
    out = subprocess.run(cmd, input=data, capture_output=True, timeout=30, check=True).stdout.decode()
    text, _, code = out.rpartition("\n")
    return int(code), json.loads(text) if text else None


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_up(base: str, timeout: float = 30.0) -> None:
    """Until the gateway answers /healthz 200 (it starts once the router answers)."""
    wait_for(lambda: healthy(base), timeout, 0.05, f"gateway at {base} up")


def check_schema(name: str, message) -> None:
    """Raise unless a WebSocket message matches the document's schema `name` (OpenAPI has
    no WebSocket messages: they are documented as components)."""
    from openapi_schema_validator import OAS31Validator

    OAS31Validator({**API, "$ref": f"#/components/schemas/{name}"}).validate(message)


def check_api(path: str, method: str, code: int, body) -> None:
    """Raise unless `body` matches what docs/http-api.yaml documents for that route and code."""
    from openapi_schema_validator import OAS31Validator

    answer = API["paths"][path][method]["responses"][str(code)]
    if "$ref" in answer:
        answer = API["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    schema = answer["content"]["application/json"]["schema"]
    OAS31Validator({**API, **schema}).validate(body)  # (in the document: its $refs resolve)
