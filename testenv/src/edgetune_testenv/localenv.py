"""The local environment: a small fleet on this machine that runs the pods it schedules.

What a newcomer tries first (``python -m edgetune_testenv env --hold``) and what
``docs/quickstart.md`` is executed against in CI (``tests/e2e/test_quickstart.py``):

- a hub and two edge clusters (real API servers, schedulers and controller managers; kwok keeps
  their GPU, NPU and CPU nodes alive), with **every** pod bound to a node run by the pod executor
  (kwok fakes none), the edgetune images mapped to this checkout's code;
- S3 (versitygw), MLflow (artifacts in that S3), Prometheus with a Pushgateway that discovers the
  annotated pods of every cluster (``prometheus.io/scrape``) and labels them with the cluster's name;
- real sensor data on every edge node (``/var/lib/edgetune/meters``, ItalyPowerDemand read through
  the fleet's new meters, ``demo.data``), a lab data set to train a base model from, and a sample
  inference request per site;
- a folder with everything a user needs: one merged kubeconfig (contexts ``hub``, ``edge-factory``,
  ``edge-farm``; distinct user names), ``env.sh`` (``KUBECONFIG``, ``PATH`` with kubectl, helm and
  ``kubectl-edgetune``, the S3 endpoint and keys, MLflow and Prometheus URLs), the Helm values the
  local environment needs (``values-hub.yaml``).

Test and development infrastructure, not product code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from edgetune_testenv import binaries
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.demo import data as sensor
from edgetune_testenv.executor import LocalImage, PodExecutor
from edgetune_testenv.nodes import default_fleet
from edgetune_testenv.procs import free_port
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]
HUB = "hub"
SITES = {"factory": "edge-factory", "farm": "edge-farm"}
QUICKSTART = REPO / "docs" / "quickstart.md"
DATA_PATH = "/var/lib/edgetune/meters"
"""Where every edge node keeps its meter readings (a hostPath the trainers mount read-only)."""


def images() -> dict[str, LocalImage]:
    """The edgetune images, any tag, run as this checkout's code (``sys.executable``)."""
    env = {"PYTHONUNBUFFERED": "1"}
    # Several simulated nodes share this machine's cores: one thread per trainer is what a small
    # edge node would give it.
    one_core = {**env, "OMP_NUM_THREADS": "1"}
    return {
        # The chart passes `-m edgetune_operator` as the operator's args.
        "edgetune/operator:*": LocalImage(entrypoint=(sys.executable,), env=env),
        "edgetune/trainer:*": LocalImage(entrypoint=(sys.executable, "-m", "edgetune_trainer"), env=one_core),
        "edgetune/agent:*": LocalImage(entrypoint=(sys.executable, "-m", "edgetune_agent"), env=env),
    }


