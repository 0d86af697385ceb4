"""The shared secret rule (nexus/common/redact.py) and where it is applied: log lines
(structlog and the standard library), config reprs, tracebacks."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import structlog

from nexus.common import logs, redact
from nexus.config import Config, RouterConfig
from nexus.sources.imap import ImapConfig


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "PASSWORD",
        "imap_password",
        "token",
        "api-token",
        "secret_key",
        "key_secret",
        "Authorization",
        "X-Api-Key",
        "api_key",
        "Cookie",
        "client_credentials",
        "private_key",
        "passphrase",
    ],
)
def test_secret_names(name):
    assert redact.is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["password_env", "secret_key_file", "authorized_keys_dir", "key", "public_key", "source", "user", "path", 3]
)
def test_names_that_are_not_secrets(name):
    assert not redact.is_secret_name(name)


def test_mask_nested_and_scrub_registered():
    redact.register("hunter2-registered")
    shown = redact.mask(
        {
            "url": "http://x",
            "headers": {"Authorization": "Bearer abc", "Accept": "json"},
            "note": "pw hunter2-registered!",
        }
    )
    assert shown == {"url": "http://x", "headers": {"Authorization": "***", "Accept": "json"}, "note": "pw ***!"}
    assert redact.scrub("a hunter2-registered b") == "a *** b"
    redact.register("Bearer tok-alone-0008")  # the credentials alone are known too
    assert redact.scrub("got tok-alone-0008") == "got ***"
    redact.register("abc")  # too short to scrub from text: ignored
    assert redact.scrub("abc") == "abc"


def test_config_repr_never_shows_a_secret():
    spec = ImapConfig(kind="imap", host="h", username="me", password="pw-in-config-0001")
    for text in (repr(spec), str(spec), f"{spec}"):
        assert "pw-in-config-0001" not in text
        assert "password=***" in text and "username='me'" in text
    cfg = Config(producers={"mail": spec}, workers={})
    assert "pw-in-config-0001" not in repr(cfg)
    assert "RouterConfig(" in repr(RouterConfig())


def test_config_load_registers_its_secrets(tmp_path):
    from nexus import config as config_mod

    path = tmp_path / "c.yaml"
    path.write_text(
        "workers:\n  hook:\n    handler: workers.webhook:Webhook\n"
        "    options: {url: 'http://127.0.0.1:1/', headers: {Authorization: 'Bearer tok-from-file-0002'}}\n"
    )
    config_mod.load(path)
    assert redact.scrub("sent Bearer tok-from-file-0002") == "sent ***"


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_log_lines_mask_secrets_and_tracebacks_show_no_locals(monkeypatch, fmt):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("debug", fmt)
    redact.register("known-secret-0003")
    log = structlog.get_logger("t")
    log.info("login", user="me", password="pw-logged-0004", headers={"Authorization": "Bearer tok-0005"})
    log.warning("failed", error="server said known-secret-0003 is wrong")

    def connect(password):
        raise RuntimeError("refused")

    secret = "pw-local-" + "0006"  # (the traceback quotes this file's lines)
    try:
        connect(secret)
    except RuntimeError:
        log.error("crashed", exc_info=True)
    text = out.getvalue()
    for secret in ("pw-logged-0004", "tok-0005", "known-secret-0003", "pw-local-0006"):
        assert secret not in text, text
    assert "RuntimeError: refused" in text and "user" in text
    if fmt == "json":
        assert json.loads(text.splitlines()[0])["password"] == "***"


def test_standard_library_log_records_are_scrubbed(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("info")
    redact.register("stdlib-secret-0007")
    library = logging.getLogger("some.library")
    library.propagate = False  # no handler anywhere: logging's last resort prints it, as in our processes
    library.warning("LOGIN me %s", "stdlib-secret-0007")
    assert "LOGIN me ***" in out.getvalue()
