"""The `nexus` command: a short-lived process that talks to a running pipeline
(status, send, tail, replay, reload, scale, stop) or reads its data dir offline."""

from nexus.cli.commands import main

__all__ = ["main"]
