"""`nexus tokens`: create, list and revoke the HTTP gateway's bearer tokens.

They edit the tokens file (gateway.tokens_file, default {data_dir}/gateway-tokens.yaml;
nexus/gateway/tokens.py) and need no running pipeline: a running gateway re-reads the
file within a second. The token is printed once, by `create`, and stored only hashed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from nexus import config as config_mod
from nexus.errors import ConfigError, NexusError
from nexus.gateway import tokens as store


def _name(name: str) -> str:
    if not store.NAME_RE.fullmatch(name):
        raise ConfigError(f"token name {name!r}: use 1-64 letters, digits, '.', '-', '_'")
    return name


def _path(args) -> str:
    """--file, else the config's gateway.tokens_path."""
    if args.file:
        return args.file
    cfg = config_mod.load(args.config, args.env)
    return cfg.gateway.tokens_path(cfg)


def _globs(flag: str, values: list[str] | None) -> list[str]:
    values = values or []
    for v in values:
        if not v.strip():
            raise ConfigError(f"{flag}: an empty glob")
    return values


def cmd_create(args) -> int:
    name, path = _name(args.name), _path(args)
    sources, types = _globs("--sources", args.sources), _globs("--types", args.types)
    subscribe = _globs("--subscribe", args.subscribe)
    if bool(sources) != bool(types):
        raise ConfigError("--sources and --types go together (a send needs both its source and its type allowed)")
    if not sources and not subscribe:
        raise ConfigError(
            "a token needs --sources and --types (what it may send), --subscribe (what it may read), or both"
        )
    if not math.isfinite(args.rate) or args.rate < 0:
        raise ConfigError(f"--rate {args.rate:g}: events per second, 0 (no limit of its own) or more")
    token = store.new_token()
    entry = store.TokenEntry(
        hash=store.hash_token(token),
        sources=sources,
        types=types,
        subscribe=subscribe,
        rate=args.rate,
        created=store.now_utc(),
    )
    try:
        with store.editing(path) as entries:
            if name in entries:
                raise NexusError(f"{path}: a token named {name} exists already (revoke it, or choose another name)")
            entries[name] = entry
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc} (fix or remove the file)") from None
    except OSError as exc:
        raise NexusError(f"cannot write {path}: {exc.strerror}") from None
    print(token)  # stdout: the token alone, once (TOKEN=$(nexus tokens create ...))
    print(
        f"created token {name} in {path}: shown once, stored only hashed; "
        "send it as 'Authorization: Bearer <token>' (a running gateway takes it within a second)",
        file=sys.stderr,
    )
    return 0


def cmd_list(args) -> int:
    path = _path(args)
    try:
        entries = store.read(path)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise NexusError(f"cannot read {path}: {exc.strerror}") from None
    rows = [entries[name].describe(name) for name in sorted(entries)]
    if args.json:
        print(json.dumps({"file": path, "tokens": rows}, indent=2, sort_keys=True))
        return 0
    print(f"{'NAME':20} {'CREATED':21} {'RATE':6} GRANTS")
    for r in rows:
        grants = "; ".join(f"{k} {', '.join(r[k])}" for k in ("sources", "types", "subscribe") if r[k])
        print(f"{r['name']:20} {r['created'] or '-':21} {r['rate'] or '-':<6} {grants or '-'}")
    if not rows:
        print(f"(no tokens in {path})", file=sys.stderr)
    return 0


def cmd_revoke(args) -> int:
    name, path = _name(args.name), _path(args)
    try:
        with store.editing(path) as entries:
            if entries.pop(name, None) is None:
                raise NexusError(f"no token named {name} in {path}")
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc} (fix or remove the file)") from None
    except OSError as exc:
        raise NexusError(f"cannot write {path}: {exc.strerror}") from None
    print(f"revoked token {name}: a running gateway refuses it within a second")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("tokens", parents=[common], help="HTTP gateway bearer tokens: create | list | revoke")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    file_help = "the tokens file (default: gateway.tokens_file, else {data_dir}/gateway-tokens.yaml)"
    c = actions.add_parser("create", parents=[common], help="a new token; prints it once")
    c.add_argument("name")
    c.add_argument("--sources", nargs="+", metavar="GLOB", help="globs of the sources it may send as")
    c.add_argument("--types", nargs="+", metavar="GLOB", help="globs of the event types it may send")
    c.add_argument("--subscribe", nargs="+", metavar="GLOB", help="globs of the types it may read (/v1/subscribe)")
    c.add_argument("--rate", type=float, default=0.0, metavar="N", help="events/s it may send (default 0: no limit)")
    c.add_argument("--file", help=file_help)
    c.set_defaults(func=cmd_create)
    ls = actions.add_parser("list", parents=[common], help="the tokens: name, created, rate, globs (never a token)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--file", help=file_help)
    ls.set_defaults(func=cmd_list)
    r = actions.add_parser("revoke", parents=[common], help="remove a token (a running gateway refuses it)")
    r.add_argument("name")
    r.add_argument("--file", help=file_help)
    r.set_defaults(func=cmd_revoke)