@dataclass
class LocalEnvironment:
    """Bring the local environment up in ``folder`` (a context manager; ``stop`` tears it down)."""

    folder: Path
    planes: dict[str, ControlPlane] = field(default_factory=dict)
    executors: dict[str, PodExecutor] = field(default_factory=dict)
    s3: S3Server | None = None
    mlflow: MlflowServer | None = None
    prometheus: Prometheus | None = None
    samples: dict[str, int] = field(default_factory=dict)
    """Readings placed on each edge node."""
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> LocalEnvironment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stack.close()

    def start(self) -> LocalEnvironment:
        self.folder.mkdir(parents=True, exist_ok=True)
        stack = self._stack
        for name, prefix in ((HUB, HUB), *((cluster, site) for site, cluster in SITES.items())):
            plane = stack.enter_context(ControlPlane(name, self.folder / name, fake_pods=False))
            plane.add_nodes(default_fleet(prefix))
            self.planes[name] = plane
        self.s3 = stack.enter_context(S3Server(self.folder / "s3"))
        self.mlflow = stack.enter_context(MlflowServer(self.s3, workdir=self.folder / "mlflow"))
        self.prometheus = stack.enter_context(Prometheus(self.folder / "prometheus"))
        for name, plane in self.planes.items():
            self.executors[name] = stack.enter_context(PodExecutor(plane, images(), label_selector=""))
        stop = threading.Event()
        stack.callback(stop.set)
        threading.Thread(target=self._discover_pods, args=(stop,), name="pod-discovery", daemon=True).start()
        self._place_data()
        self._write_files()
        return self

    # -- Prometheus ------------------------------------------------------------------------------

    def _discover_pods(self, stop: threading.Event) -> None:
        """What a site's Prometheus setup does (Debian's Prometheus has no Kubernetes discovery):
        every 2 s, the running pods annotated ``prometheus.io/scrape: "true"`` of every cluster
        become targets (``prometheus.io/port``), labelled ``cluster`` (the context's name),
        ``namespace`` and ``pod``."""
        assert self.prometheus is not None  # noqa: S101 - started before
        cores = {name: k8s.CoreV1Api(plane.api_client()) for name, plane in self.planes.items()}
        while not stop.wait(2.0):
            for cluster, core in cores.items():
                try:
                    pods = core.list_pod_for_all_namespaces().items
                except Exception as exc:
                    log.debug("pod discovery on %s: %s", cluster, exc)
                    continue
                groups = []
                for pod in pods:
                    annotations = pod.metadata.annotations or {}
                    port = annotations.get("prometheus.io/port")
                    if annotations.get("prometheus.io/scrape") != "true" or not port or pod.status.phase != "Running" \
                            or not pod.status.pod_ip:  # fmt: skip
                        continue
                    groups.append((f"{pod.status.pod_ip}:{port}", {"cluster": cluster, "namespace":
                                   pod.metadata.namespace, "pod": pod.metadata.name}))  # fmt: skip
                self.prometheus.set_targets(f"pods-{cluster}", sorted(groups))

    # -- data ------------------------------------------------------------------------------------

    def _place_data(self) -> None:
        """The fleet's own readings on every edge node, the lab's for a base model, a request per site."""
        data = sensor.load(SITES)
        data.write_lab(self.folder / "lab")
        requests = self.folder / "requests"
        requests.mkdir(exist_ok=True)
        for site, cluster in SITES.items():
            root = self.executors[cluster]
            for node in (n.name for n in default_fleet(site)):
                self.samples[node] = data.write_node(root.node_root(node) / DATA_PATH.lstrip("/"), site, node)
            (requests / f"{site}.json").write_text(json.dumps(sensor.inference_request(data.sites[site].check_x[:8])))

    # -- what a user needs -----------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    def _write_files(self) -> None:
        assert self.s3 and self.mlflow and self.prometheus  # noqa: S101 - started above
        merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": [],
                                  "current-context": HUB}  # fmt: skip
        for plane in self.planes.values():
            config = yaml.safe_load(plane.kubeconfig.read_text())
            for key in ("clusters", "users", "contexts"):
                merged[key] += config[key]
        self.kubeconfig.write_text(yaml.safe_dump(merged))
        self.kubeconfig.chmod(0o600)

        bin_dir = self.folder / "bin"
        bin_dir.mkdir(exist_ok=True)
        for tool, path in (("kubectl", binaries.binary(binaries.KUBE, "kubectl")),
                           ("helm", binaries.binary(binaries.HELM, "helm"))):  # fmt: skip
            link = bin_dir / tool
            link.unlink(missing_ok=True)
            link.symlink_to(path)

        # The operator's default ports (8080, 8081) on 0.0.0.0 would take every loopback address's
        # 8080 from the agents: every pod here shares this machine's network.
        values = {"operator": {"metricsPort": free_port(), "healthPort": free_port()}}
        (self.folder / "values-hub.yaml").write_text(
            "# The local environment's pods share one network namespace: the operator gets free ports.\n"
            + yaml.safe_dump(values)
        )
        (self.folder / "env.sh").write_text(self.env_script())

    def variables(self) -> dict[str, str]:
        """What ``env.sh`` exports."""
        assert self.s3 and self.mlflow and self.prometheus  # noqa: S101 - started
        venv_bin = Path(sys.executable).parent
        return {
            "EDGETUNE_ENV": str(self.folder),
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.folder / 'bin'}:{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "S3_ENDPOINT": self.s3.endpoint,
            **{k: v for k, v in self.s3.env().items() if k.startswith("AWS_")},
            "MLFLOW_URL": self.mlflow.url,
            "PROMETHEUS_URL": self.prometheus.url,
            "PUSHGATEWAY_URL": self.prometheus.pushgateway_url,
        }

    def env_script(self) -> str:
        lines = ["# source this file: the local environment's kubeconfig, tools, endpoints and keys"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.variables().items()]
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """Everything a user needs, as printed by ``env``."""
        assert self.s3 and self.mlflow and self.prometheus  # noqa: S101 - started
        v = self.variables()
        lines = [f"clusters    {', '.join(self.planes)} (kubectl contexts of the same names)",
                 f"kubeconfig  {self.kubeconfig}"]  # fmt: skip
        prefixes = {HUB: HUB, **{cluster: site for site, cluster in SITES.items()}}
        for name, plane in self.planes.items():
            nodes = ", ".join(n.name for n in default_fleet(prefixes[name]))
            lines.append(f"  {name:13} {plane.server}  nodes: {nodes}")
        lines += [
            f"S3          {self.s3.endpoint}  access key {v['AWS_ACCESS_KEY_ID']}  secret "
            f"{v['AWS_SECRET_ACCESS_KEY']}  region {v['AWS_DEFAULT_REGION']}  (no buckets yet)",
            f"MLflow      {self.mlflow.url}",
            f"Prometheus  {self.prometheus.url}  Pushgateway {self.prometheus.pushgateway_url}  (scrapes running "
            "pods annotated prometheus.io/scrape on every cluster, label cluster=<context>)",
            f"data        {DATA_PATH} on every edge node ({min(self.samples.values())}-{max(self.samples.values())} "
            f"readings each); lab data for a base model: {self.folder / 'lab'}; sample requests: "
            f"{self.folder / 'requests'}",
            "pods        every pod bound to a node runs here (images edgetune/operator, trainer, agent: "
            "this checkout's code)",
            f"helm values {self.folder / 'values-hub.yaml'} (pass with -f when installing the chart on the hub)",
            "",
            f"in another shell:  source {self.folder / 'env.sh'}   then follow docs/quickstart.md",
        ]
        return "\n".join(lines)


