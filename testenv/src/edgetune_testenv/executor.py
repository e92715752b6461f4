"""Run the containers of selected pods as local processes, the way a kubelet would.

Test and development infrastructure, not product code. kwok simulates every other pod;
pods labelled ``edgetune.io/executor=local`` (see ``cluster.EXECUTOR_LABEL``) are left to
this executor once the real scheduler has bound them to a node. For each such pod it:

- maps the container image to a local environment (explicit configuration: ``LocalImage``), or,
  for images built from the project's Dockerfiles (``ContainerImage``, see ``images``), runs the
  container for real with ``runc``: the image's root filesystem, user, read-only root, capabilities,
  seccomp, mounts and cgroup limits as a kubelet would set them (``containers``);
- materialises volumes (emptyDir, hostPath under a per-node root so each simulated node
  has its own disk, PVCs that outlive pods, ConfigMaps, Secrets, projected volumes) and
  rewrites the container's paths that fall under a mount to the local directory;
- resolves env (values, field refs, ConfigMap/Secret refs, envFrom, ``$(VAR)`` expansion);
- runs init containers in order, then the containers, with the pod's restartPolicy;
- enforces memory limits (RSS of the process group; exceeding it is an ``OOMKilled``)
  and ``activeDeadlineSeconds``;
- reports real exit codes and the termination message (``terminationMessagePath``,
  ``FallbackToLogsOnError``) in the pod status; logs stay readable through ``logs()``;
- gives every pod its own loopback address as its pod IP (``127.x.y.z``: a process that binds
  ``$(POD_IP)`` is reachable there, many pods can use the same port) and the in-cluster
  environment (``KUBERNETES_SERVICE_HOST/PORT`` pointing at the apiserver; the service-account
  token, CA and namespace come from the projected volume the apiserver adds);
- keeps downward-API files (``metadata.annotations``/``labels`` included) up to date when the
  pod changes, written atomically as the kubelet does, and honours ``spec.readinessGates``: the
  pod is Ready only while its containers run and every gate condition is True.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from edgetune_api.assignment import format_downward_map
from edgetune_testenv.cluster import EXECUTOR_LABEL, ControlPlane
from edgetune_testenv.containers import ContainerConfigError, ContainerImage, expand_vars, image_env, runtime_spec
from edgetune_testenv.procs import die_with_parent

log = logging.getLogger(__name__)

TERMINATION_MESSAGE_LIMIT = 4096  # bytes, as the kubelet enforces
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


@dataclass(frozen=True)
class LocalImage:
    """How one container image runs here: its entrypoint and environment, in place of its layers."""

    entrypoint: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


def parse_quantity_bytes(value: str) -> int:
    """Kubernetes memory quantity ("512Mi", "1G", "1500000") -> bytes."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", value.strip())
    if not match or (match.group(2) and match.group(2) not in _UNITS):
        raise ValueError(f"not a memory quantity: {value!r}")
    return int(float(match.group(1)) * _UNITS.get(match.group(2), 1))


def rewrite_paths(text: str, mounts: Mapping[str, Path]) -> str:
    """Map container paths under a mount point to their local directories.

    A container sees its volumes at their mount paths; a local process cannot, so every
    occurrence of a mount path in a command line, argument or env value (also inside an
    inline script or a ``--flag=/path`` pair) is rewritten, longest mount first. A match
    must start a path and end at a path boundary: ``/data`` rewrites ``/data/x.csv`` but
    not ``/database``.
    """
    if not mounts:
        return text
    ordered = sorted(mounts, key=len, reverse=True)
    pattern = re.compile(
        r"(?<![\w.~/-])(" + "|".join(re.escape(m.rstrip("/") or "/") for m in ordered) + r")(?=$|[^\w.-])"
    )
    normalised = {m.rstrip("/") or "/": str(mounts[m]) for m in ordered}
    return pattern.sub(lambda m: normalised[m.group(1)], text)


_ip_lock = threading.Lock()
_ip_counter = 0


def _next_pod_ip() -> str:
    """A loopback address of its own for each pod (Linux routes all of 127/8 to lo)."""
    global _ip_counter  # noqa: PLW0603 - one allocator per process, shared by every executor
    with _ip_lock:
        _ip_counter += 1
        n = _ip_counter
    return f"127.{20 + os.getpid() % 200}.{(n // 250) % 250}.{n % 250 + 1}"


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, as the kubelet's atomic writer does for downward-API files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


