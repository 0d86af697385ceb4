"""Secrets are never shown: the one rule every log line, config repr and error text goes by.

Two nets, so a secret is caught however it travels:

- by name: the value of a key or field whose name says it is a secret (password,
  token, secret, authorization, api key, cookie, credential, private key) is masked,
  in log events, in nested dicts (webhook headers) and in config reprs. A name ending
  in _file, _env, _dir or _path says where a secret is, not the secret: shown.
- by value: every secret a process knows (those in its config, registered when the
  config is loaded; those read from the environment or a key file, registered where
  they are read) is replaced wherever it appears in a logged string or an error line.

A future secret (a CURVE secret key) is covered by naming its field after the rule,
and by `register(value)` where it is read.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

MASK = "***"
_SECRET_NAME = re.compile(r"passw|passphrase|secret|token|authoriz|api_?key|cookie|credential|private_?key")
_WHERE_NAME = re.compile(r"_(file|env|dir|path)$")
# an Authorization value, "Bearer TOKEN": its credentials are a secret by themselves
_SCHEME_CREDENTIALS = re.compile(r"\A(?:bearer|basic|token|digest|negotiate|bot|apikey|key)\s+(\S+)\s*\Z", re.I)
MIN_LEN = 4  # shorter values are not scrubbed from text (a 1-3 character "secret" would garble every line)

_known: set[str] = set()
_lock = threading.Lock()
_pattern: re.Pattern[str] | None = None


def is_secret_name(name: object) -> bool:
    if not isinstance(name, str):
        return False
    norm = name.lower().replace("-", "_")
    return _SECRET_NAME.search(norm) is not None and _WHERE_NAME.search(norm) is None


def register(value: object) -> None:
    """Remember a secret this process holds, so no text ever shows it (and the
    credentials of an Authorization-style value alone: a server may echo just those)."""
    global _pattern
    if not isinstance(value, str) or len(value) < MIN_LEN:
        return
    m = _SCHEME_CREDENTIALS.match(value)
    if m is not None:
        register(m.group(1))
    with _lock:
        if value in _known:
            return
        _known.add(value)
        # longest first: a secret that contains another is replaced whole
        _pattern = re.compile("|".join(re.escape(v) for v in sorted(_known, key=len, reverse=True)))


def register_from(obj: Any) -> None:
    """Register the value of every secret-named key or field in a config tree."""
    for name, value in _items(obj):
        if is_secret_name(name) and isinstance(value, str):
            register(value)
        else:
            register_from(value)


def _items(obj: Any) -> list[tuple[Any, Any]]:
    if isinstance(obj, Mapping):
        return list(obj.items())
    fields = getattr(type(obj), "__struct_fields__", None)
    if fields is not None:
        return [(f, getattr(obj, f, None)) for f in fields]
    if isinstance(obj, (list, tuple)):
        return [(None, v) for v in obj]
    return []


def scrub(text: str) -> str:
    """`text` with every registered secret replaced by the mask."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(MASK, text)


def mask(value: Any, name: object = None) -> Any:
    """A copy safe to show: secret-named entries masked (recursively), strings scrubbed."""
    if name is not None and is_secret_name(name) and value is not None and not isinstance(value, bool):
        return MASK
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {k: mask(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask(v) for v in value)
    return value


def processor(logger: Any, method: str, event_dict: dict) -> dict:
    """structlog processor: mask secret-named keys, scrub known secrets from every value
    (the event name and a formatted traceback included)."""
    for key, value in event_dict.items():
        if isinstance(value, (str, Mapping, list, tuple)) or is_secret_name(key):
            event_dict[key] = mask(value, key)
    return event_dict


def struct_repr(obj: Any) -> str:
    """repr of a msgspec Struct (a config section) with secret fields masked."""
    parts = []
    for field in type(obj).__struct_fields__:
        value = getattr(obj, field)
        shown = MASK if is_secret_name(field) and value is not None else repr(mask(value))
        parts.append(f"{field}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"
