"""The Kubernetes API as a pod sees it when it writes about itself, and about nothing else.

The edge agent (its adapter report, readiness condition and Events) and the trainer (its progress
annotation) each patch their own pod with the pod's projected service-account token; RBAC lets them
patch pods, a ValidatingAdmissionPolicy (the chart's ``*-own-pod``) narrows that to the pod the token
is bound to and to their own fields. Three endpoints do not justify the official client (~60 MB of
generated models on an edge device): urllib3, which both images have anyway.
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any

import urllib3

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
STRATEGIC_MERGE = "application/strategic-merge-patch+json"


class OwnPodError(RuntimeError):
    """A write the API server refused (``status`` is its HTTP status) or never answered (0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class OwnPod:
    """Writes about one pod (``namespace``/``name``) to the API server the pod's token belongs to."""

    def __init__(
        self, *, namespace: str, name: str, user_agent: str, server: str | None = None, sa_dir: Path | None = None,
        token_path: Path | None = None, ca_path: Path | None = None,
    ) -> None:  # fmt: skip
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if server is None and host:
            server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        self.server = server or ""
        folder = sa_dir or SA_DIR
        self.token_path = token_path or folder / "token"
        ca = ca_path or folder / "ca.crt"
        context = ssl.create_default_context(cafile=str(ca)) if ca.exists() else ssl.create_default_context()
        self.http = urllib3.PoolManager(ssl_context=context, timeout=urllib3.Timeout(connect=3, read=10), retries=False)
        self.namespace, self.name, self.user_agent = namespace, name, user_agent

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"

    def request(self, method: str, path: str, body: Any, content_type: str = "application/json") -> None:
        """One call; raises ``OwnPodError`` unless the API server answered 2xx."""
        token = self.token_path.read_text().strip()  # re-read every time: the kubelet rotates bound tokens
        try:
            resp = self.http.request(
                method, self.server + path, body=json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": content_type,
                         "Accept": "application/json", "User-Agent": self.user_agent},
            )  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:
            raise OwnPodError(f"{method} {path}: {exc}") from exc
        if resp.status >= 300:
            raise OwnPodError(f"{method} {path}: HTTP {resp.status}: {resp.data[:300]!r}", resp.status)

    def annotate(self, annotations: dict[str, str]) -> None:
        self.request("PATCH", self.path, {"metadata": {"annotations": annotations}}, STRATEGIC_MERGE)

    def patch_status(self, status: dict[str, Any]) -> None:
        self.request("PATCH", self.path + "/status", {"status": status}, STRATEGIC_MERGE)

    def create_event(self, event: dict[str, Any]) -> None:
        self.request("POST", f"/api/v1/namespaces/{self.namespace}/events", event)