STATUS_RETRY_SECONDS = 300.0
"""How long a pod's status update is retried while its apiserver does not answer."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in a process group (what a cgroup would account)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:  # noqa: PTH123
                fields = fh.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 (pgrp) of /proc/PID/stat
                total += int(fields[21]) * page  # field 24 (rss, in pages)
        except (OSError, IndexError, ValueError):
            continue
    return total


def _copy_log(stream: Any, label: str, run: _ContainerRun, lock: threading.Lock) -> None:
    """Copy a container's output line by line into its plain log and its CRI-format log (what
    kwok, like a kubelet, serves to `kubectl logs`: ``<RFC 3339 time> <stream> <F|P> <line>``)."""
    with stream:
        for line in iter(stream.readline, b""):
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
            tag, content = (b"F", line[:-1]) if line.endswith(b"\n") else (b"P", line)
            with lock, contextlib.suppress(OSError):  # the pod's sandbox may be gone already
                with run.log_path.open("ab") as raw:
                    raw.write(line)
                with run.cri_log_path.open("ab") as cri:
                    cri.write(b"%s %s %s %s\n" % (stamp, label.encode(), tag, content))


def _runc_failure(log_path: Path) -> str | None:
    """runc's own error, when it (not the container's process) failed: the container never started."""
    with contextlib.suppress(OSError):
        for line in reversed(log_path.read_text(errors="replace").splitlines()[-5:]):
            if "runc run failed" in line or "runc create failed" in line:
                return line.split('msg="', 1)[-1].rstrip('"')[:TERMINATION_MESSAGE_LIMIT]
    return None


def _nested_mount_points(mounts: list[tuple[str, Path, bool]]) -> None:
    """A volume mounted inside another (``/etc/edgetune/keys`` in ``/etc/edgetune``) needs its mount
    point in the outer volume; runc cannot make it there once the outer one is mounted read-only,
    so it is made beforehand, in the outer volume's folder here."""
    for target, source, _ in mounts:
        for outer_target, outer_source, _ in mounts:
            outer = outer_target.rstrip("/")
            if target != outer_target and target.startswith(outer + "/") and outer_source.is_dir():
                point = outer_source / target[len(outer) + 1 :]
                if source.is_dir():
                    point.mkdir(parents=True, exist_ok=True)
                elif not point.exists():
                    point.parent.mkdir(parents=True, exist_ok=True)
                    point.touch()


def _cgroup(runc_id: str) -> str:
    return f"/edgetune-executor/{runc_id}"


def _oom_killed(cgroup: str) -> bool:
    """Whether the kernel's OOM killer acted in a container's memory cgroup (v1 or v2); read after
    the container exited (``runc run --keep`` leaves its cgroup until ``runc delete``)."""
    relative = cgroup.lstrip("/")
    for path in (Path("/sys/fs/cgroup/memory") / relative / "memory.oom_control",
                 Path("/sys/fs/cgroup") / relative / "memory.events"):  # fmt: skip
        with contextlib.suppress(OSError, ValueError):
            counts = dict(line.split() for line in path.read_text().splitlines() if len(line.split()) == 2)
            return int(counts.get("oom_kill", "0")) > 0
    return False


@dataclass
class _ContainerRun:
    name: str
    log_path: Path
    termination_path: Path
    restart_count: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    image: str = ""

    @property
    def cri_log_path(self) -> Path:
        return self.log_path.with_name("cri.log")


