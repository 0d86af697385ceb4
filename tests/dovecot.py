"""A throwaway Dovecot IMAP server for tests: real IDLE, UIDs and UIDVALIDITY.

    server = Dovecot(users={"alice": "secret"}, tls=True); server.start()
    server.append(b"Subject: hi\\r\\n\\r\\nbody\\r\\n")     # -> UID
    server.stop(); server.start()                          # same port, same mail
    server.close()                                         # stop + remove every file

With tls=True it also serves TLS with a certificate from its own throwaway CA
(`server.pki`, tests/tlscerts.py): STARTTLS on `port`, implicit TLS (IMAPS) on
`ssl_port`; plaintext LOGIN stays allowed on `port` for the tests that do not use TLS.
The hierarchy separator is "/" (as most servers show it); mailbox names on the wire
are modified UTF-7 (RFC 3501 5.1.3).

Everything lives in a private temp dir (config, passwd-file, maildirs, base_dir,
state_dir, log); no systemd and nothing under /etc is read. Written for Dovecot 2.3
(`disable_plaintext_auth`; 2.4 renamed it `auth_allow_cleartext`).
"""

from __future__ import annotations

import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from nexus.testing import free_port

BINARY = shutil.which("dovecot") or next(
    (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.path.exists(p)), None
)


def version() -> str:
    out = subprocess.run([BINARY, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _quote(mailbox: str) -> str:
    """imaplib sends arguments as they are; a name with a space must be quoted."""
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _user(*names: str) -> pwd.struct_passwd:
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    raise RuntimeError(f"none of the users {names} exists")


def _accounts() -> dict[str, str]:
    """Which system users the Dovecot processes run as."""
    if os.geteuid() != 0:  # unprivileged master: everything runs as us
        me = pwd.getpwuid(os.geteuid()).pw_name
        return {"login": me, "internal": me, "internal_group": grp.getgrgid(os.getegid()).gr_name}
    # As root: imap-login refuses to run as root ("must not be run as root") and the
    # imap process refuses uid/gid 0 for mail access ("Mail access not allowed for
    # root"), so login, internal and mail processes use unprivileged system users.
    login = _user("dovenull", "nobody")
    internal = _user("dovecot", "nobody")
    mail = _user("nobody")
    return {
        "login": login.pw_name,
        "internal": internal.pw_name,
        "internal_group": grp.getgrgid(internal.pw_gid).gr_name,
        "mail": mail.pw_name,
        "mail_group": grp.getgrgid(mail.pw_gid).gr_name,
        "mail_uid": mail.pw_uid,
        "mail_gid": mail.pw_gid,
    }


CONFIG = """\
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 1 secs
default_internal_user = {internal}
default_internal_group = {internal_group}
default_login_user = {login}
first_valid_uid = 0
first_valid_gid = 0
{mail_user}
mail_location = maildir:{root}/mail/%u
mail_max_userip_connections = 100
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ssl_port}
  }}
}}
"""


SSL_CONFIG = """\
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2"""


class Dovecot:
    def __init__(self, users: dict[str, str] | None = None, port: int | None = None, tls: bool = False):
        if BINARY is None:
            raise RuntimeError("dovecot is not installed")
        self.users = dict(users or {"alice": "secret"})
        self.port = port or free_port()
        self.ssl_port = free_port() if tls else 0  # 0: no IMAPS listener
        self.host = "127.0.0.1"
        # Not pytest's tmp_path: its parents are 0700 and the unprivileged mail
        # processes must be able to traverse down to the maildirs.
        self.root = Path(tempfile.mkdtemp(prefix="nexus-dovecot-"))
        os.chmod(self.root, 0o755)
        self.proc: subprocess.Popen | None = None
        self.pki = None
        if tls:
            try:
                from tests.tlscerts import TestPKI
            except ImportError:  # plain `pytest` puts tests/ itself on sys.path
                from tlscerts import TestPKI
            self.pki = TestPKI(self.root / "pki", name="Nexus Test Dovecot CA")
        self._write_config()

    def _write_config(self) -> None:
        acc = _accounts()
        for sub in ("run", "state", "mail", "home"):
            (self.root / sub).mkdir()
        if "mail" in acc:
            for sub in ("mail", "home"):
                os.chown(self.root / sub, acc["mail_uid"], acc["mail_gid"])
            mail_user = f"mail_uid = {acc['mail']}\nmail_gid = {acc['mail_group']}"
        else:
            mail_user = ""
        (self.root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()))
        self.config = self.root / "dovecot.conf"
        self.config.write_text(
            CONFIG.format(
                root=self.root,
                port=self.port,
                ssl_port=self.ssl_port,
                ssl=SSL_CONFIG.format(cert=self.pki.server_cert, key=self.pki.server_key) if self.pki else "ssl = no",
                mail_user=mail_user,
                **{k: v for k, v in acc.items() if "mail" not in k},
            )
        )

    # -- process ---------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> Dovecot:
        assert self.proc is None, "already running"
        # Own session: stop() can kill every child by process group, and Ctrl-C in the
        # test terminal does not hit Dovecot before teardown does.
        with open(self.root / "stderr.log", "ab") as err:  # the child keeps its own fd
            self.proc = subprocess.Popen(
                [BINARY, "-F", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._greets():
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"dovecot exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not greet on port {self.port} within {timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                return s.recv(64).startswith(b"* OK")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()  # master stops its children (shutdown_clients = yes)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        try:  # any straggler of this server's own process group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for name in ("dovecot.log", "stderr.log"):
            path = self.root / name
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- mail ------------------------------------------------------------------------
    def connect(self, user: str = "alice") -> imaplib.IMAP4:
        client = imaplib.IMAP4(self.host, self.port, timeout=15)
        client.login(user, self.users[user])
        return client

    def create_mailbox(self, name: str, user: str = "alice") -> None:
        client = self.connect(user)
        try:
            typ, data = client.create(_quote(name))
            assert typ == "OK", data
        finally:
            client.logout()

    def delete_mailbox(self, name: str, user: str = "alice") -> None:
        client = self.connect(user)
        try:
            typ, data = client.delete(_quote(name))
            assert typ == "OK", data
        finally:
            client.logout()

    def append(self, message: bytes, mailbox: str = "INBOX", user: str = "alice") -> int:
        """APPEND `message` (CRLF or LF line ends) and return its UID (UIDPLUS)."""
        client = self.connect(user)
        try:
            typ, data = client.append(_quote(mailbox), None, None, message)
            assert typ == "OK", data
        finally:
            client.logout()
        m = re.search(rb"APPENDUID \d+ (\d+)", data[0])
        return int(m.group(1))
