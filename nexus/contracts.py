"""Payload contracts of the built-in event types.

Every string has a bound, so one hostile event cannot make a handler or a sink
carry megabytes; the router rejects what breaks a bound before it is journaled.
`frozen=True` repeats Contract's own setting, for type checkers (a subclass that does
not say it reads to mypy as a mutable child of a frozen dataclass).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from nexus.protocol.events import Contract, contract

Short = Annotated[str, msgspec.Meta(max_length=256)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
PathStr = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
Text = Annotated[str, msgspec.Meta(max_length=8192)]
Address = Annotated[str, msgspec.Meta(max_length=1024)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]


# -- files -------------------------------------------------------------------
@contract("file.created")
@contract("file.modified")
@contract("file.deleted")
class FileChanged(Contract, frozen=True):
    path: PathStr
    watcher: Name
    is_directory: bool = False
    size: NonNeg | None = None
    mtime: float | None = None


@contract("file.moved")
class FileMoved(Contract, frozen=True):
    path: PathStr  # the new path
    src_path: PathStr
    watcher: Name
    is_directory: bool = False


# -- schedules ---------------------------------------------------------------
@contract("schedule.tick")
class ScheduleTick(Contract, frozen=True):
    name: Name
    scheduled: float  # unix seconds the tick was due
    fired: float  # unix seconds it was emitted
    expression: Short = ""  # "every 10s" or the cron expression


# -- mail --------------------------------------------------------------------
@contract("email.received")
class EmailReceived(Contract, frozen=True):
    account: Name
    mailbox: Name
    uid: NonNeg
    uidvalidity: NonNeg
    message_id: Annotated[str, msgspec.Meta(max_length=998)] = ""
    from_: Address = msgspec.field(default="", name="from")
    to: Annotated[list[Address], msgspec.Meta(max_length=256)] = []
    cc: Annotated[list[Address], msgspec.Meta(max_length=256)] = []
    subject: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    date: float | None = None  # unix seconds from the Date header
    size: NonNeg = 0
    flags: Annotated[list[Short], msgspec.Meta(max_length=64)] = []
    snippet: Text = ""
    has_attachments: bool = False


# -- Parrot: desktop notifications captured on Windows ------------------------
NotificationType = Literal["email", "message", "calendar", "system", "other"]


class ParrotEmailData(Contract, frozen=True):
    sender: Address
    subject: Annotated[str, msgspec.Meta(max_length=2048)]
    preview: Annotated[str, msgspec.Meta(max_length=4096)] = ""


@contract("parrot.notification")
class ParrotNotification(Contract, frozen=True):
    app_id: Name
    app_name: Name
    title: Annotated[str, msgspec.Meta(max_length=1024)]
    body: Text
    notification_type: NotificationType
    received_at: float
    email_data: ParrotEmailData | None = None

    def __post_init__(self) -> None:
        if self.notification_type == "email" and self.email_data is None:
            raise ValueError("email_data is required when notification_type is 'email'")
        if self.notification_type != "email" and self.email_data is not None:
            raise ValueError("email_data is only allowed when notification_type is 'email'")
