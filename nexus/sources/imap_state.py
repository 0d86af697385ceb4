"""What the IMAP producer keeps and decodes, apart from its connection logic:

- durable positions, data_dir/imap/NAME.json = {mailbox: {uidvalidity, last_uid}},
  written only after `sink.flush()` returned, so a crash re-emits and never skips
  (a checksummed state file: a damaged one falls back to its previous copy);
- FETCH responses as aioimaplib hands them over (text lines + literal bytearrays);
- messages decoded into `email.received` payloads within the contract's bounds.
"""

from __future__ import annotations

import email
import email.policy
import html.parser
import os
import re
import threading
from datetime import UTC
from pathlib import Path
from typing import Any

import msgspec
import structlog

from nexus.common import statefile

log = structlog.get_logger("nexus.producers.imap")
FETCH_START = re.compile(rb"^(?:\* )?\d+ FETCH \(", re.I)


class Position(msgspec.Struct, frozen=True):
    uidvalidity: int
    last_uid: int


class _Doc(msgspec.Struct):
    version: int = 1
    mailboxes: dict[str, Position] = {}


class ImapState:
    """The positions of one producer (all its mailboxes share one small file, written
    atomically with a checksum and the previous copy kept: nexus/common/statefile.py)."""

    def __init__(self, data_dir: str | os.PathLike, name: str):
        self.path = Path(data_dir) / "imap" / f"{name}.json"
        self._lock = threading.Lock()  # mailboxes persist from the loop and executor
        self.damaged = False  # the file was damaged: see lost()
        self._doc = self._load()

    def _load(self) -> _Doc:
        loaded = statefile.read(str(self.path), _decode)
        if loaded.damaged:
            # logged (state_file_damaged); a mailbox missing from the recovered copy
            # must not start at the newest mail: see lost()
            self.damaged = True
        return loaded.value or _Doc()

    def get(self, mailbox: str) -> Position | None:
        with self._lock:
            return self._doc.mailboxes.get(mailbox)

    def lost(self, mailbox: str) -> bool:
        """True when the mailbox's position was in a damaged file and no good copy had
        it: it resumes from the mailbox's first message (re-emitting is safe, skipping
        is not)."""
        with self._lock:
            return self.damaged and mailbox not in self._doc.mailboxes

    def set(self, mailbox: str, uidvalidity: int, last_uid: int) -> None:
        """Record a position durably (statefile.write: tmp, fsync, rename, dir fsync)."""
        with self._lock:
            if self._doc.mailboxes.get(mailbox) == Position(uidvalidity, last_uid):
                return
            mailboxes = dict(self._doc.mailboxes)
            mailboxes[mailbox] = Position(uidvalidity, last_uid)
            doc = _Doc(mailboxes=mailboxes)
            statefile.write(str(self.path), msgspec.json.format(msgspec.json.encode(doc)))
            self._doc = doc


def _decode(body: bytes) -> _Doc:
    return msgspec.json.decode(body, type=_Doc)


# -- server responses -----------------------------------------------------------
def ints(lines: list) -> list[int]:
    """The numbers of SEARCH reply lines (b'4 5 6')."""
    return [int(w) for line in lines for w in bytes(line).split() if w.isdigit()]


def resp_code(lines: list, name: bytes) -> int | None:
    """A numeric response code of a SELECT reply, e.g. [UIDVALIDITY 3857529045]."""
    for line in lines:
        m = re.search(rb"\[" + name + rb" (\d+)\]", bytes(line))
        if m:
            return int(m.group(1))
    return None


