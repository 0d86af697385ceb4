"""Importing user code (handlers, contracts) with errors reduced to one line."""

from __future__ import annotations

import importlib
import os
import traceback
from types import ModuleType

from nexus.errors import ConfigError

_IMPORTLIB = os.path.dirname(importlib.__file__)


def import_user_module(name: str, what: str) -> ModuleType:
    """Import a handler or contract module; whatever it raises becomes one ConfigError line
    (exit 3: a member or router that cannot import its code is not restarted in a loop)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a module can raise anything at import
        raise ConfigError(f"{what}: cannot import {name}: {describe_import_error(exc)}") from None


def describe_import_error(exc: BaseException) -> str:
    """'RuntimeError: boom (at /app/handlers.py:3)': the type, the message and where it
    was raised (the innermost frame; for a SyntaxError the offending line)."""
    message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ModuleNotFoundError) else str(exc)
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{type(exc).__name__}: {exc.msg} (at {exc.filename}:{exc.lineno})"
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<frozen ", _IMPORTLIB)) and f.filename != __file__
    ]
    return f"{message} (at {frames[-1].filename}:{frames[-1].lineno})" if frames else message