class PodExecutor:
    """Watches one cluster and runs the pods it is responsible for. Thread-based; start()/stop()."""

    def __init__(
        self,
        cluster: ControlPlane,
        images: Mapping[str, LocalImage | ContainerImage],
        root: Path | None = None,
        label_selector: str = f"{EXECUTOR_LABEL}=local",
        restart_backoff: float = 1.0,
    ) -> None:
        self.cluster = cluster
        self.images = dict(images)
        self.root = root or cluster.workdir / "executor"
        self.label_selector = label_selector
        self.restart_backoff = restart_backoff
        self._api_client = cluster.api_client()
        self.core = k8s.CoreV1Api(self._api_client)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pods: dict[str, _PodRun] = {}
        self._thread = threading.Thread(target=self._watch_loop, name=f"executor-{cluster.name}", daemon=True)
        self.runc_root = self.root / "runc"

    # -- public --------------------------------------------------------------------------

    def start(self) -> PodExecutor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            runs = list(self._pods.values())
        for run in runs:
            run.kill("executor stopping")
        for run in runs:
            run.join(timeout=15)
        self._thread.join(timeout=10)
        self._api_client.close()

    def __enter__(self) -> PodExecutor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """The combined stdout/stderr of a container of a pod this executor ran (latest run)."""
        with self._lock:
            runs = [r for r in self._pods.values() if r.namespace == namespace and r.name == pod]
        if not runs:
            raise KeyError(f"the executor ran no pod {namespace}/{pod}")
        run = runs[-1]
        name = container or run.container_names[0]
        return run.containers[name].log_path.read_text(errors="replace")

    def kill_containers(self, namespace: str, pod_prefix: str) -> list[str]:
        """SIGKILL the running containers of pods whose name starts with ``pod_prefix`` (a crash or the
        kernel's OOM killer, not a deletion: the pod fails with exit code 137 and its owner decides).
        Returns the pods hit."""
        with self._lock:
            runs = [r for r in self._pods.values() if r.namespace == namespace and r.name.startswith(pod_prefix)]
        hit = []
        for run in runs:
            for name, proc in list(run._procs.items()):
                if proc.poll() is None:
                    run.signal_container(name, proc)
                    hit.append(run.name)
        return hit

    def runc(self, *args: str) -> list[str]:
        """A runc command line on this executor's container state (container mode)."""
        return ["runc", "--root", str(self.runc_root), *args]

    def node_root(self, node: str) -> Path:
        """The directory standing for ``node``'s filesystem: hostPath volumes resolve under it."""
        path = self.root / "nodes" / node
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- watch ---------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.core.list_pod_for_all_namespaces(label_selector=self.label_selector)
                for pod in pods.items:
                    self._handle(self._api_client.sanitize_for_serialization(pod))
                stream = k8s_watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    label_selector=self.label_selector,
                    resource_version=pods.metadata.resource_version,
                    # Short server-side timeouts keep stop() prompt; relisting a few labelled pods is cheap.
                    timeout_seconds=3,
                    _request_timeout=10,
                )
                for event in stream:
                    if self._stop.is_set():
                        break
                    obj = self._api_client.sanitize_for_serialization(event["object"])
                    if event["type"] == "DELETED":
                        self._forget(obj)
                    else:
                        self._handle(obj)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("executor watch restarting after %s", exc)
                time.sleep(0.5)

    def _handle(self, pod: dict[str, Any]) -> None:
        meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
        uid = meta["uid"]
        with self._lock:
            run = self._pods.get(uid)
        if meta.get("deletionTimestamp"):
            if run is not None:
                run.kill("pod deleted")
            return
        if run is not None:
            run.update(pod)
            return
        if not spec.get("nodeName") or status.get("phase") not in (None, "Pending"):
            return
        run = _PodRun(self, pod)
        with self._lock:
            self._pods[uid] = run
        run.start()

    def _forget(self, pod: dict[str, Any]) -> None:
        with self._lock:
            run = self._pods.get(pod["metadata"]["uid"])
        if run is not None:
            run.kill("pod deleted")


