"""`nexus keys`: generate, authorize, list, revoke (real files, the real CLI parser)."""

from __future__ import annotations

import json
import os
import stat

import zmq.auth

from nexus.cli.commands import main
from nexus.protocol.curve import KeyPair
from nexus.protocol.gatekeeper import KeyRing


def test_generate_authorize_list_revoke(tmp_path, capsys):
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    assert main(["keys", "generate", "mailhost", "--dir", str(keys)]) == 0
    out = capsys.readouterr().out
    public, secret = zmq.auth.load_certificate(keys / "mailhost.key_secret")
    assert public.decode() in out and secret.decode() not in out  # the secret is never printed
    assert stat.S_IMODE(os.stat(keys / "mailhost.key_secret").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700

    # a second key of that name is refused; so is authorizing a secret file
    assert main(["keys", "generate", "mailhost", "--dir", str(keys)]) == 1
    assert "exists already" in capsys.readouterr().err
    args = ["keys", "authorize", "mailhost", "--role", "producer", "--sources", "mail*", "--types", "mail.*"]
    assert main([*args[:3], str(keys / "mailhost.key_secret"), *args[3:], "--dir", str(authorized)]) == 3
    assert "holds a secret key" in capsys.readouterr().err
    assert main(["keys", "authorize", "m2", str(keys / "mailhost.key"), "--role", "producer", "--dir", "x"]) == 3
    assert "needs --sources and --types" in capsys.readouterr().err

    assert main([*args[:3], str(keys / "mailhost.key"), *args[3:], "--dir", str(authorized)]) == 0
    ring = KeyRing(str(authorized), KeyPair(b"0" * 40))
    assert ring.scan() == set()
    grant = ring.by_name["mailhost"]
    assert grant.may_send("mail:inbox", "mail.received") and not grant.may_send("parrot", "mail.received")
    capsys.readouterr()
    assert main(["keys", "list", "--dir", str(authorized), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["keys"] == [grant.describe()] and listed["unusable"] == {}

    assert main(["keys", "revoke", "mailhost", "--dir", str(authorized)]) == 0
    assert ring.scan() == {"mailhost"}  # a running router would close its connections now
    assert not list(authorized.iterdir())
    assert main(["keys", "revoke", "mailhost", "--dir", str(authorized)]) == 1


def test_a_key_without_its_grant_is_not_loaded(tmp_path, capsys):
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    zmq.auth.create_certificates(str(authorized), "bare")
    os.unlink(authorized / "bare.key_secret")
    ring = KeyRing(str(authorized), KeyPair(b"0" * 40))
    ring.scan()
    assert "bare" not in ring.by_name  # fail closed: no role, no access
    assert main(["keys", "list", "--dir", str(authorized)]) == 0
    assert "no bare.yaml beside bare.key" in capsys.readouterr().out
