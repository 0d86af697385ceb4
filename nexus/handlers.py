"""Loading a handler from its 'module:attr' spec."""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from .errors import ConfigError


def load_handler(spec: str, options: dict) -> tuple[Callable, Callable | None]:
    """'module:attr' -> (handle, close). A class is instantiated with the options."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"handler {spec}: cannot import {module_name}: {exc}") from None
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"handler {spec}: {module_name} has no attribute {attr!r}")
    if inspect.isclass(target):
        instance = target(options)
        return instance.handle, getattr(instance, "close", None)
    if not callable(target):
        raise ConfigError(f"handler {spec}: {attr} is not callable")
    return target, None

