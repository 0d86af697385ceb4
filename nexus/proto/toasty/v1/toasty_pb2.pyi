from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Urgency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    URGENCY_UNSPECIFIED: _ClassVar[Urgency]
    LOW: _ClassVar[Urgency]
    NORMAL: _ClassVar[Urgency]
    CRITICAL: _ClassVar[Urgency]
URGENCY_UNSPECIFIED: Urgency
LOW: Urgency
NORMAL: Urgency
CRITICAL: Urgency

class Notification(_message.Message):
    __slots__ = ("title", "body", "app", "urgency", "tag", "event_id", "correlation_id")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    URGENCY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    title: str
    body: str
    app: str
    urgency: Urgency
    tag: str
    event_id: str
    correlation_id: str
    def __init__(self, title: _Optional[str] = ..., body: _Optional[str] = ..., app: _Optional[str] = ..., urgency: _Optional[_Union[Urgency, str]] = ..., tag: _Optional[str] = ..., event_id: _Optional[str] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class NotifyReply(_message.Message):
    __slots__ = ("accepted", "id")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    id: str
    def __init__(self, accepted: _Optional[bool] = ..., id: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status",)
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[HealthReply.Status]
        SERVING: _ClassVar[HealthReply.Status]
        NOT_SERVING: _ClassVar[HealthReply.Status]
    STATUS_UNSPECIFIED: HealthReply.Status
    SERVING: HealthReply.Status
    NOT_SERVING: HealthReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: HealthReply.Status
    def __init__(self, status: _Optional[_Union[HealthReply.Status, str]] = ...) -> None: ...