# -- the quickstart, as written -------------------------------------------------------------------


def shell_blocks(markdown: str) -> list[str]:
    """The ``sh`` fenced blocks of a Markdown text, in order (``text`` blocks are not run)."""
    return re.findall(r"^```sh\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def quickstart_script(markdown: str | None = None) -> str:
    """``docs/quickstart.md``'s ``sh`` blocks, unchanged, as one bash script (``set -euo pipefail``;
    background jobs it starts end with it)."""
    blocks = shell_blocks(QUICKSTART.read_text() if markdown is None else markdown)
    parts = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for index, block in enumerate(blocks, start=1):
        parts += [f"echo '== quickstart block {index} of {len(blocks)}'", block]
    return "\n".join(parts) + "\n"


def run_quickstart(env: LocalEnvironment, work: Path, *, timeout: float = 1800) -> tuple[int, float, str]:
    """Run the quickstart as a reader would, in ``work`` (links to ``charts/`` and ``examples/``, so
    what it creates lands there) with ``env.sh``'s variables: (exit code, seconds, its output)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("charts", "examples"):
        if not (work / name).exists():
            (work / name).symlink_to(REPO / name)
    log = work / "quickstart.log"
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(["bash", "-c", quickstart_script()], cwd=work, env={**os.environ, **env.variables()},
                              stdout=out, stderr=subprocess.STDOUT, check=False, timeout=timeout)  # fmt: skip
    return done.returncode, time.monotonic() - started, log.read_text()
