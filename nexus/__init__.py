"""Nexus: a brokerless, multi-process event pipeline on ZeroMQ."""
from .context import Context
from .errors import (ConfigError, DependencyError, EventError, NexusError, PeerError, PermanentError,
                     RejectedError)
from .events import Contract, Event, contract, new_id
from .producer import AsyncProducer, Producer

__all__ = ["AsyncProducer", "ConfigError", "Context", "Contract", "DependencyError", "Event", "EventError",
           "NexusError", "PeerError", "PermanentError", "Producer", "RejectedError", "contract", "new_id"]
__version__ = "0.1.0"
