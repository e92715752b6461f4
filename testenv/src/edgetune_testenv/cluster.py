"""One local Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and a kwok controller, all real binaries built from the pinned Go modules.

Several can run at once; each has its own ports, certificates, data directory and kubeconfig.
"""

from __future__ import annotations

import base64
import functools
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from edgetune_testenv import binaries
from edgetune_testenv.errors import EnvironmentSetupError
from edgetune_testenv.nodes import KWOK_ANNOTATION, NodeSpec
from edgetune_testenv.pki import Pki
from edgetune_testenv.procs import ManagedProcess, ProcessGroup, free_port, http_ok

#: Pods carrying this label are run by the pod executor; kwok leaves their lifecycle alone.
EXECUTOR_LABEL = "edgetune.io/executor"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
CONTROLLER_MANAGER_QPS = (20, 30)
"""kube-controller-manager's ``--kube-api-qps``/``--kube-api-burst``: upstream's defaults."""
SCHEDULER_QPS = (200, 400)
"""kube-scheduler's client QPS/burst (upstream: 50/100): raised so binding is never what a benchmark
of 1000 pods measures; the same for the operator's trainer pods and plain Jobs' pods."""


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _kwok_stages(share: Path, *, fake_pods: bool = True) -> list[dict[str, Any]]:
    """kwok's own fast stages, with pod stages narrowed to pods the executor does not run; without
    ``fake_pods`` kwok fakes no pod's lifecycle at all (an executor runs every pod)."""
    stages: list[dict[str, Any]] = []
    not_executed = {"key": f'.metadata.labels["{EXECUTOR_LABEL}"]', "operator": "DoesNotExist"}
    for name in ("node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete"):
        if name in ("pod-ready", "pod-complete") and not fake_pods:
            continue
        stage = yaml.safe_load((share / f"{name}.yaml").read_text())
        if name in ("pod-ready", "pod-complete"):
            stage["spec"]["selector"]["matchExpressions"].append(not_executed)
        stages.append(stage)
    return stages


#: kwok's `Logs` kind (kwok.x-k8s.io/v1alpha1), schema left open: kwok reads it, we write it.
KWOK_LOGS_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "logs.kwok.x-k8s.io"},
    "spec": {
        "group": "kwok.x-k8s.io",
        "scope": "Namespaced",
        "names": {"kind": "Logs", "listKind": "LogsList", "plural": "logs", "singular": "logs"},
        "versions": [{
            "name": "v1alpha1", "served": True, "storage": True, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        }],
    },
}  # fmt: skip


