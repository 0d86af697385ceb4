"""The gateway's bearer-token check (nexus.gateway.tokens.TokenStore.authenticate): one
call per HTTP request, with 1, 10 and 100 tokens in the file, a good and a bad token;
next to a reference that compares the hash with every stored one (hmac.compare_digest,
no early exit), the first version."""

from __future__ import annotations

import hmac

import pytest

from nexus.gateway import tokens as tokens_mod
from nexus.gateway.tokens import TokenEntry, TokenStore, hash_token, new_token

CALLS = 10_000  # per round


class LoopStore(TokenStore):
    """Reference: a constant-time compare against every stored hash."""

    def authenticate(self, authorization):
        super().authenticate(None)  # the file check, as the real one does
        scheme, _, token = (authorization or "").strip().partition(" ")
        digest = hash_token(token.strip())
        found = None
        for stored, grant in self._by_hash.items():
            if hmac.compare_digest(stored, digest):
                found = grant
        return found


@pytest.fixture(
    params=[(TokenStore, 1), (TokenStore, 10), (TokenStore, 100), (LoopStore, 1), (LoopStore, 100)],
    ids=lambda p: f"{p[0].__name__}-{p[1]}tokens",
)
def store(request, tmp_path):
    cls, n = request.param
    path = str(tmp_path / "tokens.yaml")
    tokens = [new_token() for _ in range(n)]
    entries = {f"t{i}": TokenEntry(hash=hash_token(t), sources=["*"], types=["*"]) for i, t in enumerate(tokens)}
    tokens_mod.write(path, entries)
    return cls(path), tokens[-1]


@pytest.mark.parametrize("good", [True, False], ids=["good", "bad"])
def test_authenticate(benchmark, store, good):
    s, token = store
    header = f"Bearer {token if good else new_token()}"

    def run():
        for _ in range(CALLS):
            s.authenticate(header)

    benchmark(run)
    assert (s.authenticate(header) is not None) is good
    benchmark.extra_info["per_call_ns"] = benchmark.stats.stats.mean / CALLS * 1e9
