"""Bearer tokens of the HTTP gateway: who may send what, and who may read what.

The file (`gateway.tokens_file`, default {data_dir}/gateway-tokens.yaml, 0600) holds one
entry per token name, written by `nexus tokens create|revoke` (nexus/cli/tokens.py):

    tokens:
      parrot:
        hash: sha256:<64 hex digits>   # of the token; the token itself is shown once, never stored
        sources: ["parrot*"]           # globs of the sources it may send as
        types: ["parrot.*"]            # globs of the types it may send
        subscribe: []                  # globs of the types it may read on /v1/subscribe
        rate: 0.0                      # events/s (0: no limit of its own)
        created: "2026-12-02T16:20:00Z"

The authorization model is that of the CURVE keys (nexus/protocol/gatekeeper.py): a send
is allowed when its source matches one of `sources` AND its type one of `types`.

`TokenStore` re-reads the file while the gateway runs (create and revoke take effect
within a second, no restart): `authenticate` stats it at most once a second, and at once
for a token it does not know (a token just created works at once), and re-parses it only
when its (mtime_ns, size, inode) changed. A file that does not parse keeps the
tokens read before (an editor's half-saved file must not lock every client out) and logs
one line; a missing file means no tokens (every request gets 401: fail closed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Annotated

import msgspec
import structlog
import yaml

from nexus.common import private

log = structlog.get_logger("nexus.gateway")

RECHECK_EVERY = 1.0  # seconds between two stats of the tokens file
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # as CURVE key names
TOKEN_PREFIX = "nxg_"  # says what a leaked string is (secret scanners, a reader of a log)
HASH_PREFIX = "sha256:"
_MAX_TOKEN = 256  # longer is not one of ours: not even hashed
# errors that say nothing about the tokens (out of fds, memory, an I/O hiccup): keep them
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EAGAIN, errno.EINTR}


class TokenGrant(msgspec.Struct, frozen=True):
    """What one token may do (the part of its entry the gateway needs)."""

    name: str
    sources: tuple[str, ...] = ()  # fnmatch globs of the sources it may send as
    types: tuple[str, ...] = ()  # fnmatch globs of the types it may send
    subscribe: tuple[str, ...] = ()  # globs of the types it may read on /v1/subscribe (() = none)
    rate: float = 0.0  # events/s this token may send (0: no token limit)

    def may_send(self, source: str, type_: str) -> bool:
        return any(fnmatchcase(source, g) for g in self.sources) and any(fnmatchcase(type_, g) for g in self.types)

    def may_read(self, type_: str) -> bool:
        return any(fnmatchcase(type_, g) for g in self.subscribe)


class TokenEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One token as the file holds it."""

    hash: Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
    sources: list[str] = []
    types: list[str] = []
    subscribe: list[str] = []
    rate: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    created: str = ""

    def grant(self, name: str) -> TokenGrant:
        return TokenGrant(name, tuple(self.sources), tuple(self.types), tuple(self.subscribe), self.rate)

    def describe(self, name: str) -> dict:
        """For `nexus tokens list`: never the hash."""
        return {
            "name": name,
            "sources": self.sources,
            "types": self.types,
            "subscribe": self.subscribe,
            "rate": self.rate,
            "created": self.created,
        }


class TokensFile(msgspec.Struct, forbid_unknown_fields=True):
    tokens: dict[str, TokenEntry] = {}


