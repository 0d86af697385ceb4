"""The `nexus` command: a short-lived process that talks to a running pipeline
(send, status, scale, tail, dlq, reload), runs one more member (worker), or reads a
data dir offline (journal)."""

from nexus.cli.commands import main

__all__ = ["main"]
