"""Faults made with real components, for the operator's "bad input" tests and bench/chaos.py.

``Throttle``: the API server itself answers 429 Too Many Requests to every request of one user,
through API Priority and Fairness. A FlowSchema sends the user to a priority level with no seats of
its own and nothing to borrow, rejecting what cannot run at once; such a level still lets one
request run while it is idle (so nothing starves), so seat holders keep that one seat busy with
lists that wait about 3 s on the server (a resourceVersion the watch cache has not reached).

``SlowProxy``: a TCP proxy in front of a real API server that holds every chunk a client sends for
``delay`` seconds: TLS goes through untouched (the certificates still verify), each request answers
seconds late, and a watch, once started, streams at full speed.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

import yaml

from edgetune_testenv.cluster import ControlPlane

JAIL = "edgetune-test-jail"
HOLD_PATH = "/api/v1/nodes?resourceVersion=999999999&resourceVersionMatch=NotOlderThan&limit=1"
"""A list the watch cache cannot serve yet: the server waits about 3 s for it, holding its seat."""


def _jail(user: str) -> dict[str, Any]:
    limited = {"nominalConcurrencyShares": 0, "lendablePercent": 0, "borrowingLimitPercent": 0,
               "limitResponse": {"type": "Reject"}}  # fmt: skip
    any_resource = {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": True, "namespaces": ["*"]}
    rule = {"subjects": [{"kind": "User", "user": {"name": user}}], "resourceRules": [any_resource],
            "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}  # fmt: skip
    api = "flowcontrol.apiserver.k8s.io/v1"
    level = {"apiVersion": api, "kind": "PriorityLevelConfiguration", "metadata": {"name": JAIL},
             "spec": {"type": "Limited", "limited": limited}}  # fmt: skip
    schema = {"apiVersion": api, "kind": "FlowSchema", "metadata": {"name": JAIL},
              "spec": {"priorityLevelConfiguration": {"name": JAIL}, "matchingPrecedence": 100,
                       "distinguisherMethod": {"type": "ByUser"}, "rules": [rule]}}  # fmt: skip
    return {"apiVersion": "v1", "kind": "List", "items": [level, schema]}


def _ssl_from_kubeconfig(path: Path) -> tuple[str, ssl.SSLContext]:
    config = yaml.safe_load(path.read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    folder = Path(tempfile.mkdtemp(prefix="edgetune-throttle-"))
    (folder / "ca.crt").write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    (folder / "tls.crt").write_bytes(base64.b64decode(user["client-certificate-data"]))
    (folder / "tls.key").write_bytes(base64.b64decode(user["client-key-data"]))
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    context.load_cert_chain(str(folder / "tls.crt"), str(folder / "tls.key"))
    return cluster["server"], context


class Throttle:
    """Every request of ``user`` on ``plane`` answered 429 by the API server while active.

    ``kubeconfig()`` is the user's own (a client certificate; cluster-admin through a
    ClusterRoleBinding, not ``system:masters``, whose requests APF exempts). The binding stays: a
    client may go on using that kubeconfig for a while after the throttle stops."""

    def __init__(self, plane: ControlPlane, user: str = "edgetune-throttled", holders: int = 2) -> None:
        self.plane = plane
        self.user = user
        self.holders = holders
        self.path = plane.user_kubeconfig(user)
        plane.kubectl("create", "clusterrolebinding", user, "--clusterrole=cluster-admin", f"--user={user}")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def kubeconfig(self) -> str:
        return self.path.read_text()

    def start(self) -> Self:
        self.plane.kubectl("apply", "-f", "-", input_text=json.dumps(_jail(self.user)))
        server, context = _ssl_from_kubeconfig(self.path)
        self._stop.clear()
        self._threads = [threading.Thread(target=self._hold, args=(server, context), daemon=True,
                                          name=f"throttle-{i}") for i in range(self.holders)]  # fmt: skip
        for thread in self._threads:
            thread.start()
        return self

    def _hold(self, server: str, context: ssl.SSLContext) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(server + HOLD_PATH, context=context, timeout=30) as response:  # noqa: S310 - https
                    response.read()
            except urllib.error.HTTPError as exc:  # 504 after the server's wait: the seat was held meanwhile
                if exc.code == 429:
                    time.sleep(0.005)  # back for the seat within milliseconds of its release
            except OSError:
                time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self.plane.kubectl("delete", "flowschema,prioritylevelconfiguration", JAIL, "--ignore-not-found")
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SlowProxy:
    """127.0.0.1:``port`` forwards to ``target`` (host, port); what clients send waits ``delay`` s."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="slow-proxy")

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def _accept(self) -> None:
        self._listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        with client, upstream:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.5)
                try:
                    for sock in ready:
                        data = sock.recv(65536)
                        if not data:
                            return
                        if sock is client:
                            time.sleep(self.delay)  # a request (or a TLS handshake step) arrives late
                            upstream.sendall(data)
                        else:
                            client.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
