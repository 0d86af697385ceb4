"""Health probe for containers: GET /healthz or /readyz of the launcher's HTTP port.

    python -m nexus.tools.probe [-c CONFIG] [--env ENV] [--timeout S] [PATH]

Exit 0 when the answer is 200, 1 otherwise, with one line saying why. The address and
the bearer token come from the config's `http:` section (the same file and overlay the
launcher reads, `$NEXUS_CONFIG` and `$NEXUS_ENV` by default), so a probe needs no token
of its own: a container HEALTHCHECK and a Kubernetes exec probe run just this. (A
Kubernetes httpGet probe cannot send a header read from a Secret; the HTTP port wants the
token on every request once it listens beyond loopback.) A wildcard listen address
(0.0.0.0, ::) is probed on loopback. Standard library only: slim images have no curl.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

from nexus import config as config_mod
from nexus.common import redact
from nexus.errors import ConfigError, ExitCode
from nexus.http.listen import local_url


def url_of(listen: str, path: str) -> str:
    """http://HOST:PORT/PATH for a `http.listen` value; wildcards become loopback."""
    return local_url(listen, path)


def probe(cfg: config_mod.Config, path: str, timeout: float) -> tuple[bool, str]:
    """(ok, one line): ok only for a 200 answer."""
    if not cfg.http.listen:
        return False, f"{cfg.source}: http.listen is off: nothing to probe"
    try:
        url = url_of(cfg.http.listen, path)
    except ConfigError as exc:
        return False, f"{cfg.source}: {exc}"
    request = urllib.request.Request(url)
    if cfg.http.token:
        request.add_header("Authorization", f"Bearer {cfg.http.token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status == 200, f"{url}: {answer.status} {answer.read(200).decode(errors='replace')}"
    except urllib.error.HTTPError as exc:  # 503 with the reasons, 401 for a wrong token
        return False, f"{url}: {exc.code} {exc.read(300).decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nexus.tools.probe", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="/healthz", help="/healthz (default) or /readyz")
    parser.add_argument("-c", "--config", help="config file (default: $NEXUS_CONFIG or config/default.yaml)")
    parser.add_argument("--env", help="config overlay name (default: $NEXUS_ENV)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.env)
    except ConfigError as exc:
        print(f"nexus probe: {redact.scrub(str(exc))}", file=sys.stderr)
        return int(exc.exit_code)
    ok, line = probe(cfg, args.path, args.timeout)
    print(redact.scrub(" ".join(line.split())), file=sys.stdout if ok else sys.stderr)
    return int(ExitCode.OK) if ok else 1


if __name__ == "__main__":
    sys.exit(main())