class _PodRun:
    """One pod's lifetime on the executor: its own thread, sandbox and processes."""

    def __init__(self, executor: PodExecutor, pod: dict[str, Any]) -> None:
        self.ex = executor
        self.pod = pod
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.spec = pod["spec"]
        self.node = self.spec["nodeName"]
        self.sandbox = executor.root / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.container_names = [c["name"] for c in self.spec["containers"]]
        self.containers: dict[str, _ContainerRun] = {}
        self._killed = threading.Event()
        self._kill_reason = ""
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._runc_ids: dict[str, str] = {}
        """container name -> runc container id, while it runs (container mode)."""
        self._thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)
        self.started_at = _now()
        self.pod_ip = _next_pod_ip()
        self._downward: list[tuple[Path, dict[str, Any]]] = []  # (file, item) to refresh on pod updates
        self._containers_ready = False
        self._ready: bool | None = None

    def update(self, pod: dict[str, Any]) -> None:
        """The pod changed: refresh downward-API files, re-evaluate readiness gates."""
        self.pod = pod
        for path, item in list(self._downward):
            with contextlib.suppress(OSError, ValueError):
                text = self._item_value(item)
                if not path.exists() or path.read_text() != text:
                    _write_atomic(path, text)
        if self._containers_ready and not self._killed.is_set():
            self._update_ready()

    def _gates_pass(self) -> bool:
        gates = [g["conditionType"] for g in self.pod["spec"].get("readinessGates") or []]
        conditions = {c["type"]: c.get("status") for c in (self.pod.get("status") or {}).get("conditions") or []}
        return all(conditions.get(g) == "True" for g in gates)

    def _update_ready(self) -> None:
        ready = self._containers_ready and self._gates_pass()
        if ready != self._ready:
            self._ready = ready
            self._patch_status({"conditions": self._conditions(initialized=True, ready=ready,
                                                               containers_ready=self._containers_ready)})  # fmt: skip

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def kill(self, reason: str) -> None:
        self._kill_reason = reason
        self._killed.set()
        for name, proc in list(self._procs.items()):
            self.signal_container(name, proc)

    def signal_container(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a container: its process group here, or through runc (a container's processes are
        in a session of their own, so killing ``runc run`` would leave them running)."""
        cid = self._runc_ids.get(name)
        if cid is not None:
            subprocess.run(self.ex.runc("kill", "--all", cid, "KILL"), capture_output=True, check=False)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    # -- main ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._run_pod()
        except Exception as exc:
            log.exception("executor failed on pod %s/%s", self.namespace, self.name)
            self._patch_status({"phase": "Failed", "reason": "ExecutorError", "message": str(exc)[:1000]})

    def _register_logs(self) -> None:
        """A kwok `Logs` object naming each container's CRI log file, owned by the pod."""
        names = [c["name"] for c in (self.spec.get("initContainers") or []) + self.spec["containers"]]
        entries = []
        for name in names:
            path = self.sandbox / "containers" / name / "cri.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            entries.append({"containers": [name], "logsFile": str(path), "follow": True})
        body = {
            "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Logs",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}]},
            "spec": {"logs": entries},
        }  # fmt: skip
        try:
            k8s.CustomObjectsApi(self.ex._api_client).create_namespaced_custom_object(
                "kwok.x-k8s.io", "v1alpha1", self.namespace, "logs", body
            )
        except ApiException as exc:
            if exc.status not in (404, 409):  # no kwok Logs CRD in this cluster / already there
                raise

    def _run_pod(self) -> None:
        mounts_by_volume = self._prepare_volumes()
        self._register_logs()
        deadline = self.spec.get("activeDeadlineSeconds")
        self._deadline = time.monotonic() + deadline if deadline else None
        self._patch_status(
            {
                "phase": "Pending",
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": self.pod_ip,
                "podIPs": [{"ip": self.pod_ip}],
                "startTime": self.started_at,
                "conditions": self._conditions(initialized=False, ready=False),
            }
        )
        for init in self.spec.get("initContainers") or []:
            code = self._run_container(init, mounts_by_volume, init=True)
            if code != 0 or self._killed.is_set():
                self._finish(failed=True)
                return
        restart_policy = self.spec.get("restartPolicy", "Always")
        results: dict[str, int] = {}
        threads = []
        for container in self.spec["containers"]:

            def target(c: dict[str, Any] = container) -> None:
                while True:
                    code = self._run_container(c, mounts_by_volume, init=False)
                    results[c["name"]] = code
                    if self._killed.is_set() or restart_policy == "Never":
                        return
                    if restart_policy == "OnFailure" and code == 0:
                        return
                    run = self.containers[c["name"]]
                    run.restart_count += 1
                    backoff = min(self.ex.restart_backoff * 2 ** (run.restart_count - 1), 30.0)
                    if self._killed.wait(backoff):
                        return

            thread = threading.Thread(target=target, daemon=True)
            threads.append(thread)
            thread.start()
        self._containers_ready = True
        self._ready = self._gates_pass()
        self._patch_status({"phase": "Running", "conditions": self._conditions(
            initialized=True, ready=self._ready, containers_ready=True)})  # fmt: skip
        for thread in threads:
            thread.join()
        self._finish(failed=any(code != 0 for code in results.values()) or self._killed.is_set())

    def _finish(self, failed: bool) -> None:
        reason = None
        message = None
        if self._kill_reason.startswith("DeadlineExceeded"):
            reason, message = "DeadlineExceeded", self._kill_reason.split(":", 1)[1].strip()
        if self._kill_reason == "pod deleted":
            return
        self._containers_ready = False
        body: dict[str, Any] = {
            "phase": "Failed" if failed else "Succeeded",
            "conditions": self._conditions(
                initialized=True, ready=False, done_reason="PodFailed" if failed else "PodCompleted"
            ),
        }
        if reason:
            body["reason"], body["message"] = reason, message
        self._patch_status(body)

    # -- volumes and env -----------------------------------------------------------------

    def _prepare_volumes(self) -> dict[str, Path]:
        volumes: dict[str, Path] = {}
        for vol in self.spec.get("volumes") or []:
            name = vol["name"]
            if "hostPath" in vol:
                host = vol["hostPath"]["path"].lstrip("/")
                path = self.ex.node_root(self.node) / host
                if vol["hostPath"].get("type") in ("File", "FileOrCreate"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
                else:
                    path.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                path = self.ex.root / "pvcs" / self.namespace / claim
                path.mkdir(parents=True, exist_ok=True)
            else:
                path = self.sandbox / "volumes" / name
                path.mkdir(parents=True, exist_ok=True)
                if "emptyDir" in vol:
                    path.chmod(0o777)  # as the kubelet makes it: writable by any container user
                if "configMap" in vol:
                    self._materialise(path, self._config_map(vol["configMap"]["name"]), vol["configMap"].get("items"))
                    self._permissions(path, vol["configMap"])
                elif "secret" in vol:
                    self._materialise(path, self._secret(vol["secret"]["secretName"]), vol["secret"].get("items"))
                    self._permissions(path, vol["secret"])
                elif "projected" in vol:
                    self._projected(path, vol["projected"])
                elif "downwardAPI" in vol:
                    self._downward_items(path, vol["downwardAPI"].get("items") or [])
            volumes[name] = path
        return volumes

    @staticmethod
    def _materialise(path: Path, data: Mapping[str, str], items: list[dict[str, str]] | None) -> None:
        selected = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
        for key, rel in selected.items():
            if key in data:
                target = path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[key])

    def _permissions(self, path: Path, source: dict[str, Any]) -> None:
        """The files' mode (``defaultMode``, or an item's ``mode``) and, with the pod's ``fsGroup``,
        their group, as the kubelet sets them: a non-root container reads a 0440 Secret through it."""
        group = (self.spec.get("securityContext") or {}).get("fsGroup")
        modes = {i["path"]: i["mode"] for i in source.get("items") or [] if "mode" in i}
        for file in (p for p in path.rglob("*") if p.is_file()):
            file.chmod(modes.get(str(file.relative_to(path)), source.get("defaultMode", 0o644)))
            if group is not None:
                os.chown(file, -1, int(group))
        if group is not None:
            for folder in (path, *(p for p in path.rglob("*") if p.is_dir())):
                os.chown(folder, -1, int(group))

    def _projected(self, path: Path, projected: dict[str, Any]) -> None:
        for source in projected.get("sources") or []:
            if "configMap" in source:
                with contextlib.suppress(ApiException):
                    cm = source["configMap"]
                    self._materialise(path, self._config_map(cm["name"]), cm.get("items"))
            elif "secret" in source:
                sec = source["secret"]
                self._materialise(path, self._secret(sec["name"]), sec.get("items"))
            elif "downwardAPI" in source:
                self._downward_items(path, source["downwardAPI"].get("items") or [])
            elif "serviceAccountToken" in source:
                sat = source["serviceAccountToken"]
                request = k8s.AuthenticationV1TokenRequest(
                    spec=k8s.V1TokenRequestSpec(
                        audiences=[sat["audience"]] if sat.get("audience") else [],
                        expiration_seconds=sat.get("expirationSeconds", 3607),
                        bound_object_ref=k8s.V1BoundObjectReference(kind="Pod", name=self.name, uid=self.uid),
                    )
                )
                token = self.ex.core.create_namespaced_service_account_token(
                    self.spec.get("serviceAccountName", "default"), self.namespace, request
                )
                (path / sat["path"]).write_text(token.status.token)

    def _downward_items(self, path: Path, items: list[dict[str, Any]]) -> None:
        for item in items:
            target = path / item["path"]
            _write_atomic(target, self._item_value(item))
            self._downward.append((target, item))

    def _item_value(self, item: dict[str, Any]) -> str:
        if "fieldRef" in item:
            return self._field(item["fieldRef"]["fieldPath"])
        resource = item["resourceFieldRef"]
        container = next(c for c in self.spec["containers"] if c["name"] == resource.get("containerName"))
        kind, _, res = resource["resource"].partition(".")
        return str(((container.get("resources") or {}).get(kind) or {}).get(res, "0"))

    def _config_map(self, name: str) -> dict[str, str]:
        return self.ex.core.read_namespaced_config_map(name, self.namespace).data or {}

    def _secret(self, name: str) -> dict[str, str]:
        data = self.ex.core.read_namespaced_secret(name, self.namespace).data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _field(self, field_path: str) -> str:
        meta = self.pod["metadata"]
        simple: dict[str, str] = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": self.node,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.hostIP": "127.0.0.1",
            "status.podIP": self.pod_ip,
            "status.podIPs": self.pod_ip,
        }
        if field_path in simple:
            return str(simple[field_path])
        if field_path in ("metadata.annotations", "metadata.labels"):
            return format_downward_map(dict(meta.get(field_path.split(".")[1]) or {}))
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field_path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        raise ValueError(f"unsupported fieldRef {field_path!r}")

    def _image_env(self, image: LocalImage) -> dict[str, str]:
        """What the image provides (its own paths: never rewritten as mounts)."""
        (self.sandbox / "home").mkdir(parents=True, exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.sandbox / "home"),
            **self._kubelet_env(),
            "LANG": "C.UTF-8",
            **image.env,
        }

    def _kubelet_env(self) -> dict[str, str]:
        """What the kubelet injects: the pod's hostname and the `kubernetes` Service (here the
        apiserver on loopback)."""
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.ex.cluster.api_port),
                "HOSTNAME": self.name}  # fmt: skip

    def _env(self, container: dict[str, Any], base: dict[str, str]) -> dict[str, str]:
        """The container's declared env, resolved (``$(VAR)`` may refer to ``base``)."""
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                data = self._config_map(src["configMapRef"]["name"])
            else:
                data = self._secret(src["secretRef"]["name"])
            env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            if "valueFrom" not in item:
                env[item["name"]] = expand_vars(item.get("value", ""), {**base, **env})
                continue
            ref = item["valueFrom"]
            if "fieldRef" in ref:
                env[item["name"]] = self._field(ref["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                env[item["name"]] = self._config_map(r["name"])[r["key"]]
            elif "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                env[item["name"]] = self._secret(r["name"])[r["key"]]
            elif "resourceFieldRef" in ref:
                resource = ref["resourceFieldRef"]["resource"]
                kind, _, res = resource.partition(".")
                env[item["name"]] = str(((container.get("resources") or {}).get(kind) or {}).get(res, "0"))
        return env

    # -- containers ----------------------------------------------------------------------

    def _image(self, name: str) -> LocalImage | ContainerImage:
        if name in self.ex.images:
            return self.ex.images[name]
        for pattern, image in self.ex.images.items():
            if pattern.endswith("*") and name.startswith(pattern[:-1]):
                return image
        raise ValueError(f"no local environment configured for image {name!r} (configured: {sorted(self.ex.images)})")

    def _run_container(self, container: dict[str, Any], volumes: dict[str, Path], init: bool) -> int:
        name = container["name"]
        run = self.containers.get(name)
        if run is None:
            cdir = self.sandbox / "containers" / name
            cdir.mkdir(parents=True, exist_ok=True)
            run = _ContainerRun(name, cdir / "log", cdir / "termination-log", image=container.get("image", ""))
            self.containers[name] = run
        run.termination_path.write_bytes(b"")
        image = self._image(container.get("image", ""))
        if isinstance(image, ContainerImage):
            return self._run_in_container(container, volumes, init, run, image)
        mounts = {
            m["mountPath"]: volumes[m["name"]] / m.get("subPath", "") for m in container.get("volumeMounts") or []
        }
        mounts[container.get("terminationMessagePath", "/dev/termination-log")] = run.termination_path
        # Only what the pod spec declares lives in the container's filesystem view and is rewritten;
        # the image's own entrypoint and env point at the local environment standing in for it.
        base = self._image_env(image)
        declared = self._env(container, base)
        env = {**base, **{k: rewrite_paths(v, mounts) for k, v in declared.items()}}
        # $(VAR) expands to the container's view of the value, then the result is rewritten once: a
        # value rewritten twice would map a local path that happens to start with a mount path
        # (/tmp/… under a /tmp mount) a second time.
        container_view = {**base, **declared}
        entrypoint = [rewrite_paths(expand_vars(a, container_view), mounts) for a in container.get("command") or []]
        entrypoint = entrypoint or list(image.entrypoint)
        argv = entrypoint + [rewrite_paths(expand_vars(a, container_view), mounts)
                             for a in container.get("args") or []]  # fmt: skip
        if not argv:
            raise ValueError(f"container {name!r} has no command and image {container.get('image')!r} no entrypoint")
        workdir = Path(rewrite_paths(container["workingDir"], mounts)) if container.get("workingDir") else self.sandbox
        limit = (container.get("resources") or {}).get("limits", {}).get("memory")
        limit_bytes = parse_quantity_bytes(limit) if limit else None

        return self._execute(container, run, init, argv, env=env, cwd=workdir, limit_bytes=limit_bytes)

    def _execute(
        self, container: dict[str, Any], run: _ContainerRun, init: bool, argv: list[str], *, env: dict[str, str] | None,
        cwd: Path, limit_bytes: int | None, runc_id: str | None = None,
    ) -> int:  # fmt: skip
        """Start ``argv`` (the container's process, or ``runc run``), copy its output to the logs,
        supervise it and report how it ended."""
        name = container["name"]
        started = _now()
        run.state = {"running": {"startedAt": started}}
        self._report_containers(init)
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl; a killed test run takes pods along
            )
        except OSError as exc:  # what a runtime reports when the entrypoint cannot start
            run.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(exc)[:1024],
                                        "startedAt": started, "finishedAt": _now()}}  # fmt: skip
            self._report_containers(init)
            return 128
        self._procs[name] = proc
        if runc_id is not None:
            self._runc_ids[name] = runc_id
        lock = threading.Lock()
        readers = [
            threading.Thread(target=_copy_log, args=(stream, label, run, lock), daemon=True)
            for stream, label in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
        ]
        for reader in readers:
            reader.start()
        oom = self._supervise(proc, limit_bytes)
        code = proc.wait()
        for reader in readers:
            reader.join(timeout=5)
        self._procs.pop(name, None)
        self._runc_ids.pop(name, None)
        if runc_id is not None:
            oom = _oom_killed(_cgroup(runc_id))  # the cgroup's OOM killer, as the kubelet reads it
        if code < 0:
            code = 128 - code  # killed by signal N -> 128+N, as a container runtime reports it
        reason = "OOMKilled" if oom else ("Completed" if code == 0 else "Error")
        failed_start = _runc_failure(run.log_path) if runc_id is not None and code != 0 and not oom else None
        if failed_start:  # runc could not create the container: the runtime's StartError, with its words
            reason = "StartError"
        if self._kill_reason.startswith("DeadlineExceeded"):
            reason = "DeadlineExceeded"
        terminated: dict[str, Any] = {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": _now()}
        message = failed_start or self._termination_message(container, run, code)
        if message:
            terminated["message"] = message
        run.state = {"terminated": terminated}
        self._report_containers(init)
        return code

    def _run_in_container(
        self, container: dict[str, Any], volumes: dict[str, Path], init: bool, run: _ContainerRun,
        image: ContainerImage,
    ) -> int:  # fmt: skip
        """The container for real: an OCI bundle from the pod spec and the image, run by ``runc``."""
        name = container["name"]
        cid = f"et{os.getpid()}-{self.uid[:8]}-{name}-{run.restart_count}"
        cdir = run.log_path.parent
        bundle = cdir / f"bundle-{run.restart_count}"
        bundle.mkdir(parents=True, exist_ok=True)
        base = {**image_env(image.config), **self._kubelet_env()}
        env = {**base, **self._env(container, base)}
        mounts = [(m["mountPath"], volumes[m["name"]] / m.get("subPath", ""), bool(m.get("readOnly")))
                  for m in container.get("volumeMounts") or []]  # fmt: skip
        run.termination_path.chmod(0o666)  # as the kubelet makes it: any container user may write it
        mounts.append((container.get("terminationMessagePath", "/dev/termination-log"), run.termination_path, False))
        _nested_mount_points(mounts)
        readonly = bool((container.get("securityContext") or {}).get("readOnlyRootFilesystem"))
        rootfs = image.rootfs
        try:
            if not readonly:
                rootfs = self._writable_root(image.rootfs, cdir / f"root-{run.restart_count}")
            spec = runtime_spec(pod=self.pod, container=container, image=image, env=env, mounts=mounts,
                                rootfs=rootfs, readonly_root=readonly, cgroup=_cgroup(cid),
                                parse_bytes=parse_quantity_bytes)  # fmt: skip
        except (ContainerConfigError, OSError, subprocess.CalledProcessError) as exc:
            if rootfs != image.rootfs:
                subprocess.run(["umount", "-l", str(rootfs)], capture_output=True, check=False)
            # The kubelet leaves such a container waiting (the pod Pending) until the pod goes away.
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)[:1024]}}
            self._report_containers(init)
            self._killed.wait()
            return 128
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))
        argv = self.ex.runc("run", "--keep", "--bundle", str(bundle), cid)
        try:
            return self._execute(container, run, init, argv, env=None, cwd=bundle, limit_bytes=None, runc_id=cid)
        finally:
            subprocess.run(self.ex.runc("delete", "--force", cid), capture_output=True, check=False)
            if not readonly:
                subprocess.run(["umount", "-l", str(rootfs)], capture_output=True, check=False)

    @staticmethod
    def _writable_root(lower: Path, where: Path) -> Path:
        """A writable root filesystem for one container: an overlay of its own over the image's
        (read-only, shared) root, as a container runtime's snapshotter gives it."""
        for part in ("upper", "work", "merged"):
            (where / part).mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={lower},upperdir={where / 'upper'},workdir={where / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(where / "merged")],
                       capture_output=True, check=True)  # fmt: skip
        return where / "merged"

    def _supervise(self, proc: subprocess.Popen[bytes], limit_bytes: int | None) -> bool:
        """Wait for ``proc``; kill it for exceeding its memory limit or the pod deadline. True on OOM."""
        while proc.poll() is None:
            if self._killed.wait(0.2):
                break
            if limit_bytes is not None and _group_rss_bytes(proc.pid) > limit_bytes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return True
            if self._deadline is not None and time.monotonic() > self._deadline:
                seconds = self.spec["activeDeadlineSeconds"]
                self.kill(
                    f"DeadlineExceeded: Pod was active on the node longer than the specified deadline ({seconds}s)"
                )
        return False

    def _termination_message(self, container: dict[str, Any], run: _ContainerRun, code: int) -> str:
        try:  # the pod's folder goes when the pod is deleted while its container ends
            message = run.termination_path.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(errors="replace")
            fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
            if not message.strip() and code != 0 and fallback:
                lines = run.log_path.read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
                message = b"\n".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")
        except FileNotFoundError:
            return ""
        return message

    # -- status --------------------------------------------------------------------------

    def _conditions(
        self, initialized: bool, ready: bool, done_reason: str | None = None, containers_ready: bool | None = None
    ) -> list[dict[str, Any]]:
        now = _now()

        def cond(kind: str, ok: bool) -> dict[str, Any]:
            c: dict[str, Any] = {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": now}
            if not ok and done_reason:
                c["reason"] = done_reason
            return c

        return [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            cond("Initialized", initialized or done_reason is not None),
            cond("ContainersReady", ready if containers_ready is None else containers_ready),
            cond("Ready", ready),
        ]

    def _report_containers(self, init: bool) -> None:
        specs = self.spec.get("initContainers" if init else "containers") or []
        statuses = []
        for c in specs:
            run = self.containers.get(c["name"])
            state = run.state if run else {"waiting": {"reason": "PodInitializing"}}
            statuses.append(
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "ready": "running" in state,
                    "started": "running" in state,
                    "restartCount": run.restart_count if run else 0,
                    "state": state,
                }
            )
        self._patch_status({"initContainerStatuses" if init else "containerStatuses": statuses})

    def _patch_status(self, status: dict[str, Any]) -> None:
        """Report ``status``; while the apiserver does not answer (a restart), retry with backoff as a
        kubelet does, so a container that finished meanwhile is not left Running forever."""
        delay, deadline = 0.5, time.monotonic() + STATUS_RETRY_SECONDS
        while self._kill_reason != "pod deleted":
            try:
                self.ex.core.patch_namespaced_pod_status(self.name, self.namespace, {"status": status})
            except ApiException as exc:
                if exc.status == 404:  # a deleted pod has no status to report
                    return
                if exc.status < 500 or time.monotonic() > deadline:
                    raise
            except urllib3.exceptions.HTTPError:
                if time.monotonic() > deadline:
                    raise
            else:
                return
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
