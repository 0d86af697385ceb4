"""`nexus tokens`: create, list, revoke (real files, the real CLI parser; one run as a real
`python -m nexus` process for stdout/stderr and the exit code), and a TokenStore that is
in use sees each edit."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from nexus.cli.commands import main
from nexus.gateway.tokens import TokenStore
from nexus.testing import wait_for


def test_create_list_revoke(tmp_path, capsys):
    path = str(tmp_path / "tokens.yaml")
    store = TokenStore(path)
    capsys.readouterr()  # (its log line)
    args = ["tokens", "create", "parrot", "--sources", "parrot*", "--types", "parrot.*", "--rate", "20"]
    assert main([*args, "--file", path]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n" and token.startswith("nxg_")  # the token alone on stdout
    assert "shown once" in err and token not in err
    assert token not in open(path).read() and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    grant = wait_for(lambda: store.authenticate(f"Bearer {token}"), timeout=5, message="the new token")
    capsys.readouterr()
    assert grant.may_send("parrot-desk", "parrot.captured") and grant.rate == 20 and not grant.may_read("x")

    # an existing name is refused, and the first token still works
    assert main([*args, "--file", path]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main(["tokens", "create", "tail", "--subscribe", "mail.*", "--file", path]) == 0
    reader = capsys.readouterr().out.strip()

    assert main(["tokens", "list", "--json", "--file", path]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in listed["tokens"]] == ["parrot", "tail"]
    assert listed["tokens"][0]["sources"] == ["parrot*"] and listed["tokens"][1]["subscribe"] == ["mail.*"]
    assert main(["tokens", "list", "--file", path]) == 0
    table = capsys.readouterr().out
    assert "parrot" in table and "types parrot.*" in table
    for secret in (token, reader, "sha256"):
        assert secret not in json.dumps(listed) and secret not in table

    assert main(["tokens", "revoke", "parrot", "--file", path]) == 0
    assert "within a second" in capsys.readouterr().out
    wait_for(lambda: store.authenticate(f"Bearer {token}") is None, timeout=5, message="the revoke")
    capsys.readouterr()
    assert store.authenticate(f"Bearer {reader}").may_read("mail.received")
    assert main(["tokens", "revoke", "parrot", "--file", path]) == 1
    assert "no token named parrot" in capsys.readouterr().err


def test_bad_input_gets_one_line(tmp_path, capsys):
    path = str(tmp_path / "tokens.yaml")
    cases = [
        (["create", "bad name", "--subscribe", "x"], "token name 'bad name'"),
        (["create", "a", "--sources", "s"], "--sources and --types go together"),
        (["create", "a"], "a token needs --sources and --types"),
        (["create", "a", "--subscribe", "x", "--rate", "-1"], "--rate -1"),
        (["create", "a", "--subscribe", "x", "--rate", "nan"], "--rate nan"),
        (["create", "a", "--subscribe", " "], "--subscribe: an empty glob"),
    ]
    for argv, message in cases:
        assert main(["tokens", *argv, "--file", path]) == 3, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not os.path.exists(path)  # nothing was written
    with open(path, "w") as f:
        f.write("tokens: [unclosed")
    os.chmod(path, 0o600)
    assert main(["tokens", "create", "a", "--subscribe", "x", "--file", path]) == 3
    err = capsys.readouterr().err
    assert "not YAML" in err and err.count("\n") == 1
    assert open(path).read() == "tokens: [unclosed"  # left as it was


def test_default_file_is_in_the_data_dir_and_the_cli_is_a_real_process(tmp_path, config_factory):
    cfg = config_factory()
    env = {**os.environ, "NEXUS_CONFIG": str(cfg)}
    run = subprocess.run(
        [sys.executable, "-m", "nexus", "tokens", "create", "ui", "--subscribe", "*"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip()
    path = tmp_path / "var" / "gateway-tokens.yaml"
    assert str(path) in run.stderr and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert TokenStore(str(path)).authenticate(f"Bearer {token}").name == "ui"
    run = subprocess.run(
        [sys.executable, "-m", "nexus", "tokens", "revoke", "nope"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
