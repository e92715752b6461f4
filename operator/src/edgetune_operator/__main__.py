"""``python -m edgetune_operator``: run the operator (cluster-wide; with ``EDGETUNE_LEADER_ELECTION``,
one of several replicas, elected over a Lease)."""

from __future__ import annotations

import argparse
import faulthandler
import http.server
import logging
import os
import signal
import socket
import sys
import threading
import uuid

# kopf registers a login fallback through the official Kubernetes client whenever it can import it,
# and that import alone loads every API model: ~45 MB, a third of the operator's memory. The operator
# logs in and talks to the API with its own client (clients/kube.py) and its image does not install
# the official one; a development environment has it (the CLI, the tests), so it is marked absent
# here, before kopf looks, and the operator runs as it does in its image.
sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]

import kopf  # noqa: E402

from edgetune_operator import handlers  # noqa: E402
from edgetune_operator.clients.kube import InCluster, Kube  # noqa: E402
from edgetune_operator.leader import LeaderElection  # noqa: E402
from edgetune_operator.settings import Settings  # noqa: E402

log = logging.getLogger("edgetune")


class _StandbyHealth(http.server.BaseHTTPRequestHandler):
    """/healthz while waiting for the Lease: a standby is alive, so its liveness probe must pass."""

    def do_GET(self) -> None:
        ok = self.path.startswith("/healthz")
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"standby\n" if ok else b"")

    def log_message(self, *_: object) -> None:
        pass


def _elect(port: int) -> LeaderElection:
    settings = handlers.SETTINGS
    pod = InCluster.detect()
    namespace = settings.leader_election_namespace or (pod.namespace if pod else None) or "default"
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    election = LeaderElection(Kube.from_environment(), namespace=namespace, identity=identity)
    standby = None
    if port:
        standby = http.server.ThreadingHTTPServer(("0.0.0.0", port), _StandbyHealth)  # noqa: S104 - the pod's probe
        threading.Thread(target=standby.serve_forever, name="standby-health", daemon=True).start()
    try:
        election.wait_until_leader()
    finally:
        if standby is not None:
            standby.shutdown()
            standby.server_close()  # kopf's liveness endpoint takes the port over

    def lost() -> None:
        # Another replica may take over once the Lease expires: stop at once, never reconcile beside it.
        log.error("leadership lost; exiting so that Kubernetes restarts this replica as a standby")
        os._exit(1)

    election.keep_renewing(lost)
    return election


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="edgetune-operator", description=__doc__, epilog=Settings.describe(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # kopf logs every handler's success; for the per-event job handler that is one line per watch event.
    logging.getLogger("kopf.objects").addFilter(
        lambda record: "'training_job_event' succeeded" not in record.getMessage()
    )
    # `kill -USR1 <pid>` writes every thread's stack to stderr: what a stuck operator is waiting on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    settings = handlers.SETTINGS
    election = _elect(settings.health_port) if settings.leader_election else None
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    try:
        if settings.namespaces:
            kopf.run(namespaces=settings.namespaces, standalone=True, liveness_endpoint=liveness)
        else:
            kopf.run(clusterwide=True, standalone=True, liveness_endpoint=liveness)
    finally:
        if election is not None:
            election.release()


if __name__ == "__main__":
    main()
