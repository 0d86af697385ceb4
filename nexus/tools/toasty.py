"""Console Toasty server: prints each notification it gets as one line on stdout.

    python -m nexus.tools.toasty [--listen 127.0.0.1:50051] [--json] [--fail-first N]
                                 [--tls-cert FILE --tls-key FILE [--client-ca FILE]]

It prints "toasty listening on HOST:PORT" once it accepts calls (with port 0: the real
port), so scripts and tests can wait for that line. --fail-first N answers the first N
Notify calls with UNAVAILABLE, to exercise retries. With --tls-cert/--tls-key it serves
TLS only; --client-ca then also requires a client certificate signed by that CA
(mutual TLS). SIGTERM/SIGINT stop it cleanly. Embed it with
`serve(listen, on_notification=..., tls=ServerTls(...))`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc

from nexus.errors import ExitCode
from nexus.proto.toasty.v1 import toasty_pb2 as pb
from nexus.proto.toasty.v1 import toasty_pb2_grpc as pb_grpc

GRACE = 2.0  # seconds in-flight calls get to finish on stop


class ToastyServicer(pb_grpc.ToastyServicer):
    """Hands every accepted notification (and the id it got) to `on_notification`."""

    def __init__(self, on_notification: Callable[[pb.Notification, str], None], fail_first: int = 0):
        self._on_notification = on_notification
        self._fail_left = fail_first
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # calls run on a thread pool

    def Notify(self, request: pb.Notification, context: grpc.ServicerContext) -> pb.NotifyReply:
        with self._lock:
            failing = self._fail_left > 0
            if failing:
                self._fail_left -= 1
            nid = "" if failing else f"n{next(self._ids)}"  # failing: abort() raises below
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "failing on purpose (--fail-first)")
        self._on_notification(request, nid)
        return pb.NotifyReply(accepted=True, id=nid)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(status=pb.HealthReply.SERVING)


@dataclass(frozen=True)
class ServerTls:
    """PEM files: the server's certificate chain and key, and the CA that client
    certificates must be signed by (None: no client certificate asked for)."""

    cert_file: str
    key_file: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        client_ca = read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(read(self.key_file), read(self.cert_file))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


def serve(
    listen: str,
    on_notification: Callable[[pb.Notification, str], None],
    fail_first: int = 0,
    max_workers: int = 4,
    tls: ServerTls | None = None,
) -> tuple[grpc.Server, int]:
    """Start a Toasty server on `listen` (host:port), TLS if `tls`; returns (server, bound port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    pb_grpc.add_ToastyServicer_to_server(ToastyServicer(on_notification, fail_first), server)
    try:
        port = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    except RuntimeError as exc:  # newer grpcio raises instead of returning 0
        raise OSError(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server, port


def urgency_name(note: pb.Notification) -> str:
    return pb.Urgency.Name(note.urgency or pb.NORMAL)  # unspecified (0) means NORMAL


def as_dict(note: pb.Notification, nid: str) -> dict:
    return {
        "id": nid,
        "app": note.app,
        "urgency": urgency_name(note),
        "title": note.title,
        "body": note.body,
        "tag": note.tag,
        "event_id": note.event_id,
        "correlation_id": note.correlation_id,
    }


def as_line(note: pb.Notification, nid: str) -> str:
    # One notification, one line: newlines in the text would break line-based readers.
    def flat(s: str) -> str:
        return " ".join(s.split())

    extra = "".join(
        f" {k}={v}" for k, v in (("tag", note.tag), ("event", note.event_id), ("corr", note.correlation_id)) if v
    )
    return f"[{urgency_name(note)}] {flat(note.app)}: {flat(note.title)} | {flat(note.body)} (id={nid}{extra})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nexus.tools.toasty", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:50051", help="host:port (port 0 picks a free one)")
    ap.add_argument("--json", action="store_true", help="print each notification as a JSON object")
    ap.add_argument(
        "--fail-first", type=int, default=0, metavar="N", help="answer the first N Notify calls with UNAVAILABLE"
    )
    ap.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain (PEM)")
    ap.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    ap.add_argument(
        "--client-ca", metavar="FILE", help="require client certificates signed by this CA (PEM; needs --tls-cert)"
    )
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key) or (args.client_ca and not args.tls_cert):
        ap.error("--tls-cert and --tls-key go together, and --client-ca needs them")
    tls = ServerTls(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None

    out_lock = threading.Lock()

    def show(note: pb.Notification, nid: str) -> None:
        line = json.dumps(as_dict(note, nid), ensure_ascii=False) if args.json else as_line(note, nid)
        with out_lock:
            print(line, flush=True)

    stop = threading.Event()
    # The handlers only set a flag; the main thread does the shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server, port = serve(args.listen, show, fail_first=args.fail_first, tls=tls)
    except OSError as exc:  # a missing cert file too (FileNotFoundError)
        print(f"toasty: {exc}", file=sys.stderr, flush=True)
        return ExitCode.FAILURE
    host = args.listen.rsplit(":", 1)[0]
    with out_lock:
        print(f"toasty listening on {host}:{port}", flush=True)
    while not stop.wait(1.0):  # a timed wait so signals are handled promptly everywhere
        pass
    server.stop(GRACE).wait()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