def parse_fetch(lines: list) -> dict[int, tuple[list[str], int | None, bytes]]:
    """aioimaplib FETCH lines (text, literal bytearrays) -> {uid: (flags, size, body)}."""
    groups: list[list] = []
    for line in lines[:-1]:  # the last line is the tagged status text
        if isinstance(line, bytes) and FETCH_START.match(line):
            groups.append([line, None])
        elif groups and isinstance(line, bytearray):
            groups[-1][1] = groups[-1][1] if groups[-1][1] is not None else bytes(line)
        elif groups:
            groups[-1][0] += b" " + line
    out = {}
    for text, body in groups:
        uid = re.search(rb"\bUID (\d+)", text)
        if body is None and b"BODY[]" in text:
            body = b""  # an empty literal has no bytearray line
        if uid is None or body is None:  # e.g. an unsolicited flag update
            continue
        flags = re.search(rb"\bFLAGS \(([^)]*)\)", text)
        size = re.search(rb"\bRFC822\.SIZE (\d+)", text)
        out[int(uid.group(1))] = (
            flags.group(1).decode("utf-8", "replace").split() if flags else [],
            int(size.group(1)) if size else None,
            body,
        )
    return out


# -- message -> payload (EmailReceived: every string is cut to its contract bound) --
def build_payload(
    raw: bytes,
    *,
    account: str,
    mailbox: str,
    uid: int,
    uidvalidity: int,
    flags: list[str],
    size: int | None,
    snippet_chars: int,
) -> dict:
    payload: dict[str, Any] = {
        "account": account[:256],
        "mailbox": mailbox[:256],
        "uid": uid,
        "uidvalidity": uidvalidity,
        "size": len(raw) if size is None else size,
        # \Recent is per session and meaningless downstream
        "flags": [f[:256] for f in flags if f.lower() != "\\recent"][:64],
    }
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception as exc:
        log.warning("imap_message_unparsable", account=account, uid=uid, error=repr(exc))
        return payload
    fields = {
        "message_id": lambda: str(msg.get("message-id", "")).strip()[:998],
        "from": lambda: (_addresses(msg, "from") or [""])[0],
        "to": lambda: _addresses(msg, "to"),
        "cc": lambda: _addresses(msg, "cc"),
        "subject": lambda: str(msg.get("subject", "")).strip()[:2048],
        "date": lambda: _date(msg),
        "snippet": lambda: _snippet(msg, min(snippet_chars, 8192)),
        "has_attachments": lambda: _has_attachments(msg),
    }
    for key, get in fields.items():
        try:  # one malformed header must not cost the rest of the message
            payload[key] = _clean(get())
        except Exception as exc:
            log.warning("imap_header_unparsable", account=account, uid=uid, field=key, error=repr(exc))
    return payload


def _clean(value: Any) -> Any:
    """Raw 8-bit headers come back with surrogate escapes, which msgpack cannot encode:
    read them as UTF-8 (RFC 6532), anything else becomes U+FFFD. Never lengthens."""
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _addresses(msg: Any, name: str) -> list[str]:
    out: list[str] = []
    for header in msg.get_all(name, []):
        addresses = getattr(header, "addresses", None)
        if addresses:
            out += [str(a) for a in addresses]
        elif str(header).strip():
            out.append(str(header).strip())
    return [a[:1024] for a in out[:256]]


def _date(msg: Any) -> float | None:
    dt = getattr(msg.get("date"), "datetime", None)
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _snippet(msg: Any, limit: int) -> str:
    part = msg.get_body(preferencelist=("plain", "html")) if limit > 0 else None
    if part is None:
        return ""
    try:
        text = part.get_content()
    except Exception:  # unknown charset and the like
        text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
    if not isinstance(text, str):
        return ""
    text = text[: max(limit * 8, 65536)]  # bound the work on huge bodies
    if part.get_content_subtype() == "html":
        stripper = _HtmlText()
        stripper.feed(text)
        stripper.close()
        text = " ".join(stripper.parts)
    return " ".join(text.split())[:limit]


def _has_attachments(msg: Any) -> bool:
    for part in msg.walk():
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        if disposition == "attachment" or (disposition is None and part.get_filename()):
            return True
    return False


class _HtmlText(html.parser.HTMLParser):
    _SKIP = {"script", "style", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self._skip += tag in self._SKIP
        self.parts.append(" ")  # <p>, <br>, <td>: keep words apart

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1
        self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)
