"""Loading a handler from its 'module:attr' spec."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from nexus.common.modules import import_user_module
from nexus.errors import ConfigError


def load_handler(spec: str, options: dict) -> tuple[Callable, Callable | None]:
    """'module:attr' -> (handle, close). A class is instantiated with the options."""
    module_name, _, attr = spec.partition(":")
    module = import_user_module(module_name, f"handler {spec}")
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"handler {spec}: {module_name} has no attribute {attr!r}")
    if inspect.isclass(target):
        instance = target(options)
        return instance.handle, getattr(instance, "close", None)
    if not callable(target):
        raise ConfigError(f"handler {spec}: {attr} is not callable")
    return target, None
