"""Kubernetes: a thin, typed client for the handful of resources the operator touches, on the local
cluster and on every registered edge cluster, over urllib3.

Objects go in and come out as plain dicts (the wire format), which is what the pure reconcile
functions consume; errors come out as three exceptions the controllers act on. Calls are
synchronous: kopf runs our handlers in its thread pool.

Why not the official ``kubernetes`` client: the operator used only its ``ApiClient.call_api`` and its
kubeconfig loader, and importing it loads every API model (~800 modules, ~45 MB of the operator's
resident memory, a third of it; and kopf imports it too when it can, for a login fallback). What it
did for us is here: kubeconfig (a dict or ``$KUBECONFIG``) or the pod's service account to a
:class:`Connection`, a TLS context, bearer-token refresh, JSON in and out, streamed watches.
"""

from __future__ import annotations

import base64
import builtins
import json
import os
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import urllib3
import yaml

from edgetune_api.meta import GROUP, VERSION
from edgetune_operator import metrics

#: (connect, read) seconds: an unreachable edge cluster must fail fast, not hold a worker thread.
TIMEOUT = (3.0, 20.0)
FIELD_MANAGER = "edgetune-operator"
POOL_SIZE = 40
"""Connections kept per cluster: a release writes up to 32 pod annotations at once, plus watches
and reconciles (beyond the pool, urllib3 would open and drop a TLS connection per request)."""
TOKEN_REREAD_SECONDS = 60.0
"""A token file (the pod's projected service-account token) is read again this often: the kubelet
rotates it, and the API server refuses the old one once it expires."""


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


_PATH_FIELDS = ("certificate-authority", "client-certificate", "client-key", "tokenFile")


