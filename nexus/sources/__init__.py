"""Sources: the producers configured under `producers:`, each run as a supervised
process by the launcher. A kind is a plugin (nexus/sources/base.py: `Source` with its
`Config`, registered under the `nexus.sources` entry points); the built-in kinds are
schedule, file and imap. `kinds()` lists the installed ones.
"""

from __future__ import annotations

from nexus.config import ByteSize, Duration, SourceConfig, source_kinds
from nexus.sources.base import Sink, Source
from nexus.sources.runner import main, status_path


def kinds() -> list[str]:
    """The names of the installed source kinds (built-in and plugins)."""
    return sorted(source_kinds())


__all__ = ["ByteSize", "Duration", "Sink", "Source", "SourceConfig", "kinds", "main", "status_path"]
