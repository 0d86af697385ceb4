"""Nexus: a brokerless, multi-process event pipeline on ZeroMQ."""

from nexus.errors import ConfigError, DependencyError, EventError, NexusError, PeerError, PermanentError, RejectedError
from nexus.member.context import Context
from nexus.producer.client import AsyncProducer, Producer
from nexus.protocol.events import Contract, Event, contract, new_id

__all__ = [
    "AsyncProducer",
    "ConfigError",
    "Context",
    "Contract",
    "DependencyError",
    "Event",
    "EventError",
    "NexusError",
    "PeerError",
    "PermanentError",
    "Producer",
    "RejectedError",
    "contract",
    "new_id",
]
__version__ = "0.1.0"