def _absolute(item: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A kubeconfig entry with its relative file paths taken from ``folder`` (that of the file naming
    them, as kubectl does)."""
    body = next((k for k in ("cluster", "user") if isinstance(item.get(k), dict)), None)
    if body is None:
        return item
    fields = dict(item[body])
    for key in _PATH_FIELDS:
        if fields.get(key) and not Path(str(fields[key])).expanduser().is_absolute():
            fields[key] = str(folder / str(fields[key]))
    return {**item, body: fields}


class KubeconfigError(ValueError):
    """A kubeconfig the operator cannot use; the message says which part and why."""


@dataclass(frozen=True)
class Connection:
    """Where an API server is and how to authenticate to it: what a kubeconfig context or a pod's
    service account says. PEM material is held as text; ``*_path`` fields name files read when the
    client is built (``token_path`` again every :data:`TOKEN_REREAD_SECONDS`)."""

    server: str
    ca_pem: str | None = None
    ca_path: str | None = None
    insecure: bool = False
    token: str | None = None
    token_path: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    username: str | None = None
    password: str | None = None
    namespace: str | None = None

    @classmethod
    def from_kubeconfig(cls, config: Any) -> Connection:
        """The current context of a parsed kubeconfig. Exec plugins and auth providers are refused by
        name: the operator runs no programs a Secret names."""
        if not isinstance(config, dict):
            raise KubeconfigError("not a kubeconfig (expected a YAML mapping with clusters, users and contexts)")

        def named(section: str, name: str | None) -> dict[str, Any]:
            for item in config.get(section) or []:
                if isinstance(item, dict) and item.get("name") == name:
                    value = item.get(section[:-1]) or {}
                    return value if isinstance(value, dict) else {}
            raise KubeconfigError(f"{section[:-1]} {name!r} is not in the kubeconfig's {section}")

        current = config.get("current-context")
        if not current:
            contexts = config.get("contexts") or []
            if len(contexts) != 1:
                raise KubeconfigError("current-context is not set (and there is not exactly one context)")
            current = contexts[0].get("name")
        context = named("contexts", current)
        cluster = named("clusters", context.get("cluster"))
        user = named("users", context.get("user")) if context.get("user") else {}
        for unsupported in ("exec", "auth-provider"):
            if unsupported in user:
                raise KubeconfigError(
                    f"user {context.get('user')!r} authenticates with {unsupported!r}, which the operator does "
                    "not run: give it a token or a client certificate"
                )
        server = cluster.get("server")
        if not server:
            raise KubeconfigError(f"cluster {context.get('cluster')!r} has no server")

        def path(value: Any) -> str | None:
            if not value:
                return None
            return str(Path(str(value)).expanduser())

        def pem(value: Any) -> str | None:
            return base64.b64decode(value).decode() if value else None

        return cls(
            server=str(server).rstrip("/"), ca_pem=pem(cluster.get("certificate-authority-data")),
            ca_path=path(cluster.get("certificate-authority")), insecure=bool(cluster.get("insecure-skip-tls-verify")),
            token=user.get("token"), token_path=path(user.get("tokenFile")),
            cert_pem=pem(user.get("client-certificate-data")), key_pem=pem(user.get("client-key-data")),
            cert_path=path(user.get("client-certificate")), key_path=path(user.get("client-key")),
            username=user.get("username"), password=user.get("password"), namespace=context.get("namespace"),
        )  # fmt: skip

    @classmethod
    def from_kubeconfig_files(cls, environ: dict[str, str] | None = None) -> Connection:
        """``$KUBECONFIG`` (several files joined by ``os.pathsep``: the first value of each entry
        wins, as kubectl merges them) or ``~/.kube/config``."""
        env = dict(os.environ) if environ is None else environ
        paths = [Path(p).expanduser() for p in env.get("KUBECONFIG", "").split(os.pathsep) if p.strip()]
        paths = paths or [Path("~/.kube/config").expanduser()]
        merged: dict[str, Any] = {"clusters": [], "users": [], "contexts": []}
        for file in paths:
            try:
                config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise KubeconfigError(f"{file}: {exc}") from None
            merged.setdefault("current-context", config.get("current-context"))
            for section in ("clusters", "users", "contexts"):
                have = {item.get("name") for item in merged[section]}
                merged[section] += [_absolute(item, file.parent) for item in config.get(section) or []
                                    if item.get("name") not in have]  # fmt: skip
        return cls.from_kubeconfig(merged)

    @classmethod
    def from_service_account(cls, pod: InCluster) -> Connection:
        return cls(server=pod.server, ca_path=pod.ca_path, token_path=pod.token_path, namespace=pod.namespace)

    @classmethod
    def from_environment(cls) -> Connection:
        """The pod's service account when running in a pod (``InCluster``), else ``$KUBECONFIG``."""
        pod = InCluster.detect()
        return cls.from_service_account(pod) if pod else cls.from_kubeconfig_files()

    def current_token(self) -> str | None:
        """The bearer token: the token file read now (the kubelet rotates it), else ``token``."""
        if self.token_path:
            return Path(self.token_path).read_text(encoding="utf-8").strip()
        return self.token

    def ssl_context(self) -> ssl.SSLContext:
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_pem or self.ca_path:
            context = ssl.create_default_context(cafile=self.ca_path, cadata=self.ca_pem)
        else:
            context = ssl.create_default_context()
        if self.cert_path or self.cert_pem:
            if self.cert_pem or self.key_pem:
                # ssl reads the pair from files only: a private folder, removed once loaded.
                with tempfile.TemporaryDirectory(prefix="edgetune-kube-") as folder:
                    cert, key = Path(folder, "tls.crt"), Path(folder, "tls.key")
                    cert.write_text(self.cert_pem or Path(str(self.cert_path)).read_text(encoding="utf-8"))
                    key.write_text(self.key_pem or Path(str(self.key_path)).read_text(encoding="utf-8"))
                    context.load_cert_chain(str(cert), str(key))
            else:
                context.load_cert_chain(str(self.cert_path), self.key_path)
        return context


@dataclass(frozen=True)
class InCluster:
    """The pod's own identity: API server URL, service-account token file, CA and namespace.

    The folder is the standard mount unless ``EDGETUNE_SERVICE_ACCOUNT_DIR`` names another (a pod
    that turns the automatic mount off and projects its own, audience-bound token elsewhere)."""

    server: str
    token_path: str
    ca_path: str
    namespace: str | None

    @classmethod
    def detect(cls, environ: dict[str, str] | None = None) -> InCluster | None:
        env = dict(os.environ) if environ is None else environ
        folder = env.get("EDGETUNE_SERVICE_ACCOUNT_DIR", SERVICE_ACCOUNT_DIR).rstrip("/")
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not Path(folder, "token").exists():
            return None
        namespace = None
        with suppress(OSError):
            namespace = Path(folder, "namespace").read_text(encoding="utf-8").strip() or None
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(server, f"{folder}/token", f"{folder}/ca.crt", namespace)


class KubeError(RuntimeError):
    """The API server refused a request; ``status`` is the HTTP status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class NotFoundError(KubeError):
    """404."""


class ConflictError(KubeError):
    """409: already exists, or a conflicting change."""


class ThrottledError(KubeError):
    """429: the API server turned the request away (API Priority and Fairness, a rate limit in
    front of it). The server is alive: callers retry, never give the cluster up for it.
    ``retry_after``: the seconds its Retry-After header asked for, if any."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, reason, message)
        self.retry_after = retry_after


class UnreachableError(ConnectionError):
    """The API server did not answer (connection refused, timeout, TLS failure)."""


@dataclass(frozen=True)
class Resource:
    """Where a kind lives on the API server."""

    group_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


CONFIG_MAPS = Resource("v1", "configmaps")
SECRETS = Resource("v1", "secrets")
PODS = Resource("v1", "pods")
EVENTS = Resource("v1", "events")
NODES = Resource("v1", "nodes", namespaced=False)
NAMESPACES = Resource("v1", "namespaces", namespaced=False)
JOBS = Resource("batch/v1", "jobs")
TRAINING_JOBS = Resource(f"{GROUP}/{VERSION}", "edgetrainingjobs")
EDGE_CLUSTERS = Resource(f"{GROUP}/{VERSION}", "edgeclusters", namespaced=False)
ADAPTER_RELEASES = Resource(f"{GROUP}/{VERSION}", "adapterreleases")
LEASES = Resource("coordination.k8s.io/v1", "leases")
SERVICE_ACCOUNTS = Resource("v1", "serviceaccounts")
ROLE_BINDINGS = Resource("rbac.authorization.k8s.io/v1", "rolebindings")
KIND_RESOURCES = {"ConfigMap": CONFIG_MAPS, "Secret": SECRETS, "Job": JOBS, "Namespace": NAMESPACES, "Lease": LEASES,
                  "ServiceAccount": SERVICE_ACCOUNTS, "RoleBinding": ROLE_BINDINGS}  # fmt: skip


class Kube:
    """One cluster's API server."""

    def __init__(self, connection: Connection, cluster: str = "local") -> None:
        self.connection = connection
        self.cluster = cluster
        secure = connection.server.startswith("https://")
        self.http = urllib3.PoolManager(
            num_pools=2, maxsize=POOL_SIZE, retries=False, timeout=urllib3.Timeout(connect=TIMEOUT[0], read=TIMEOUT[1]),
            ssl_context=connection.ssl_context() if secure else None,
        )  # fmt: skip
        self._token_lock = threading.Lock()
        self._token: tuple[float, str | None] = (time.monotonic(), connection.current_token())

    @classmethod
    def from_kubeconfig_dict(cls, kubeconfig: Any, cluster: str) -> Kube:
        return cls(Connection.from_kubeconfig(kubeconfig), cluster)

    @classmethod
    def from_environment(cls) -> Kube:
        """The pod's service account when running in a pod (``InCluster``; the token is re-read as the
        kubelet rotates it), else ``$KUBECONFIG``."""
        return cls(Connection.from_environment(), "local")

    def close(self) -> None:
        self.http.clear()

    # -- raw calls --------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": FIELD_MANAGER}
        token = self._token[1]
        if self.connection.token_path and time.monotonic() - self._token[0] > TOKEN_REREAD_SECONDS:
            with self._token_lock, suppress(OSError):
                token = self.connection.current_token()
                self._token = (time.monotonic(), token)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif self.connection.username:
            basic = urllib3.util.make_headers(basic_auth=f"{self.connection.username}:{self.connection.password or ''}")
            headers.update(basic)
        return headers

    def _url(self, path: str, query: builtins.list[tuple[str, str]] | None) -> str:
        return self.connection.server + path + ("?" + urllib.parse.urlencode(query) if query else "")

    def call(
        self, method: str, path: str, *, body: Any = None, query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> Any:  # fmt: skip
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        started = time.perf_counter()
        outcome = "ok"
        try:
            response = self.http.request(
                method, self._url(path, query), headers=headers, body=None if body is None else json.dumps(body)
            )
            if not 200 <= response.status < 300:
                outcome = str(response.status)
                raise self._refused(response)
            data = json.loads(response.data) if response.data else {}
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            outcome = "unreachable"
            raise UnreachableError(f"cluster {self.cluster}: {type(exc).__name__}: {exc}") from None
        finally:
            metrics.observe_call("kubernetes", method, outcome, time.perf_counter() - started)
        return data

    def _refused(self, response: Any) -> KubeError:
        if response.status == 429:
            metrics.KUBE_THROTTLED.labels(self.cluster).inc()
        return _api_error(response.status, response.reason, response.data, response.headers.get("Retry-After"))

    # -- verbs ------------------------------------------------------------------------------------

    def get(self, resource: Resource, name: str, namespace: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", resource.path(namespace, name))
        return result

    def get_or_none(self, resource: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.get(resource, name, namespace)
        except NotFoundError:
            return None

    def list(
        self, resource: Resource, namespace: str | None = None, *, labels: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Every object; label-selected lists (small) in one call, unselected ones (nodes, every job)
        in pages of 200 so the operator never holds megabytes of JSON at once."""
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in labels.items()))] if labels else []
        if not labels:
            query.append(("limit", "200"))
        return self._pages(resource.path(namespace), query)[0]

    def list_versioned(self, resource: Resource, *, selector: str | None) -> tuple[builtins.list[dict[str, Any]], str]:
        """Every object (all namespaces) matching ``selector`` (every object without one), and the
        list's resourceVersion, from which a watch resumes; in pages of 500."""
        query = ([("labelSelector", selector)] if selector else []) + [("limit", "500")]
        return self._pages(resource.path(), query)

    def _pages(self, path: str, query: builtins.list[tuple[str, str]]) -> tuple[builtins.list[dict[str, Any]], str]:
        """A list request followed through its ``continue`` tokens: the items and the resourceVersion."""
        items: list[dict[str, Any]] = []
        token, version = None, ""
        while True:
            page = self.call("GET", path, query=query + ([("continue", token)] if token else []))
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            token = meta.get("continue")
            if not token:
                return items, version

    def watch(
        self, resource: Resource, namespace: str | None = None, *, labels: dict[str, str] | None = None,
        selector: str | None = None, resource_version: str | None = None, timeout_seconds: int = 300,
    ) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Watch events (``{"type", "object"}``) after ``resource_version`` (without one: the current
        objects first, as ADDED), with bookmarks, until the server ends the watch after
        ``timeout_seconds``. Raises UnreachableError or KubeError (e.g. 410 Gone) like the other
        calls; the caller starts a new watch."""
        query = [("watch", "1"), ("timeoutSeconds", str(timeout_seconds)), ("allowWatchBookmarks", "true")]
        if labels or selector:
            query.append(("labelSelector", selector or ",".join(f"{k}={v}" for k, v in (labels or {}).items())))
        if resource_version:
            query.append(("resourceVersion", resource_version))
        try:
            response = self.http.request(
                "GET", self._url(resource.path(namespace), query), headers=self._headers(), preload_content=False,
                timeout=urllib3.Timeout(connect=TIMEOUT[0], read=timeout_seconds + 30),
            )  # fmt: skip
            if response.status != 200:
                raise self._refused(response)
            try:
                for line in response:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise KubeError(int(status.get("code") or 500), str(status.get("reason", "")),
                                        str(status.get("message", "")))  # fmt: skip
                    yield event
            finally:
                response.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise UnreachableError(f"cluster {self.cluster}: {type(exc).__name__}: {exc}") from None

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj``; when it exists already, return the existing one (creation is idempotent)."""
        resource = KIND_RESOURCES[obj["kind"]]
        namespace = obj["metadata"].get("namespace")
        try:
            created: dict[str, Any] = self.call("POST", resource.path(namespace), body=obj)
        except ConflictError:
            return self.get(resource, obj["metadata"]["name"], namespace)
        return created

    def create_unread(self, obj: dict[str, Any]) -> None:
        """Create ``obj``; one of the same name that exists already is left as it is, unread: for
        Secrets the operator may write (a trainer's credentials) but never read back."""
        resource = KIND_RESOURCES[obj["kind"]]
        with suppress(ConflictError):
            self.call("POST", resource.path(obj["metadata"].get("namespace")), body=obj)

    def merge_patch(
        self, resource: Resource, name: str, patch: dict[str, Any], namespace: str | None = None,
        subresource: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        result: dict[str, Any] = self.call(
            "PATCH", resource.path(namespace, name, subresource), body=patch,
            content_type="application/merge-patch+json",
        )  # fmt: skip
        return result

    def replace_status(
        self, resource: Resource, name: str, namespace: str | None, status: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the whole status (a JSON patch ``add`` replaces it, present or not); the object as
        written."""
        result: dict[str, Any] = self.call(
            "PATCH", resource.path(namespace, name, "status"), body=[{"op": "add", "path": "/status", "value": status}],
            content_type="application/json-patch+json",
        )  # fmt: skip
        return result

    def delete(self, resource: Resource, name: str, namespace: str | None = None) -> None:
        """Delete with foreground-independent background propagation; absent objects are fine."""
        with suppress(NotFoundError):
            self.call(
                "DELETE", resource.path(namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )  # fmt: skip

    def ensure_namespace(self, namespace: str) -> None:
        if self.get_or_none(NAMESPACES, namespace) is None:
            self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": namespace, "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}}})  # fmt: skip

    def version(self) -> str:
        info = self.call("GET", "/version")
        return str(info.get("gitVersion", "unknown"))

    def event(
        self, involved: dict[str, Any], *, reason: str, message: str, warning: bool = False,
        component: str = FIELD_MANAGER,
    ) -> None:  # fmt: skip
        """Record a core/v1 Event on ``involved`` (best effort: an Event is never worth failing over)."""
        meta = involved["metadata"]
        namespace = meta.get("namespace") or "default"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"), "name": meta["name"],
                "namespace": meta.get("namespace"), "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "source": {"component": component}, "reportingComponent": component,
            "reportingInstance": component, "firstTimestamp": now[:19] + "Z", "lastTimestamp": now[:19] + "Z",
            "eventTime": now, "action": reason, "count": 1,
        }  # fmt: skip
        with suppress(KubeError, UnreachableError):
            self.call("POST", EVENTS.path(namespace), body=body)


def _api_error(status: int, reason: str | None, body: bytes | None, retry_after: str | None = None) -> KubeError:
    """The API server's refusal, in its own words (the ``message`` of its Status object)."""
    message = reason or ""
    with suppress(ValueError, AttributeError):
        message = json.loads(body or b"{}").get("message", message)
    if status == 429:
        seconds = None
        with suppress(TypeError, ValueError):
            seconds = float(retry_after)  # type: ignore[arg-type]
        return ThrottledError(status, reason or "", message, seconds)
    kind = {404: NotFoundError, 409: ConflictError}.get(status, KubeError)
    return kind(status, reason or "", message)