# -- tokens and their hashes -------------------------------------------------------------
def new_token() -> str:
    """32 random bytes from the OS's CSPRNG, URL-safe (it goes in a header)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # SHA-256, not a slow password hash (bcrypt, argon2): a token is 256 random bits, so
    # the file leaking gives nothing to brute-force (no dictionary, 2^256 guesses), and a
    # fast hash keeps authentication at about a microsecond per request
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


# -- the file ----------------------------------------------------------------------------
def parse(data: bytes) -> dict[str, TokenEntry]:
    """The entries of a tokens file; ValueError with a one-line reason."""
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        # the problem and where, not str(exc): that quotes the file's lines, hashes included
        problem = getattr(exc, "problem", None) or type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"not YAML: {problem}{where}") from None
    if raw is None:
        return {}  # an empty file: no tokens
    try:
        entries = msgspec.convert(raw, TokensFile).tokens
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    for name in entries:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"token name {name!r}: use 1-64 letters, digits, '.', '-', '_'")
    return entries


def read(path: str) -> dict[str, TokenEntry]:
    """The entries of the file at `path` ({} when it does not exist); ValueError or
    OSError otherwise."""
    try:
        with open(path, "rb") as f:
            return parse(f.read())
    except FileNotFoundError:
        return {}


def write(path: str, entries: dict[str, TokenEntry]) -> None:
    """Replace the file atomically (a reader sees the old file or the new, never half),
    0600 in a 0700 folder, durably."""
    directory = os.path.dirname(os.path.abspath(path))
    private.makedirs(directory)
    body = yaml.safe_dump(
        {"tokens": {name: msgspec.to_builtins(entries[name]) for name in sorted(entries)}}, sort_keys=False
    ).encode()
    tmp = f"{path}.tmp"
    try:
        with os.fdopen(private.create(tmp), "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def editing(path: str) -> Iterator[dict[str, TokenEntry]]:
    """Read-modify-write under an exclusive lock (two `nexus tokens create` at once
    must not drop one): yields the entries; written back when the block ends cleanly."""
    private.makedirs(os.path.dirname(os.path.abspath(path)))
    fd = private.create(f"{path}.lock", os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        entries = read(path)
        yield entries
        write(path, entries)
    finally:
        os.close(fd)  # releases the lock


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the gateway's view ------------------------------------------------------------------
class TokenStore:
    """The tokens of one file, re-read when it changes; `authenticate` per request."""

    def __init__(self, path: str):
        self.path = path
        self._by_hash: dict[str, TokenGrant] = {}
        self._hashes: dict[str, str] = {}  # name -> its stored hash
        self._signature: tuple | None = None  # (mtime_ns, size, inode, mode, uid) of what was read
        self._next_check = 0.0
        self._problem = ""  # the last one logged (one line per distinct problem)
        self.reloads = 0  # times the tokens were (re)read
        self._check()
        self._next_check = time.monotonic() + RECHECK_EVERY

    def authenticate(self, authorization: str | None) -> TokenGrant | None:
        """The grant of the `Authorization: Bearer <token>` header; None when it is
        missing, malformed or not a token of the file."""
        now = time.monotonic()
        checked = now >= self._next_check
        if checked:
            self._next_check = now + RECHECK_EVERY
            self._check()
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN:
            return None
        digest = hash_token(token)
        # looked up by its hash: the lookup's time depends only on the SHA-256 of what was
        # sent, and learning about digests gives no way to a token that has one (a
        # preimage), so it tells an attacker nothing; the one candidate is then compared
        # in constant time. About 0.7 us whatever the number of tokens; a compare_digest
        # loop over all of them took 8-15 us with 100 (bench/test_micro_tokens.py)
        grant = self._by_hash.get(digest)
        if grant is None and not checked and self._recheck_on_miss():
            grant = self._by_hash.get(digest)
        if grant is None or not hmac.compare_digest(self._hashes[grant.name], digest):
            return None
        return grant

    def _recheck_on_miss(self) -> bool:
        """An unknown token: look at the file now, not up to a second later, so a token used
        right after `nexus tokens create` works (a script that creates then sends). The cost
        is one stat (about a microsecond) per refused token; the file is re-parsed only when
        it changed. True when it was re-read."""
        reloads = self.reloads
        self._check()
        return self.reloads != reloads

    @property
    def names(self) -> list[str]:
        return sorted(g.name for g in self._by_hash.values())

    def status(self) -> dict:
        """For the gateway's status: counts and the file's problem, never a hash."""
        return {"tokens": len(self._by_hash), "file": self.path, "problem": self._problem}

    def _check(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._signature != ():
                self._signature = ()
                self._load({}, "")
            return
        except OSError as exc:
            self._report(f"cannot read {self.path}: {exc.strerror}")
            return
        # (the mode and owner too: a chmod that fixes an unsafe file takes effect)
        signature = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode, st.st_uid)
        if signature == self._signature:
            return
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            # anyone who can write it can mint a token: fail closed, as CURVE grants do
            self._signature = signature
            self._load({}, f"{self.path}: not a plain file of this user that only it can write: no tokens")
            return
        try:
            entries = read(self.path)
        except OSError as exc:
            if exc.errno not in _TRANSIENT:
                self._signature = signature
            self._report(f"cannot read {self.path}: {exc.strerror}; kept {len(self._by_hash)} tokens")
            return
        except ValueError as exc:
            self._signature = signature  # re-parsed when it changes again
            self._report(f"{self.path}: {exc}; kept the {len(self._by_hash)} tokens read before")
            return
        self._signature = signature
        self._load(entries, "")

    def _load(self, entries: dict[str, TokenEntry], problem: str) -> None:
        self._by_hash = {e.hash: e.grant(name) for name, e in entries.items()}
        self._hashes = {name: e.hash for name, e in entries.items()}
        self.reloads += 1
        self._report(problem)
        # `names`, not `tokens`: a key named like a secret is masked whole (common/redact.py),
        # and names are not secrets (the tokens and their hashes are, and are never logged)
        log.info("gateway_tokens_loaded", file=self.path, names=sorted(entries))

    def _report(self, problem: str) -> None:
        if problem and problem != self._problem:
            log.error("gateway_tokens_unusable", reason=problem)
        self._problem = problem
