"""`nexus keys`: generate a CURVE key pair, authorize a public key with its role and
limits, list the authorized keys, revoke one.

Keys are pyzmq certificate files (zmq.auth.create_certificates): NAME.key (public) and
NAME.key_secret (both keys, 0600). A running router and launcher re-read the authorized
keys folder every second (nexus/protocol/gatekeeper.py): authorize and revoke take
effect without a restart, and a revoked key's connections are closed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import yaml
import zmq.auth

from nexus import config as config_mod
from nexus.errors import ConfigError, NexusError
from nexus.protocol.curve import load_pair, load_public
from nexus.protocol.gatekeeper import LOCAL, NAME_RE, read_folder

DEFAULT_DIR = "keys"  # where `generate` writes without --dir


def _name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name == LOCAL:
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '.', '-', '_' (and not {LOCAL!r})")
    return name


def _authorized_dir(args) -> str:
    """--dir, else the config's security.curve.authorized_keys_dir."""
    if args.dir:
        return args.dir
    cfg = config_mod.load(args.config, args.env)
    if not cfg.security.curve.authorized_keys_dir:
        raise ConfigError(f"{cfg.source}: security.curve.authorized_keys_dir is not set (or pass --dir)")
    return cfg.resolve(cfg.security.curve.authorized_keys_dir)


def cmd_generate(args) -> int:
    name, folder = _name(args.name), args.dir or DEFAULT_DIR
    public_file = os.path.join(folder, f"{name}.key")
    if os.path.exists(public_file) or os.path.exists(public_file + "_secret"):
        raise NexusError(f"{public_file}: a key named {name} exists already (choose another name)")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        public_file, secret_file = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)  # the public key may be read and copied
    public = load_pair(secret_file, secret_file).public.decode()
    print(f"public key:      {public}")
    print(f"public key file: {public_file}   (give it to the router host: nexus keys authorize {name} FILE ...)")
    print(f"secret key file: {secret_file}   (0600, stays here: security.curve.secret_key_file)")
    return 0


def cmd_authorize(args) -> int:
    name, folder = _name(args.name), _authorized_dir(args)
    if not os.path.isfile(args.public_key):
        raise ConfigError(f"{args.public_key}: not a key file (the NAME.key that `nexus keys generate` wrote)")
    load_public(args.public_key, args.public_key)
    public, secret = zmq.auth.load_certificate(args.public_key)
    if secret:  # a secret never leaves the host it was made on
        raise ConfigError(f"{args.public_key} holds a secret key: authorize the public NAME.key file instead")
    grant: dict = {"role": args.role}
    for field in ("sources", "types", "groups"):
        if getattr(args, field):
            grant[field] = getattr(args, field)
    if args.role == "producer" and not (args.sources and args.types):
        raise ConfigError("a producer key needs --sources and --types (globs of what it may send)")
    if args.role == "member" and not args.groups:
        raise ConfigError("a member key needs --groups (the worker groups it may join)")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    # the grant first, then the key: a re-scan never sees a key without its grant
    _replace(os.path.join(folder, f"{name}.yaml"), yaml.safe_dump(grant, sort_keys=False).encode())
    tmp = os.path.join(folder, f".{name}.key.tmp")
    shutil.copyfile(args.public_key, tmp)
    os.replace(tmp, os.path.join(folder, f"{name}.key"))
    print(f"authorized {name} ({public[:8].decode()}...) as {args.role} in {folder}")
    return 0


def _replace(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def cmd_list(args) -> int:
    folder = _authorized_dir(args)
    grants, problems = read_folder(folder)
    if args.json:
        print(json.dumps({"keys": [g.describe() for g in grants], "unusable": problems}, indent=2, sort_keys=True))
        return 0
    print(f"{'NAME':20} {'ROLE':9} {'PUBLIC KEY':42} LIMITS")
    for g in grants:
        limits = "; ".join(
            f"{field} {', '.join(getattr(g, field))}" for field in ("sources", "types", "groups") if getattr(g, field)
        )
        print(f"{g.name:20} {g.role:9} {g.public.decode():42} {limits or '-'}")
    for name, why in problems.items():
        print(f"{name:20} {'unusable':9} {'':42} {why}")
    return 0


def cmd_revoke(args) -> int:
    name, folder = _name(args.name), _authorized_dir(args)
    key = os.path.join(folder, f"{name}.key")
    if not os.path.exists(key):
        raise NexusError(f"no key named {name} in {folder}")
    os.unlink(key)  # the key first: access ends with it
    grant = os.path.join(folder, f"{name}.yaml")
    if os.path.exists(grant):
        os.unlink(grant)
    print(f"revoked {name}: a running router and launcher close its connections within a second")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("keys", parents=[common], help="CURVE keys: generate | authorize | list | revoke")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    g = actions.add_parser("generate", parents=[common], help="a new key pair NAME.key + NAME.key_secret")
    g.add_argument("name")
    g.add_argument("--dir", help=f"where to write them (default: ./{DEFAULT_DIR})")
    g.set_defaults(func=cmd_generate)
    a = actions.add_parser("authorize", parents=[common], help="allow a public key, with its role and limits")
    a.add_argument("name")
    a.add_argument("public_key", metavar="KEY_FILE", help="the NAME.key file `nexus keys generate` wrote")
    a.add_argument("--role", required=True, choices=["producer", "member", "admin"])
    a.add_argument("--sources", nargs="+", help="producer: globs of the sources it may send")
    a.add_argument("--types", nargs="+", help="producer: globs of the event types it may send")
    a.add_argument("--groups", nargs="+", help="member: the worker groups it may join")
    a.add_argument("--dir", help="authorized keys folder (default: security.curve.authorized_keys_dir)")
    a.set_defaults(func=cmd_authorize)
    ls = actions.add_parser("list", parents=[common], help="the authorized keys: name, role, public key, limits")
    ls.add_argument("--dir", help="authorized keys folder (default: security.curve.authorized_keys_dir)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    r = actions.add_parser("revoke", parents=[common], help="remove a key from the authorized keys folder")
    r.add_argument("name")
    r.add_argument("--dir", help="authorized keys folder (default: security.curve.authorized_keys_dir)")
    r.set_defaults(func=cmd_revoke)
