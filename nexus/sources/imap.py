"""IMAP producer (`kind: imap`): one `email.received` per new message, pushed by IDLE.

One connection per mailbox, because IDLE only watches the selected mailbox. Each one
loops: fetch UIDs above the stored position, emit them in UID order, `sink.flush()`,
then persist the position (data_dir/imap/NAME.json); then IDLE until the server
reports EXISTS/RECENT or `idle_timeout` passes (RFC 2177: re-issue before 29 min).

Start position (the default, documented): with no stored position, e.g. the first
run, a mailbox starts at its newest message, so only mail arriving from then on is
emitted and years of history are not replayed as "received". With a stored position
it resumes after the last emitted UID: mail that arrived while Nexus was down is
emitted, at least once (a crash between flush and persist re-emits one batch).

TLS (`tls`): `ssl` (implicit TLS, port 993, the default), `starttls` (port 143, then
STARTTLS before LOGIN; a server that does not offer it is refused, never used in
clear) or `none`, which is allowed only for a loopback host unless `insecure: true`.
The server's certificate is verified against `ca_file` (else the system's CAs) and
`host`; a failure is `imap_tls_failed`, retried slowly like a refused login.

Mailbox names are sent in modified UTF-7 (RFC 3501 5.1.3: "Eingang/Größe" is
"Eingang/Gr&APYA3w-e" on the wire); config, payloads and state use the real name.

Connection state: STATUS[(name, mailbox)] and the logs imap_connected,
imap_disconnected, imap_auth_failed, imap_tls_failed, imap_uidvalidity_changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import aioimaplib
import msgspec
import structlog
from imapclient import imap_utf7

from nexus.common import redact
from nexus.common.tls import client_context, is_loopback
from nexus.config import Config as PipelineConfig
from nexus.config import Duration, Positive, SourceConfig
from nexus.errors import ConfigError, EventError, PeerError, RejectedError
from nexus.sources.base import Sink, Source
from nexus.sources.imap_state import ImapState, build_payload, ints, parse_fetch, resp_code

log = structlog.get_logger("nexus.producers.imap")
# aioimaplib logs every line sent at DEBUG (its password scrub misses a password it
# had to escape) and every ignored untagged reply at INFO: keep it to real problems.
logging.getLogger("aioimaplib").setLevel(logging.WARNING)

COMMAND_TIMEOUT = 30.0  # a command (or a fetch without progress) longer than this is hung
FLUSH_TIMEOUT = 30.0
FETCH_BATCH = 20  # messages per UID FETCH; one flush + persist per batch
POLL_INTERVAL = 30.0  # NOOP interval for the rare server without IDLE
STOP_POLL = 0.1  # how often the loop looks at the `stop` threading.Event
STOP_GRACE = 0.7  # time given to LOGOUT on stop before connections are cut
_NEW_MAIL = re.compile(rb"^\* \d+ (EXISTS|RECENT)\b", re.I)


class ImapConfig(SourceConfig):
    host: str
    username: str
    port: Positive | None = None  # default: 993 for tls: ssl, else 143
    tls: Literal["ssl", "starttls", "none"] | None = None  # default: ssl
    ca_file: str | None = None  # PEM CAs to trust (relative: to the config file); default: the system's
    insecure: bool = False  # allow tls: none to a host that is not loopback
    ssl: bool | None = None  # the older spelling: true = tls: ssl, false = tls: none
    password: str | None = None
    password_env: str | None = None
    mailboxes: list[str] = msgspec.field(default_factory=lambda: ["INBOX"])
    idle_timeout: Duration = Duration(25 * 60)  # RFC 2177: re-issue before 29 minutes
    snippet_bytes: Annotated[int, msgspec.Meta(ge=0, le=8192)] = 512
    reconnect_max: Duration = Duration(60)
    key: str | None = None

    def __post_init__(self) -> None:
        if self.ssl is not None and self.tls is not None:
            raise ValueError("set tls only (ssl is its older spelling)")

    @property
    def tls_mode(self) -> str:
        if self.tls is not None:
            return self.tls
        return "none" if self.ssl is False else "ssl"

    @property
    def server_port(self) -> int:
        return self.port or (993 if self.tls_mode == "ssl" else 143)


@dataclass
class MailboxStatus:
    state: str = "starting"  # connecting | syncing | idle | polling | backoff | auth_failed | stopped
    error: str | None = None
    connects: int = 0
    auth_failures: int = 0
    emitted: int = 0
    uidvalidity: int | None = None
    last_uid: int | None = None


STATUS: dict[tuple[str, str], MailboxStatus] = {}  # (producer name, mailbox) -> live status


class AuthFailed(Exception):
    pass


class TlsFailed(Exception):
    """The TLS handshake failed or STARTTLS is not available: retried slowly."""


class ImapError(Exception):
    """The server said NO/BAD, went away or stopped answering: reconnect."""


class _Stopped(Exception):
    pass


class _Protocol(aioimaplib.IMAP4ClientProtocol):
    # Notes EXISTS/RECENT whenever it arrives: during IDLE, and also inside the reply
    # to a SEARCH or FETCH, where aioimaplib drops it; so no wake-up is ever lost.
    def __init__(self, loop: Any, conn_lost_cb: Any = None):
        super().__init__(loop, conn_lost_cb)
        self.new_mail = asyncio.Event()

    def _handle_line(self, line: bytes, current_cmd: Any) -> Any:
        if _NEW_MAIL.match(line):
            self.new_mail.set()
        return super()._handle_line(line, current_cmd)


class _Client(aioimaplib.IMAP4):
    def create_client(self, host, port, loop, conn_lost_cb=None, ssl_context=None) -> None:
        loop = loop or asyncio.get_running_loop()
        self.protocol = _Protocol(loop, conn_lost_cb)
        self._client_task = loop.create_task(loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context))

    def cancel_connect(self) -> None:
        """Cut a connection attempt still under way (aioimaplib keeps its task private)."""
        self._client_task.cancel()


def _password(name: str, spec: ImapConfig) -> str:
    if spec.password:
        return spec.password
    where = f"producers.{name}.password_env"
    if not spec.password_env:
        raise ConfigError(
            f"{where}: name the environment variable holding the IMAP password of {spec.username!r} (or set password)"
        )
    value = os.environ.get(spec.password_env)
    if not value:
        raise ConfigError(f"{where}: environment variable {spec.password_env} is not set or empty")
    redact.register(value)  # from the environment: no log line or error may show it
    return value


def wire_name(mailbox: str) -> str:
    """The mailbox name as sent to the server: modified UTF-7, quoted."""
    return aioimaplib.quoted(imap_utf7.encode(mailbox).decode("ascii"))


class ImapSource(Source[ImapConfig]):
    Config = ImapConfig

    @classmethod
    def check(cls, name: str, spec: ImapConfig, config: PipelineConfig) -> None:
        where = f"producers.{name}"
        if spec.tls_mode == "none":
            if not spec.insecure and not is_loopback(spec.host):
                key = "tls" if spec.tls else "ssl"
                raise ConfigError(
                    f"{where}.{key}: without TLS the password would cross the network in clear to {spec.host}: "
                    "use tls: ssl or starttls (or insecure: true)"
                )
            if spec.ca_file:
                raise ConfigError(f"{where}.ca_file: only used with tls: ssl or starttls")

    def run(self, sink: Sink, stop: threading.Event) -> None:
        name, spec = self.name, self.spec
        password = _password(name, spec)
        self.check(name, spec, self.config)
        tls = None
        if spec.tls_mode != "none":
            ca_file = self.config.resolve(spec.ca_file) if spec.ca_file else None
            tls = client_context(ca_file, where=f"producers.{name}")
        elif not is_loopback(spec.host):
            log.warning("imap_insecure", producer=name, host=spec.host, reason="insecure: true, no TLS")
        state = ImapState(self.config.data_dir, name)
        # One worker: emit, flush and fsync leave the loop free (IDLE, stop) and stay ordered.
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"imap-{name}")
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(_main(name, spec, password, tls, state, sink, stop, executor))
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            loop.close()

    def status(self) -> dict[str, Any]:
        """Per-mailbox state for `nexus status` (an auth failure shows there)."""
        return {
            "mailboxes": {
                mb: {"state": s.state, "error": s.error, "emitted": s.emitted, "last_uid": s.last_uid}
                for (n, mb), s in list(STATUS.items())
                if n == self.name
            }
        }


async def _main(
    name: str,
    spec: ImapConfig,
    password: str,
    tls: ssl.SSLContext | None,
    state: ImapState,
    sink: Any,
    stop: threading.Event,
    executor: ThreadPoolExecutor,
) -> None:
    stopping = asyncio.get_running_loop().create_future()
    tasks = [
        asyncio.create_task(_Mailbox(name, mb, spec, password, tls, state, sink, executor, stopping).run())
        for mb in dict.fromkeys(spec.mailboxes)
    ]
    while not stop.is_set():
        await asyncio.sleep(STOP_POLL)
    stopping.set_result(None)
    await asyncio.wait(tasks, timeout=STOP_GRACE)
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=0.2)
    for mailbox in dict.fromkeys(spec.mailboxes):
        STATUS[(name, mailbox)].state = "stopped"


class _Mailbox:
    def __init__(
        self,
        name: str,
        mailbox: str,
        spec: ImapConfig,
        password: str,
        tls: ssl.SSLContext | None,
        state: ImapState,
        sink: Any,
        executor: ThreadPoolExecutor,
        stopping: asyncio.Future,
    ):
        self.name, self.mailbox, self.spec, self.password, self.tls = name, mailbox, spec, password, tls
        self.state, self.sink, self.executor, self.stopping = state, sink, executor, stopping
        self.key = spec.key or f"{name}:{mailbox}"
        self.status = STATUS[(name, mailbox)] = MailboxStatus()
        self.log = log.bind(producer=name, mailbox=mailbox)
        self.client: _Client | None = None
        self.lost: asyncio.Future = stopping.get_loop().create_future()
        self.healthy = False

    @property
    def session(self) -> _Client:
        """The connection of the running session (`_session` sets it, `_close` clears it)."""
        if self.client is None:
            raise ImapError("not connected")
        return self.client

    def _set(self, state: str, error: str | None = None) -> None:
        self.status.state, self.status.error = state, error

    async def run(self) -> None:
        spec, backoff = self.spec, 0.5
        while not self.stopping.done():
            self.healthy, delay = False, backoff
            try:
                await self._session()
            except _Stopped:
                break
            except AuthFailed as exc:
                # Not a tight loop: the account may be locked out by retries. Retry
                # slowly so a corrected password is picked up without a restart.
                delay = spec.reconnect_max
                self.status.auth_failures += 1
                self._set("auth_failed", str(exc))
                self.log.error(
                    "imap_auth_failed",
                    host=spec.host,
                    port=spec.server_port,
                    user=spec.username,
                    error=str(exc),
                    retry_in=delay,
                )
            except TlsFailed as exc:
                # A setup problem (CA, certificate, server config): slow retries, so a
                # fixed server certificate is picked up without a restart.
                delay = spec.reconnect_max
                self._set("tls_failed", str(exc))
                self.log.error("imap_tls_failed", host=spec.host, port=spec.server_port, error=str(exc), retry_in=delay)
            except Exception as exc:  # anything else: drop the connection, back off, retry
                if self.healthy:
                    backoff = 0.5
                delay, backoff = backoff, min(backoff * 2, spec.reconnect_max)
                error = _describe(exc)
                self._set("backoff", error)
                event = "imap_flush_failed" if isinstance(exc, PeerError) else "imap_disconnected"
                self.log.warning(
                    event,
                    host=spec.host,
                    port=spec.server_port,
                    error=error,
                    retry_in=delay,
                    exc_info=not isinstance(
                        exc, (OSError, ImapError, PeerError, asyncio.TimeoutError, aioimaplib.AioImapException)
                    ),
                )
            finally:
                await self._close(graceful=self.stopping.done())
            await asyncio.wait([self.stopping], timeout=delay)
        self._set("stopped")

    async def _call(self, aw: Any, timeout: float | None = COMMAND_TIMEOUT, lost: bool = True) -> Any:
        """Await `aw`, but give up when stop is requested, the connection drops or time runs out."""
        task = asyncio.ensure_future(aw)
        waits = {task, self.stopping} | ({self.lost} if lost else set())
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        if self.stopping.done():
            raise _Stopped()
        if self.lost.done():
            raise ImapError(f"connection lost: {self.lost.result() or 'closed by the server'}")
        raise TimeoutError(f"no answer from the server within {timeout:g}s")

    async def _sync(self, fn: Any, *args: Any) -> Any:
        # Not cut by a lost IMAP connection: the flush + persist should complete.
        loop = asyncio.get_running_loop()
        return await self._call(loop.run_in_executor(self.executor, fn, *args), None, lost=False)

    async def _session(self) -> None:
        spec = self.spec
        self._set("connecting")
        loop = asyncio.get_running_loop()
        self.lost = lost = loop.create_future()

        def on_lost(exc: Exception | None) -> None:
            if not lost.done():
                lost.set_result(exc)

        self.client = c = _Client(
            host=spec.host,
            port=spec.server_port,
            timeout=COMMAND_TIMEOUT,
            conn_lost_cb=on_lost,
            ssl_context=self.tls if spec.tls_mode == "ssl" else None,
        )
        try:
            await self._call(c.wait_hello_from_server())
            if spec.tls_mode == "starttls":
                await self._starttls(c)
        except ssl.SSLError as exc:
            raise TlsFailed(_tls_failure(spec, exc)) from None
        r = await self._call(c.login(aioimaplib.quoted(spec.username), self.password))
        if r.result != "OK":
            text = _text(r)
            if re.search(r"\[(UNAVAILABLE|INUSE|LIMIT)\]", text):  # RFC 5530: try again later
                raise ImapError(f"login temporarily refused: {text}")
            raise AuthFailed(f"IMAP login to {spec.host}:{spec.server_port} as {spec.username!r} was refused: {text}")
        await self._call(c.protocol.capability())  # post-login capabilities (IDLE)
        r = await self._call(c.select(wire_name(self.mailbox)))
        if r.result != "OK":
            raise ImapError(f"SELECT {self.mailbox!r} failed: {_text(r)}")
        uidvalidity = resp_code(r.lines, b"UIDVALIDITY")
        if uidvalidity is None:
            raise ImapError("the server sent no UIDVALIDITY")
        uidnext = resp_code(r.lines, b"UIDNEXT")
        newest = uidnext - 1 if uidnext is not None else await self._max_uid()
        last = await self._start_position(uidvalidity, newest)
        self.status.connects += 1
        self.status.uidvalidity, self.status.last_uid = uidvalidity, last
        self.log.info(
            "imap_connected",
            host=spec.host,
            port=spec.server_port,
            tls=spec.tls_mode,
            user=spec.username,
            uidvalidity=uidvalidity,
            last_uid=last,
        )
        while True:
            c.protocol.new_mail.clear()
            self._set("syncing")
            last = await self._catch_up(uidvalidity, last)
            if not c.protocol.new_mail.is_set():  # else mail came in during the fetch
                await self._wait_for_mail()

    async def _starttls(self, c: _Client) -> None:
        """RFC 3501 6.2.1: STARTTLS, the TLS handshake on the same connection, then the
        capabilities again (those sent in clear may have been tampered with)."""
        spec = self.spec
        if not c.has_capability("STARTTLS"):
            raise TlsFailed(
                f"{spec.host}:{spec.server_port} does not offer STARTTLS; not logging in without TLS "
                "(use tls: ssl, the server's IMAPS port)"
            )
        proto = c.protocol
        r = await self._call(proto.execute(aioimaplib.Command("STARTTLS", proto.new_tag(), loop=proto.loop)))
        if r.result != "OK":
            raise TlsFailed(f"STARTTLS refused by {spec.host}:{spec.server_port}: {_text(r)}")
        if proto.incomplete_line:  # bytes sent in clear after the OK must not pass as protected
            raise TlsFailed(f"{spec.host}:{spec.server_port} sent data after its STARTTLS reply; not trusting it")
        loop = asyncio.get_running_loop()
        assert self.tls is not None and proto.transport is not None
        proto.transport = await self._call(
            loop.start_tls(proto.transport, proto, self.tls, server_hostname=spec.host),
        )
        await self._call(proto.capability())

    async def _max_uid(self) -> int:
        r = await self._call(self.session.protocol.search("UID", "*", charset=None, by_uid=True))
        return max(ints(r.lines[:-1]), default=0)

    async def _start_position(self, uidvalidity: int, newest: int) -> int:
        stored = self.state.get(self.mailbox)
        if stored is not None and stored.uidvalidity == uidvalidity:
            return stored.last_uid
        if stored is None and self.state.lost(self.mailbox):
            # the state file was damaged (state_file_damaged): the oldest safe point is
            # the mailbox's first message; mail is re-emitted, never skipped
            self.log.warning("imap_position_lost", last_uid=0, newest=newest)
            await self._sync(self.state.set, self.mailbox, uidvalidity, 0)
            return 0
        if stored is not None:
            # The server renumbered the mailbox (recreated, restored, migrated): old UIDs
            # mean nothing now and we cannot tell what was emitted. Replaying the whole
            # mailbox would flood handlers with old mail as "received", so start from
            # the newest message, as on a first run, and say so.
            self.log.warning("imap_uidvalidity_changed", stored=stored.uidvalidity, server=uidvalidity, last_uid=newest)
        await self._sync(self.state.set, self.mailbox, uidvalidity, newest)
        return newest

    async def _catch_up(self, uidvalidity: int, last: int) -> int:
        c = self.session
        r = await self._call(c.protocol.search("UID", f"{last + 1}:*", charset=None, by_uid=True))
        if r.result != "OK":
            raise ImapError(f"UID SEARCH failed: {_text(r)}")
        uids = sorted(u for u in set(ints(r.lines[:-1])) if u > last)  # n:* includes the max
        for i in range(0, len(uids), FETCH_BATCH):
            batch = uids[i : i + FETCH_BATCH]
            # aioimaplib's own fetch timeout counts inactivity, so big mail is fine
            r = await self._call(c.uid("fetch", ",".join(map(str, batch)), "(UID FLAGS RFC822.SIZE BODY.PEEK[])"), None)
            if r.result != "OK":
                raise ImapError(f"UID FETCH failed: {_text(r)}")
            records = parse_fetch(r.lines)
            found = [(uid, *records[uid]) for uid in batch if uid in records]
            if len(found) < len(batch):  # expunged meanwhile, or a reply we could not read
                self.log.warning("imap_messages_missing", uids=[uid for uid in batch if uid not in records])
            await self._sync(self._deliver, found, uidvalidity, batch[-1])
            last = batch[-1]  # (_deliver set status.last_uid)
        return last

    def _deliver(self, records: list, uidvalidity: int, last_uid: int) -> None:
        """Executor thread: emit in UID order, flush, and only then persist."""
        emitted = 0
        for uid, flags, size, raw in records:
            payload = build_payload(
                raw,
                account=self.name,
                mailbox=self.mailbox,
                uid=uid,
                uidvalidity=uidvalidity,
                flags=flags,
                size=size,
                snippet_chars=self.spec.snippet_bytes,
            )
            try:
                self.sink.emit("email.received", payload, key=self.key)
                emitted += 1
            except (EventError, ValueError, TypeError) as exc:  # bounded + cleaned: should
                # not happen; a message that cannot be sent must not block the mailbox
                self.log.error("imap_message_skipped", uid=uid, error=str(exc))
        if emitted:
            try:
                self.sink.flush(FLUSH_TIMEOUT)
            except RejectedError as exc:  # final NACK: resending would be refused again
                self.log.error("imap_events_rejected", error=str(exc))
        self.state.set(self.mailbox, uidvalidity, last_uid)
        # (position before count: a status read between them must not show the mail
        # counted but the old last_uid)
        self.status.last_uid = last_uid
        self.status.emitted += emitted

    async def _wait_for_mail(self) -> None:
        c = self.session
        while not c.protocol.idle_queue.empty():  # unused by us; keep it from growing
            c.protocol.idle_queue.get_nowait()
        if not c.has_capability("IDLE"):
            self._set("polling")
            self.healthy = True
            try:
                await self._call(c.protocol.new_mail.wait(), POLL_INTERVAL)
            except TimeoutError:
                await self._call(c.noop())
            return
        idle = await self._call(c.idle_start(timeout=self.spec.idle_timeout + COMMAND_TIMEOUT))
        self._set("idle")
        self.healthy = True  # caught up and idling: the next failure starts backoff over
        try:
            await self._call(c.protocol.new_mail.wait(), self.spec.idle_timeout)
        except TimeoutError:
            pass  # re-issue IDLE before the server drops us
        c.idle_done()
        await self._call(idle)

    async def _close(self, graceful: bool) -> None:
        c, self.client = self.client, None
        if c is None:
            return
        try:
            if graceful and not self.lost.done() and c.protocol.transport is not None:
                if c.has_pending_idle():
                    c.idle_done()
                await asyncio.wait_for(c.logout(), STOP_GRACE / 2)
        except Exception:
            pass  # best effort; the connection is cut below anyway
        finally:
            c.cancel_connect()
            if c.protocol.transport is not None:
                c.protocol.transport.close()
            for task in list(c.tasks) + list(c.protocol.tasks):
                task.cancel()


# -- helpers ------------------------------------------------------------------
def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _tls_failure(spec: ImapConfig, exc: ssl.SSLError) -> str:
    where = f"TLS with {spec.host}:{spec.server_port} ({spec.tls_mode})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        trusted = f"ca_file {spec.ca_file}" if spec.ca_file else "the system's CAs"
        return f"{where} refused: certificate not trusted: {exc.verify_message} (checked against {trusted})"
    return f"{where} failed: {exc.reason or exc}"


def _text(r: Any) -> str:
    return " ".join(bytes(x).decode("utf-8", "replace") for x in r.lines[-1:])
