"""The gateway's bearer tokens (nexus/gateway/tokens.py): the file, hashing, the grant
model, and reloading while a store is in use (real files; a fake monotonic clock only
where the test is about the once-a-second stat)."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from structlog.testing import capture_logs

from nexus.gateway import tokens as tokens_mod
from nexus.gateway.tokens import TokenEntry, TokenGrant, TokenStore, editing, hash_token, new_token
from nexus.testing import wait_for


def _add(path: str, name: str, **grant) -> str:
    token = new_token()
    with editing(path) as entries:
        entries[name] = TokenEntry(hash=hash_token(token), created=tokens_mod.now_utc(), **grant)
    return token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(tokens_mod.time, "monotonic", c)
    return c


def test_tokens_are_random_and_stored_hashed_only(tmp_path):
    path = str(tmp_path / "data" / "gateway-tokens.yaml")
    token = _add(path, "parrot", sources=["parrot*"], types=["parrot.*"])
    other = _add(path, "mail", sources=["mail"], types=["mail.*"], subscribe=["mail.*"], rate=5)
    assert token != other and token.startswith("nxg_") and len(token) >= 4 + 43  # 32 bytes, base64
    text = open(path).read()
    assert token not in text and other not in text  # never in clear
    assert hash_token(token) in text and "created:" in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o700
    assert not [f for f in os.listdir(tmp_path / "data") if f.endswith(".tmp")]
    entries = tokens_mod.read(path)
    assert sorted(entries) == ["mail", "parrot"] and entries["mail"].rate == 5
    assert "hash" not in entries["mail"].describe("mail")


def test_authenticate(tmp_path):
    path = str(tmp_path / "tokens.yaml")
    token = _add(path, "parrot", sources=["parrot*"], types=["parrot.*"], rate=2.5)
    store = TokenStore(path)
    grant = store.authenticate(f"Bearer {token}")
    assert grant == TokenGrant("parrot", ("parrot*",), ("parrot.*",), (), 2.5)
    assert store.authenticate(f"bearer  {token} ") == grant  # the scheme is case-insensitive
    for bad in (
        None,
        "",
        token,
        f"Basic {token}",
        "Bearer ",
        f"Bearer {token}x",
        f"Bearer {token[:-1]}",
        "Bearer " + "a" * 10_000,
        f"Bearer {new_token()}",
    ):
        assert store.authenticate(bad) is None, bad
    assert store.status() == {"tokens": 1, "file": path, "problem": ""}


def test_grants_follow_the_curve_model():
    g = TokenGrant("p", sources=("parrot*", "desk"), types=("parrot.*",), subscribe=("mail.*", "parrot.seen"))
    assert g.may_send("parrot-win", "parrot.captured") and g.may_send("desk", "parrot.x")
    assert not g.may_send("mail", "parrot.captured")  # the source must match too
    assert not g.may_send("parrot", "mail.received")  # and the type
    assert g.may_read("mail.received") and g.may_read("parrot.seen") and not g.may_read("parrot.captured")
    nothing = TokenGrant("n")
    assert not nothing.may_send("a", "b") and not nothing.may_read("b")  # fail closed


def test_missing_file_means_no_tokens_then_a_created_one_works(tmp_path, clock):
    path = str(tmp_path / "tokens.yaml")
    store = TokenStore(path)
    assert store.authenticate("Bearer nxg_x") is None and store.status()["tokens"] == 0
    token = _add(path, "late", sources=["*"], types=["*"])
    # (the clock has not moved: a token it does not know makes it look at the file at
    # once, so a script's `nexus tokens create` then curl works)
    assert store.authenticate(f"Bearer {token}").name == "late"


def test_unknown_tokens_stat_the_file_but_reparse_it_only_when_changed(tmp_path, clock, monkeypatch):
    path = str(tmp_path / "tokens.yaml")
    token = _add(path, "a", sources=["*"], types=["*"])
    store = TokenStore(path)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(tokens_mod.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    reloads = store.reloads
    for _ in range(100):
        assert store.authenticate(f"Bearer {new_token()}") is None
    assert len(stats) == 100 and store.reloads == reloads  # a stat each, never a re-parse
    assert store.authenticate(f"Bearer {token}") is not None and len(stats) == 100  # a known one: none
    for bad in (None, "", "Basic x", "Bearer " + "a" * 10_000):
        assert store.authenticate(bad) is None
    assert len(stats) == 100  # not even a stat for what cannot be a token


def test_stat_at_most_once_a_second(tmp_path, clock, monkeypatch):
    path = str(tmp_path / "tokens.yaml")
    token = _add(path, "a", sources=["*"], types=["*"])
    store = TokenStore(path)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(tokens_mod.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    for _ in range(1000):
        assert store.authenticate(f"Bearer {token}") is not None
    assert stats == []  # read at construction; the next look is a second later
    clock.now += 1.0
    for _ in range(1000):
        store.authenticate(f"Bearer {token}")
    assert stats == [path]
    reloads = store.reloads
    clock.now += 1.0
    store.authenticate(f"Bearer {token}")
    assert store.reloads == reloads  # unchanged file: stat'ed, not re-parsed


def test_revoke_and_edits_are_seen_within_a_second_real_clock(tmp_path):
    path = str(tmp_path / "tokens.yaml")
    keep = _add(path, "keep", sources=["*"], types=["*"])
    gone = _add(path, "gone", sources=["*"], types=["*"])
    store = TokenStore(path)
    assert store.authenticate(f"Bearer {gone}").name == "gone"
    with editing(path) as entries:
        del entries["gone"]
        entries["keep"] = TokenEntry(hash=entries["keep"].hash, sources=["x"], types=["y"])
    wait_for(lambda: store.authenticate(f"Bearer {gone}") is None, timeout=5, message="the revoke")
    assert store.authenticate(f"Bearer {keep}").sources == ("x",)


def test_a_file_that_does_not_parse_keeps_the_tokens_and_logs_once(tmp_path, clock):
    path = str(tmp_path / "tokens.yaml")
    token = _add(path, "a", sources=["*"], types=["*"])
    store = TokenStore(path)
    good = open(path, "rb").read()
    with capture_logs() as logs:
        bad_name = f"tokens:\n  'b c': {{hash: 'sha256:{'0' * 64}'}}\n".encode()
        for broken in (b"tokens: [unclosed", b"tokens:\n  a: {hash: md5:abc}\n", bad_name):
            with open(path, "wb") as f:
                f.write(broken)
            for _ in range(3):
                clock.now += 1.0
                assert store.authenticate(f"Bearer {token}").name == "a"  # kept
    errors = [e for e in logs if e["event"] == "gateway_tokens_unusable"]
    assert len(errors) == 3, errors  # one line per broken version, not per look
    assert all("\n" not in e["reason"] and "kept the 1 tokens" in e["reason"] for e in errors)
    assert token not in str(logs)
    with open(path, "wb") as f:
        f.write(good)
    clock.now += 1.0
    assert store.authenticate(f"Bearer {token}").name == "a" and store.status()["problem"] == ""


def test_a_file_others_can_write_grants_nothing(tmp_path, clock):
    path = str(tmp_path / "tokens.yaml")
    token = _add(path, "a", sources=["*"], types=["*"])
    os.chmod(path, 0o622)
    store = TokenStore(path)
    assert store.authenticate(f"Bearer {token}") is None
    assert "only it can write" in store.status()["problem"]
    os.chmod(path, 0o600)  # the fix alone (no change of content) is seen
    clock.now += 1.0
    assert store.authenticate(f"Bearer {token}").name == "a"


def test_concurrent_edits_lose_nothing(tmp_path):
    path = str(tmp_path / "tokens.yaml")
    names = [f"t{i}" for i in range(16)]
    threads = [threading.Thread(target=_add, args=(path, n)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(tokens_mod.read(path)) == sorted(names)
