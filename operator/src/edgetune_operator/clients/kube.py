"""Kubernetes: a thin, typed layer over the official client's ``ApiClient`` for the handful of
resources the operator touches, on the local cluster and on every registered edge cluster.

Objects go in and come out as plain dicts (the wire format), which is what the pure reconcile
functions consume; errors come out as three exceptions the controllers act on. Calls are
synchronous: kopf runs our handlers in its thread pool.
"""

from __future__ import annotations

import builtins
import json
import os
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from edgetune_api.meta import GROUP, VERSION
from edgetune_operator import metrics

#: (connect, read) seconds: an unreachable edge cluster must fail fast, not hold a worker thread.
TIMEOUT = (3.0, 20.0)
FIELD_MANAGER = "edgetune-operator"
POOL_SIZE = 40
"""Connections kept per cluster: a release writes up to 32 pod annotations at once, plus watches
and reconciles (beyond the pool, urllib3 would open and drop a TLS connection per request)."""


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


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

    def token(self) -> str:
        return Path(self.token_path).read_text(encoding="utf-8").strip()


class KubeError(RuntimeError):
    """The API server refused a request; ``status`` is the HTTP status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class NotFoundError(KubeError):
    """404."""


class ConflictError(KubeError):
    """409: already exists, or a conflicting change."""


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
KIND_RESOURCES = {"ConfigMap": CONFIG_MAPS, "Secret": SECRETS, "Job": JOBS, "Namespace": NAMESPACES, "Lease": LEASES}


class Kube:
    """One cluster's API server."""

    def __init__(self, api: k8s.ApiClient, cluster: str = "local") -> None:
        self.api = api
        self.cluster = cluster

    @classmethod
    def from_kubeconfig_dict(cls, kubeconfig: dict[str, Any], cluster: str) -> Kube:
        configuration = k8s.Configuration()
        k8s_config.load_kube_config_from_dict(kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = POOL_SIZE
        return cls(k8s.ApiClient(configuration), cluster)

    @classmethod
    def from_environment(cls) -> Kube:
        """The pod's service account when running in a pod (``InCluster``; the token is re-read as the
        kubelet rotates it), else ``$KUBECONFIG``."""
        configuration = k8s.Configuration()
        pod = InCluster.detect()
        if pod is not None:
            InClusterConfigLoader(token_filename=pod.token_path, cert_filename=pod.ca_path).load_and_set(configuration)
        else:
            k8s_config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = POOL_SIZE
        return cls(k8s.ApiClient(configuration), "local")

    def close(self) -> None:
        self.api.close()

    # -- raw calls --------------------------------------------------------------------------------

    def call(
        self, method: str, path: str, *, body: Any = None, query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> Any:  # fmt: skip
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        started = time.perf_counter()
        outcome = "ok"
        try:
            response = self.api.call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"], _return_http_data_only=True, _preload_content=False,
                _request_timeout=TIMEOUT,
            )  # fmt: skip
            data = json.loads(response.data) if response.data else {}
        except ApiException as exc:
            outcome = str(exc.status)
            raise _api_error(exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            outcome = "unreachable"
            raise UnreachableError(f"cluster {self.cluster}: {type(exc).__name__}: {exc}") from None
        finally:
            metrics.observe_call("kubernetes", method, outcome, time.perf_counter() - started)
        return data

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
            response = self.api.call_api(
                resource.path(namespace), "GET", query_params=query, header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"], _return_http_data_only=True, _preload_content=False,
                _request_timeout=(TIMEOUT[0], timeout_seconds + 30),
            )  # fmt: skip
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
        except ApiException as exc:
            raise _api_error(exc) from None
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


def _api_error(exc: ApiException) -> KubeError:
    message = exc.reason or ""
    with suppress(ValueError, AttributeError):
        message = json.loads(exc.body or "{}").get("message", message)
    kind = {404: NotFoundError, 409: ConflictError}.get(exc.status or 0, KubeError)
    return kind(exc.status or 0, exc.reason or "", message)
