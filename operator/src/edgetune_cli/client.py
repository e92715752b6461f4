"""The hub and its edge clusters, as the plugin sees them: the user's kubeconfig for the hub; for an
edge cluster, the kubeconfig Secret its EdgeCluster names (what the operator uses too)."""

from __future__ import annotations

import base64
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

GROUP, VERSION = "edgetune.io", "v1alpha1"
CRDS = ("edgetrainingjobs", "adapterreleases", "edgeclusters")
KINDS = {"edgetrainingjobs": "EdgeTrainingJob", "adapterreleases": "AdapterRelease"}


class NotInstalledError(RuntimeError):
    """The cluster has no edgetune CRDs."""


class NotFoundError(RuntimeError):
    """The named object does not exist."""


class Cluster:
    def __init__(self, api: k8s.ApiClient) -> None:
        self.core = k8s.CoreV1Api(api)

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return [{"metadata": {"name": p.metadata.name, "creationTimestamp": str(p.metadata.creation_timestamp)}}
                for p in items]  # fmt: skip

    def logs(self, namespace: str, pod: str, tail: int) -> str:
        try:
            # Raw bytes: the client's own decoding turns JSON log lines into a bytes repr (b'{"ts": …}\n').
            response = self.core.read_namespaced_pod_log(pod, namespace, tail_lines=tail, _preload_content=False)
            return decode_log(response.data)
        except ApiException as exc:
            if exc.status == 404:
                raise NotFoundError(f"pod {namespace}/{pod} not found") from None
            raise


def decode_log(data: bytes | str) -> str:
    """A pod's log as text (invalid UTF-8 replaced, never a Python bytes literal)."""
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data


class Hub:
    def __init__(self, kubeconfig: str | None, context: str | None, namespace: str | None) -> None:
        try:
            self.api = k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
            contexts, active = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
        except (k8s_config.ConfigException, FileNotFoundError, TypeError) as exc:
            raise NotInstalledError(f"cannot load a kubeconfig: {exc}") from None
        chosen = context or active["name"]
        default = next((c["context"].get("namespace") for c in contexts if c["name"] == chosen), None)
        self.namespace = namespace or default or "default"
        self.objects = k8s.CustomObjectsApi(self.api)

    def require_crds(self) -> None:
        ext = k8s.ApiextensionsV1Api(self.api)
        missing = []
        for plural in CRDS:
            try:
                ext.read_custom_resource_definition(f"{plural}.{GROUP}")
            except ApiException as exc:
                if exc.status != 404:
                    raise
                missing.append(f"{plural}.{GROUP}")
        if missing:
            raise NotInstalledError(
                f"edgetune is not installed on this cluster (no CRD {', '.join(missing)}): "
                "install the chart (helm install edgetune charts/edgetune) or point --kubeconfig/--context at the hub"
            )

    def list(self, plural: str, namespace: str | None, name: str | None = None) -> list[dict[str, Any]]:
        if namespace is None:
            items = self.objects.list_cluster_custom_object(GROUP, VERSION, plural)["items"]
        else:
            items = self.objects.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]
        return [o for o in items if name is None or o["metadata"]["name"] == name]

    def get(self, plural: str, name: str) -> dict[str, Any]:
        try:
            obj: dict[str, Any] = self.objects.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                raise NotFoundError(f"{KINDS[plural]} {self.namespace}/{name} not found") from None
            raise
        return obj

    def patch_spec(self, plural: str, name: str, spec: dict[str, Any]) -> None:
        self.objects.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name, {"spec": spec})

    def delete(self, plural: str, name: str) -> None:
        self.objects.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)

    def cluster(self, name: str) -> Cluster:
        """``local`` (the hub itself) or an EdgeCluster, through the kubeconfig Secret it names."""
        if name == "local":
            return Cluster(self.api)
        try:
            edge = self.objects.get_cluster_custom_object(GROUP, VERSION, "edgeclusters", name)
        except ApiException as exc:
            if exc.status == 404:
                raise NotFoundError(f"EdgeCluster {name} not found") from None
            raise
        ref = edge["spec"]["kubeconfigSecretRef"]
        try:
            secret = k8s.CoreV1Api(self.api).read_namespaced_secret(ref["name"], ref.get("namespace") or "default")
        except ApiException as exc:
            if exc.status in (403, 404):
                raise NotFoundError(f"cannot read the kubeconfig Secret of EdgeCluster {name} "
                                    f"({ref.get('namespace')}/{ref['name']}): {exc.reason}") from None  # fmt: skip
            raise
        raw = base64.b64decode((secret.data or {})[ref.get("key") or "kubeconfig"]).decode()
        return Cluster(k8s_config.new_client_from_config_dict(yaml.safe_load(raw)))