class ControlPlane(ProcessGroup):
    """A running (or stopped) local cluster. Use as a context manager or call start()/stop()."""

    def __init__(self, name: str, workdir: Path | None = None, *, audit_users: tuple[str, ...] = (),
                 fake_pods: bool = True) -> None:  # fmt: skip
        """``audit_users``: record every request these users make (audit level Metadata) in
        ``audit_log``: how benchmarks count an operator's calls from the API server's side.
        ``fake_pods=False``: kwok fakes no pod (pods stay Pending until an executor that runs every
        pod, ``PodExecutor(label_selector="")``, runs them): the local environment's mode."""
        super().__init__(name, workdir)
        self.fake_pods = fake_pods
        self.kubeconfig = self.workdir / "kubeconfig"
        self.audit_users = audit_users
        self.audit_log = self.workdir / "logs" / "audit.log"
        self.api_port = 0
        self.kubelet_port = 0
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> ControlPlane:
        kube = binaries.ensure(binaries.KUBE)
        kwok_dir = binaries.ensure(binaries.KWOK)
        try:
            self._start(kube, kwok_dir, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, kube: Path, kwok_dir: Path, timeout: float) -> None:
        pki = Pki(self.workdir / "pki")
        self._pki = pki
        apiserver_cert = pki.issue(
            "apiserver",
            "kube-apiserver",
            server_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            server_ips=("127.0.0.1", SERVICE_IP),
            client=False,
        )
        sa = pki.service_account_keys()
        admin = pki.issue("admin", "edgetune-admin", orgs=("system:masters",))
        self._admin = admin
        logs = self.workdir / "logs"

        etcd_client, etcd_peer = free_port(), free_port()
        etcd = self.launch(
            ManagedProcess(
                f"{self.name}/etcd",
                [
                    str(kube / "etcd"),
                    "--name=default",
                    f"--data-dir={self.workdir / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
                    f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                    f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                    "--unsafe-no-fsync=true",  # test data only: trades durability for speed
                    "--log-level=warn",
                ],
                logs / "etcd.log",
                ports=(etcd_client, etcd_peer),
            )
        )
        etcd.wait_until(lambda: http_ok(f"http://127.0.0.1:{etcd_client}/health"), timeout, "healthy")

        self.api_port = free_port()
        apiserver = self.launch(
            ManagedProcess(
                f"{self.name}/kube-apiserver",
                [
                    str(kube / "kube-apiserver"),
                    f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={self.api_port}",
                    f"--tls-cert-file={apiserver_cert.cert}",
                    f"--tls-private-key-file={apiserver_cert.key}",
                    f"--client-ca-file={pki.ca.cert}",
                    f"--service-account-key-file={sa.cert}",
                    f"--service-account-signing-key-file={sa.key}",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--authorization-mode=Node,RBAC",
                    "--allow-privileged=true",
                    # kwok's nodes carry only an InternalIP (loopback): `kubectl logs` reaches kwok's
                    # kubelet-like server there, which serves the executor's container logs.
                    "--kubelet-preferred-address-types=InternalIP",
                    f"--cert-dir={self.workdir / 'pki'}",
                    "--profiling=false",
                    "--v=1",
                    *self._audit_flags(),
                ],
                logs / "kube-apiserver.log",
                ports=(self.api_port,),
            )
        )
        self._write_kubeconfig(self.kubeconfig, admin.cert, admin.key, "edgetune-admin")
        apiserver.wait_until(lambda: http_ok(f"{self.server}/readyz", self.ssl_context()), timeout, "ready")

        cm_kubeconfig = self._client_kubeconfig("controller-manager", "system:kube-controller-manager")
        cm_port = free_port()
        cm = self.launch(
            ManagedProcess(
                f"{self.name}/kube-controller-manager",
                [
                    str(kube / "kube-controller-manager"),
                    f"--kubeconfig={cm_kubeconfig}",
                    f"--authentication-kubeconfig={cm_kubeconfig}",
                    f"--authorization-kubeconfig={cm_kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={cm_port}",
                    f"--service-account-private-key-file={sa.key}",
                    f"--root-ca-file={pki.ca.cert}",
                    "--use-service-account-credentials=true",
                    # Upstream's default client rate limit, stated: the Job controller creates pods at
                    # this rate for the operator's trainer Jobs and for plain Jobs alike.
                    f"--kube-api-qps={CONTROLLER_MANAGER_QPS[0]}",
                    f"--kube-api-burst={CONTROLLER_MANAGER_QPS[1]}",
                    "--leader-elect=false",
                    f"--cluster-name={self.name}",
                    "--v=1",
                ],
                logs / "kube-controller-manager.log",
                ports=(cm_port,),
            )
        )

        sched_kubeconfig = self._client_kubeconfig("scheduler", "system:kube-scheduler")
        sched_config = self.workdir / "scheduler.yaml"
        sched_config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "clientConnection": {
                        "kubeconfig": str(sched_kubeconfig),
                        "qps": SCHEDULER_QPS[0],
                        "burst": SCHEDULER_QPS[1],
                    },
                    "leaderElection": {"leaderElect": False},
                }
            )
        )
        sched_port = free_port()
        scheduler = self.launch(
            ManagedProcess(
                f"{self.name}/kube-scheduler",
                [
                    str(kube / "kube-scheduler"),
                    f"--config={sched_config}",
                    f"--authentication-kubeconfig={sched_kubeconfig}",
                    f"--authorization-kubeconfig={sched_kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={sched_port}",
                    "--v=1",
                ],
                logs / "kube-scheduler.log",
                ports=(sched_port,),
            )
        )

        # `kubectl logs` for executor-run pods: the executor writes CRI-format log files and a kwok
        # `Logs` object per pod naming them; kwok serves them as a kubelet would.
        self._post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", KWOK_LOGS_CRD)
        apiserver.wait_until(lambda: self._get("/apis/kwok.x-k8s.io/v1alpha1/logs") is not None, timeout,
                             "serving kwok's Logs CRD")  # fmt: skip
        self.kubelet_port = free_port()
        kwok_config = self.workdir / "kwok.yaml"
        kwok_config.write_text(yaml.safe_dump_all(_kwok_stages(kwok_dir / "share", fake_pods=self.fake_pods)))
        kwok = self.launch(
            ManagedProcess(
                f"{self.name}/kwok",
                [
                    str(kwok_dir / "kwok"),
                    f"--kubeconfig={self.kubeconfig}",
                    f"--config={kwok_config}",
                    "--manage-all-nodes=false",
                    f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                    "--node-lease-duration-seconds=40",
                    "--cidr=10.244.0.0/16",
                    "--node-ip=127.0.0.1",
                    f"--node-port={self.kubelet_port}",
                    f"--server-address=127.0.0.1:{self.kubelet_port}",
                    "--enable-crds=Logs",
                ],
                logs / "kwok.log",
            )
        )

        # Ready means: controllers and scheduler answer health checks, and the service-account
        # controller has made the "default" ServiceAccount (pods cannot be created before it).
        for proc, port in ((cm, cm_port), (scheduler, sched_port)):
            healthz = f"https://127.0.0.1:{port}/healthz"
            proc.wait_until(functools.partial(http_ok, healthz, _insecure()), timeout, "healthy")
        apiserver.wait_until(
            lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            timeout,
            "ready (default ServiceAccount)",
        )
        kwok.check_alive()

    def _audit_flags(self) -> list[str]:
        if not self.audit_users:
            return []
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [{"level": "Metadata", "users": list(self.audit_users)}, {"level": "None"}],
        }))  # fmt: skip
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
                "--audit-log-maxsize=0"]  # fmt: skip

    def audit_events(self, user: str, since: float, until: float) -> list[dict[str, Any]]:
        """The requests ``user`` (one of ``audit_users``) made between two wall-clock times, as the
        audit log recorded them (a watch when it ended)."""
        if not self.audit_log.exists():
            return []
        events = []
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line) if line.strip() else {}
            if (event.get("user") or {}).get("username") != user:
                continue
            when = datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            if since <= when <= until:
                events.append(event)
        return events

    def user_kubeconfig(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for a client certificate of ``user`` in ``groups`` (e.g. ``system:masters``):
        an identity of its own, so the API server's audit log can tell its requests apart."""
        cert = self._pki.issue(user, user, orgs=groups)
        path = self.workdir / f"{user}.kubeconfig"
        self._write_kubeconfig(path, cert.cert, cert.key, user)
        return path

    def process(self, component: str) -> ManagedProcess:
        for proc in self.processes:
            if proc.name.endswith("/" + component):
                return proc
        raise KeyError(component)

    # -- access --------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self._pki.ca.cert))
            ctx.load_cert_chain(str(self._admin.cert), str(self._admin.key))
            self._ssl = ctx
        return self._ssl

    def _client_kubeconfig(self, stem: str, user: str) -> Path:
        """A client certificate for ``user`` (a built-in RBAC identity) and a kubeconfig using it."""
        cert = self._pki.issue(stem, user)
        path = self.workdir / f"{stem}.kubeconfig"
        self._write_kubeconfig(path, cert.cert, cert.key, user)
        return path

    def _write_kubeconfig(self, path: Path, cert: Path, key: Path, user: str) -> None:
        """A kubeconfig whose cluster, user and context entries are named after this control plane
        (the user ``<user>@<plane>``): kubeconfigs of several planes merge (``KUBECONFIG=a:b``)
        without one plane's credentials shadowing another's."""
        user = f"{user}@{self.name}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {"server": self.server, "certificate-authority-data": _b64(self._pki.ca.cert)},
                }
            ],
            "users": [{"name": user, "user": {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": user}}],
            "current-context": self.name,
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def _post(self, api_path: str, body: dict[str, Any]) -> None:
        data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        request = urllib.request.Request(self.server + api_path, data=data, method="POST", headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=10):  # noqa: S310
                pass
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already exists (a restarted control plane on the same etcd)
                raise

    def _get(self, api_path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(  # noqa: S310
                self.server + api_path, context=self.ssl_context(), timeout=5
            ) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def kubectl(
        self, *args: str, input_text: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster."""
        kubectl = binaries.binary(binaries.KUBE, "kubectl")
        proc = subprocess.run(
            [str(kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise EnvironmentSetupError(
                f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def add_nodes(self, nodes: Iterable[NodeSpec], wait_ready: bool = True, timeout: float = 120.0) -> list[str]:
        """Create simulated nodes and (by default) wait until kwok reports every one Ready."""
        from kubernetes import client as k8s  # noqa: PLC0415

        api = k8s.CoreV1Api(self.api_client())
        names: list[str] = []
        for spec in nodes:
            manifest = spec.to_manifest()
            api.create_node(manifest)
            names.append(spec.name)
        if wait_ready:
            deadline = time.monotonic() + timeout
            pending = set(names)
            while pending:
                self.check_alive()
                ready = {
                    n.metadata.name
                    for n in api.list_node(label_selector="type=kwok").items
                    if any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
                }
                pending -= ready
                if not pending:
                    break
                if time.monotonic() > deadline:
                    raise EnvironmentSetupError(
                        f"{self.name}: kwok did not mark {len(pending)} node(s) Ready in {timeout:.0f} s "
                        f"(e.g. {sorted(pending)[:3]}); kwok log:\n{self.process('kwok').log_tail()}"
                    )
                time.sleep(0.2)
        return names

    def api_client(self) -> Any:
        """A fresh ``kubernetes.client.ApiClient`` for this cluster (callers close it when done)."""
        from kubernetes import config as k8s_config  # noqa: PLC0415

        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig))


def _insecure() -> ssl.SSLContext:
    # Controller-manager and scheduler serve health on self-signed certificates of their own.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
