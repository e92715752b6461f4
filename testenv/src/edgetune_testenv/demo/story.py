"""``make demo``: the whole product on one machine, as a platform team would run it.

A hub and two edge sites (simulated K3s-like clusters with GPU, NPU and CPU nodes), S3, MLflow and
Prometheus. The operator is installed with ``helm install`` and runs from the chart's Deployment
(its pod is run as a process with the chart's ServiceAccount token, so the chart's RBAC is exactly
what it gets); the edge clusters get the chart's edge-access role, and the hub reaches them with a
token of that role only. Then the story (``demo.data``): a lab-trained base model fails on the
fleet's new meters; an EdgeTrainingJob per NPU node and a federated one on the GPU nodes adapt it
where the data is; the averaged adapter is rolled out by an AdapterRelease (canary, analysis against
Prometheus, promotion), and the adapter of the farm's miswired node is rolled out too — its
analysis fails and every site goes back to the good one. Each step is checked; the exit code says
whether all passed.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from edgetune_testenv import binaries
from edgetune_testenv.cluster import EXECUTOR_LABEL, ControlPlane
from edgetune_testenv.demo import data as sensor
from edgetune_testenv.demo.live import Display
from edgetune_testenv.errors import EnvironmentSetupError
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.localenv import images
from edgetune_testenv.nodes import default_fleet
from edgetune_testenv.procs import free_port
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server

REPO = Path(__file__).resolve().parents[4]
CHART = REPO / "charts" / "edgetune"
GROUP, VERSION = "edgetune.io", "v1alpha1"
SYSTEM = "edgetune-system"
NS = "demo"
#: The images the chart and the agent example name by default, mapped to this checkout's code.
OPERATOR_IMAGE = "edgetune/operator:0.1.0"
TRAINER_IMAGE = "edgetune/trainer:0.1.0-cpu"
AGENT_IMAGE = "edgetune/agent:0.1.0-cpu"
SITES = {"factory": "edge-factory", "farm": "edge-farm"}
MODEL = "meter-classifier"
BUCKET = "adapters"
DATA_PATH = "/var/lib/edgetune/meters"
CHECK_PATH = "/var/lib/edgetune/check"
MEMORY_BUDGET = "2Gi"
ACCURACY_GATE = 0.8


class DemoFailedError(RuntimeError):
    """A step of the story did not turn out as it must."""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Record:
    """What the summary and the plots are made of."""

    started: float = field(default_factory=time.time)
    timeline: list[tuple[float, str, str]] = field(default_factory=list)  # (time, what, phase/detail)
    traffic: list[tuple[float, str, str, int, int]] = field(default_factory=list)  # (t, cluster, version, n, wrong)
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    releases: dict[str, dict[str, Any]] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # cluster -> {version: accuracy}
    package_bytes: dict[str, int] = field(default_factory=dict)  # version -> bytes in S3
    versions: dict[str, str] = field(default_factory=dict)  # role -> MLflow version
    dashboard_series: dict[str, int] = field(default_factory=dict)  # panel query -> series returned
    lock: threading.Lock = field(default_factory=threading.Lock)


def _ed25519() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


class Demo:
    def __init__(self, *, workdir: Path, results: Path, display: Display, canary_seconds: int = 15) -> None:
        self.workdir, self.results, self.display = workdir, results, display
        self.canary_seconds = canary_seconds  # how long the 50 % canary serves before its analysis
        self.record = Record()
        self.checks: list[Check] = []
        self.planes: dict[str, ControlPlane] = {}
        self.executors: dict[str, PodExecutor] = {}
        self.s3: S3Server | None = None
        self.mlflow: MlflowServer | None = None
        self.prometheus: Prometheus | None = None
        self.helm = str(binaries.binary(binaries.HELM, "helm"))
        self.data: sensor.SensorData | None = None
        self.base_sha = ""
        self.agents: list[tuple[str, str, str]] = []  # (cluster, pod, ip)
        self._stop_traffic = threading.Event()

    # -- checks ------------------------------------------------------------------------------------

    def check(self, name: str, passed: bool, detail: str, *, fatal: bool = True) -> None:
        self.checks.append(Check(name, passed, detail))
        self.display.check(name, passed, detail)
        if not passed and fatal:
            raise DemoFailedError(f"{name}: {detail}")

    def mark(self, what: str, detail: str) -> None:
        with self.record.lock:
            self.record.timeline.append((time.time(), what, detail))

    # -- 1. the environment ------------------------------------------------------------------------

    def up(self, stack: contextlib.ExitStack) -> None:
        self.display.stage("Environment: a hub and two edge sites, S3, MLflow, Prometheus")
        started = time.monotonic()
        for name, prefix in (("hub", "hub"), *((c, s) for s, c in SITES.items())):
            plane = stack.enter_context(ControlPlane(name, self.workdir / name))
            plane.add_nodes(default_fleet(prefix))
            self.planes[name] = plane
        self.s3 = stack.enter_context(S3Server(self.workdir / "s3"))
        self.mlflow = stack.enter_context(MlflowServer(self.s3, workdir=self.workdir / "mlflow"))
        self.prometheus = stack.enter_context(Prometheus(self.workdir / "prometheus"))
        for name, plane in self.planes.items():
            self.executors[name] = stack.enter_context(PodExecutor(plane, images()))
        stack.callback(self._stop_traffic.set)
        nodes = {name: len(p.kubectl("get", "nodes", "-o", "name").stdout.split()) for name, p in self.planes.items()}
        self.check("environment up", all(n == 6 for n in nodes.values()),
                   f"{len(self.planes)} clusters ({', '.join(f'{k}: {v} nodes' for k, v in nodes.items())}) "
                   f"in {time.monotonic() - started:.0f} s")  # fmt: skip

    # -- 2. install ----------------------------------------------------------------------------------

    def _helm(self, plane: ControlPlane, release: str, values: dict[str, Any]) -> None:
        path = self.workdir / f"values-{plane.name}.yaml"
        path.write_text(yaml.safe_dump(values))
        done = subprocess.run(
            [self.helm, "upgrade", "--install", release, str(CHART), f"--kubeconfig={plane.kubeconfig}",
             f"--namespace={SYSTEM}", "--create-namespace", f"--values={path}", "--wait", "--timeout=3m"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise DemoFailedError(f"helm install on {plane.name} failed:\n{done.stderr.strip()}")

    def install(self) -> None:
        assert self.s3 and self.mlflow and self.prometheus  # noqa: S101 - set by up()
        self.display.stage("Install: the Helm chart on the hub (operator) and on each site (edge access, agents' RBAC)")
        hub = self.planes["hub"]
        for plane in self.planes.values():
            plane.kubectl("create", "namespace", NS)
        metrics_port, health_port = free_port(), free_port()
        self._helm(hub, "edgetune", {
            "operator": {
                "podLabels": {EXECUTOR_LABEL: "local"}, "metricsPort": metrics_port, "healthPort": health_port,
                "resyncSeconds": 2, "clusterLostAfterSeconds": 60, "secretNamespaces": [NS],
                "env": [{"name": "EDGETUNE_RELEASE_RESYNC_SECONDS", "value": "1"}],
            },
            "trainer": {"image": TRAINER_IMAGE, "podLabels": {EXECUTOR_LABEL: "local"}, "terminationGraceSeconds": 10},
            "mlflow": {"trackingUri": self.mlflow.url},
            "s3": {"endpoint": self.s3.endpoint},
            "prometheus": {"pushgatewayUrl": self.prometheus.pushgateway_url, "url": self.prometheus.url},
        })  # fmt: skip
        pod = self._operator_pod()
        self.prometheus.add_target("edgetune-operator", f"{pod.status.pod_ip}:{metrics_port}")
        sa = pod.spec.service_account_name
        self.check("operator runs from the chart's Deployment", sa == "edgetune-operator" and self._operator_healthy(
            pod.status.pod_ip, health_port), f"pod {pod.metadata.name} as ServiceAccount {sa}")  # fmt: skip
        for site, cluster in SITES.items():
            plane = self.planes[cluster]
            self._helm(plane, "edgetune", {"operator": {"enabled": False}, "edgeAccess": {"enabled": True},
                                           "agent": {"namespaces": [NS]}})  # fmt: skip
            token = plane.kubectl("-n", SYSTEM, "create", "token", "edgetune-hub", "--duration=24h").stdout.strip()
            config = yaml.safe_load(plane.kubeconfig.read_text())
            config["users"] = [{"name": "edgetune-hub", "user": {"token": token}}]
            config["contexts"][0]["context"]["user"] = "edgetune-hub"
            hub.kubectl("-n", SYSTEM, "create", "secret", "generic", f"{cluster}-kubeconfig",
                        "--from-file=kubeconfig=/dev/stdin", input_text=yaml.safe_dump(config))  # fmt: skip
            hub.kubectl("apply", "-f", "-", input_text=json.dumps({
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "EdgeCluster",
                "metadata": {"name": cluster, "labels": {"region": "eu", "site": site}},
                "spec": {"kubeconfigSecretRef": {"name": f"{cluster}-kubeconfig", "namespace": SYSTEM},
                         "heartbeatInterval": "2s"},
            }))  # fmt: skip
        ready = self._wait(self._clusters_ready, 90, "both EdgeClusters reachable")
        self.check("edge sites registered", ready, "EdgeClusters edge-factory and edge-farm reachable, with the "
                   "chart's edge-access role only")  # fmt: skip

    def _operator_pod(self) -> Any:
        core = k8s.CoreV1Api(self.planes["hub"].api_client())
        pods = core.list_namespaced_pod(SYSTEM, label_selector="app.kubernetes.io/component=operator").items
        running = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip]
        if not running:
            raise DemoFailedError(f"the operator pod is not running: {[p.status.phase for p in pods]}")
        return running[0]

    def _operator_healthy(self, ip: str, port: int) -> bool:
        def ok() -> bool:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{ip}:{port}/healthz", timeout=2):
                return True
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return True
            return False

        return bool(self._wait(ok, 60, "operator healthy"))

    def _clusters_ready(self) -> bool:
        api = k8s.CustomObjectsApi(self.planes["hub"].api_client())
        items = api.list_cluster_custom_object(GROUP, VERSION, "edgeclusters")["items"]
        ready = [c for c in items if (c.get("status") or {}).get("reachable") is True]
        return len(ready) == len(SITES)

    def _wait(self, condition: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(every)
        raise DemoFailedError(f"timed out after {timeout:.0f} s waiting for {what}")

    # -- 3. data, base model, credentials --------------------------------------------------------

    def prepare(self) -> None:
        assert self.s3 is not None  # noqa: S101
        self.display.stage("Data: the lab's base model, the sites' own meter data (never leaves the node)")
        self.data = sensor.load(SITES)
        lab = self.data.write_lab(self.workdir / "lab")
        base = self.workdir / "base"
        done = subprocess.run([sys.executable, "-m", "edgetune_trainer", "pretrain", f"--data={lab}", "--format=npy",
                               f"--out={base}", "--eval-fraction=0.2", "--steps=300"],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise DemoFailedError(f"pretraining the base model failed: {done.stderr.strip()[-2000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        self.base_sha = summary["sha256"]
        self.record.accuracy.setdefault("lab", {})["base"] = summary["eval_accuracy"]
        self.check("base model trained in the lab", summary["eval_accuracy"] >= 0.9,
                   f"accuracy {summary['eval_accuracy']:.3f} on the lab's held-out meters (old meters)")  # fmt: skip
        client = self.s3.client()
        self.s3.create_bucket("models")
        self.s3.create_bucket(BUCKET)
        for path in sorted(base.iterdir()):
            client.put_object(Bucket="models", Key=f"meter-base/{path.name}", Body=path.read_bytes())
        private, public = _ed25519()
        creds = {k: v for k, v in self.s3.env().items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        hub = k8s.CoreV1Api(self.planes["hub"].api_client())
        hub.create_namespaced_secret(NS, {"metadata": {"name": "s3-credentials"}, "stringData": creds})
        hub.create_namespaced_secret(NS, {"metadata": {"name": "adapter-signing"},
                                          "stringData": {"key.pem": private.decode()}})  # fmt: skip
        samples = {}
        for site, cluster in SITES.items():
            core = k8s.CoreV1Api(self.planes[cluster].api_client())
            store = {"accessKeyId": creds["AWS_ACCESS_KEY_ID"], "secretAccessKey": creds["AWS_SECRET_ACCESS_KEY"],
                     "endpoint": self.s3.endpoint}  # fmt: skip
            core.create_namespaced_secret(NS, {"metadata": {"name": "adapter-store"}, "stringData": store})
            core.create_namespaced_config_map(NS, {"metadata": {"name": "adapter-signers"},
                                                   "data": {"signer.pem": public.decode()}})  # fmt: skip
            # What examples/agent/deployment.yaml serves: the lab's base model, fetched from S3 once.
            core.create_namespaced_config_map(NS, {"metadata": {"name": "base-model"}, "data": {
                "uri": "s3://models/meter-base", "sha256": self.base_sha}})  # fmt: skip
            executor = self.executors[cluster]
            for node in (n.name for n in default_fleet(site)):
                root = executor.node_root(node)
                self.data.write_check(root / CHECK_PATH.lstrip("/"), site)
                samples[node] = n = self.data.write_node(root / DATA_PATH.lstrip("/"), site, node)
                # What lands the data also reports it (docs/operator.md): jobs with minSamples wait for this.
                self.planes[cluster].kubectl("annotate", "--overwrite", "node", node,
                                             f"edgetune.io/samples={json.dumps({DATA_PATH: n})}")  # fmt: skip
        self.check("site data placed on the nodes", len(samples) == 12,
                   f"{sum(samples.values())} readings on 12 edge nodes (one farm NPU sensor miswired: "
                   f"{sensor.MISWIRED_NODE})")  # fmt: skip

    # -- 4. inference workloads ----------------------------------------------------------------------

    def workloads(self) -> None:
        assert self.s3 and self.prometheus  # noqa: S101
        self.display.stage("Workloads: two inference pods per site run the edge agent, serving the base model")
        template = yaml.safe_load((REPO / "examples" / "agent" / "deployment.yaml").read_text())
        pod = template["spec"]["template"]
        pod["metadata"]["labels"][EXECUTOR_LABEL] = "local"
        spec = pod["spec"]
        spec["nodeSelector"] = {"edgetune.io/accelerator": "cpu"}
        container = spec["containers"][0]
        container["image"] = AGENT_IMAGE
        container["args"] += ["--threads=1", "--eval-data-dir=/data/check", "--eval-format=npy",
                              "--revocation-poll-seconds=2"]  # fmt: skip
        container["volumeMounts"].append({"name": "check", "mountPath": "/data/check", "readOnly": True})
        spec["volumes"].append({"name": "check", "hostPath": {"path": CHECK_PATH, "type": "Directory"}})
        for cluster in SITES.values():
            self.planes[cluster].kubectl("-n", NS, "apply", "-f", "-", input_text=json.dumps(template))
        for site, cluster in SITES.items():
            core = k8s.CoreV1Api(self.planes[cluster].api_client())

            def running(core: Any = core) -> list[Any]:
                pods = core.list_namespaced_pod(NS, label_selector="app=sensor-model").items
                up = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip]
                return up if len(up) == 2 else []

            for p in self._wait(running, 180, f"the agents on {cluster}"):
                self.agents.append((cluster, p.metadata.name, p.status.pod_ip))
                self.prometheus.add_target(f"agents-{cluster}", f"{p.status.pod_ip}:8080", namespace=NS,
                                           cluster=cluster, site=site, pod=p.metadata.name)  # fmt: skip
        self._wait(lambda: all(self._infer(ip, cluster) for cluster, _, ip in self.agents), 120, "agents answering")
        self.check("inference workloads serve the base model", len(self.agents) == 4,
                   ", ".join(f"{c}/{p}" for c, p, _ in self.agents))  # fmt: skip

    def _infer(self, ip: str, cluster: str, batch: int = 8) -> tuple[str, int, int] | None:
        """One labelled batch from the site's check set: (version that answered, n, wrong)."""
        assert self.data is not None  # noqa: S101
        site = next(s for s, c in SITES.items() if c == cluster)
        check = self.data.sites[site]
        start = int(time.monotonic() * 7) % max(1, len(check.check_x) - batch)
        x, y = check.check_x[start : start + batch], check.check_y[start : start + batch]
        body = json.dumps(sensor.inference_request(x)).encode()
        request = urllib.request.Request(f"http://{ip}:8080/v2/models/edgetune/infer", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - the agent's pod address
                answer = json.loads(response.read())
        except OSError:
            return None
        labels = next(o["data"] for o in answer["outputs"] if o["name"] == "label")
        return str(answer["model_version"]), len(y), int(sum(str(a) != str(b) for a, b in zip(labels, y, strict=True)))

    def _traffic(self) -> None:
        """Every site's check data, sent as live requests: the answers are scored per version that gave them."""
        while not self._stop_traffic.wait(0.25):
            for cluster, _, ip in self.agents:
                answer = self._infer(ip, cluster)
                if answer is not None:
                    with self.record.lock:
                        self.record.traffic.append((time.time(), cluster, *answer))

    # -- 5. training ---------------------------------------------------------------------------------

    def _job(self, name: str, accelerator: str, *, per_node: bool, fedavg: bool, encoding: str) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "baseModel": {"uri": "s3://models/meter-base", "sha256": self.base_sha, "revision": "lab-v1"},
            "data": {"source": {"hostPath": DATA_PATH}, "format": "npy", "evalFraction": 0.2, "minSamples": 50},
            "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"maxSteps": 120, "batchSize": 32, "learningRate": 0.005,
                         "evalEvery": 20, "checkpointEvery": 40},
            "budgets": {"memory": MEMORY_BUDGET, "deadline": "10m"},
            # The sites' GPU and NPU nodes are simulated: the trainers find no accelerator and train on
            # the CPU because the job allows it (each target's status says device cpu).
            "placement": {"clusterSelector": {"matchLabels": {"region": "eu"}}, "accelerator": accelerator,
                          "allowCpuFallback": True, "perNode": per_node},
            "output": {"s3": {"bucket": BUCKET, "prefix": "meters", "credentialsSecretRef": "s3-credentials"},
                       "mlflow": {"registeredModel": MODEL}, "encoding": encoding,
                       "signingKeySecretRef": {"name": "adapter-signing", "key": "key.pem"}},
        }  # fmt: skip
        if fedavg:
            spec["aggregation"] = {"strategy": "fedavg", "minParticipants": 2}
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EdgeTrainingJob", "metadata": {"name": name}, "spec": spec}

    def train(self) -> None:
        self.display.stage("Training where the data is: LoRA per NPU node; FedAvg over the GPU nodes of both sites")
        api = k8s.CustomObjectsApi(self.planes["hub"].api_client())
        jobs = {
            "meters-npu": self._job("meters-npu", "npu", per_node=True, fedavg=False, encoding="int4-zstd"),
            "meters-gpu-fedavg": self._job("meters-gpu-fedavg", "gpu", per_node=True, fedavg=True,
                                           encoding="int8-zstd"),
        }  # fmt: skip
        start = time.time()
        for manifest in jobs.values():
            api.create_namespaced_custom_object(GROUP, VERSION, NS, "edgetrainingjobs", manifest)
        self.mark("training", "jobs created")

        def finished() -> dict[str, dict[str, Any]] | None:
            objs = {n: api.get_namespaced_custom_object(GROUP, VERSION, NS, "edgetrainingjobs", n) for n in jobs}
            self.display.training(objs, self._trainer_metrics())
            done = all((o.get("status") or {}).get("phase") in ("Succeeded", "Failed") for o in objs.values())
            return objs if done else None

        objs = self._wait(finished, 900, "both EdgeTrainingJobs to finish", every=1.0)
        self.record.windows["training"] = (start, time.time())
        self.mark("training", "jobs finished")
        self.record.jobs = objs
        for name, obj in objs.items():
            status = obj.get("status") or {}
            failed = [f"{t['cluster']}/{t.get('node')}: {t.get('message')}" for t in status.get("targets", [])
                      if t.get("phase") == "Failed"]  # fmt: skip
            self.check(f"job {name} succeeded", status.get("phase") == "Succeeded",
                       f"{len(status.get('targets', []))} trainers, {status.get('progress')}"
                       + (f"; failed: {failed}" if failed else ""))  # fmt: skip
        npu = objs["meters-npu"]["status"]
        nodes = {t["node"]: t for t in npu["targets"]}
        self.check("one NPU trainer per NPU node", sorted(nodes) == sorted(
            f"{s}-npu-{i}" for s in SITES for i in range(2)), ", ".join(sorted(nodes)))  # fmt: skip
        fed = objs["meters-gpu-fedavg"]["status"]["result"]
        self.record.versions["good"] = str(fed["mlflowVersion"])
        self.record.versions["miswired"] = str(nodes[sensor.MISWIRED_NODE]["mlflowVersion"])
        self.check("FedAvg adapter registered in MLflow", bool(fed.get("mlflowVersion")),
                   f"{MODEL} v{fed['mlflowVersion']}: {fed.get('participants')} sites, {fed.get('bytes')} bytes "
                   f"({fed.get('encoding')}), signed")  # fmt: skip
        left = {cluster: sorted(x.metadata.name for x in k8s.CoreV1Api(self.planes[cluster].api_client())
                                .list_namespaced_secret(NS).items if x.metadata.name != "adapter-store")
                for cluster in SITES.values()}  # fmt: skip
        self.check("no hub credentials at the edge", not any(left.values()),
                   "trainers uploaded with presigned policies for their own prefix and signed with keys derived "
                   "for them; the hub counter-signed; their Secrets are gone" if not any(left.values()) else
                   f"Secrets left: {left}")  # fmt: skip
        self._package_sizes()

    def _package_sizes(self) -> None:
        assert self.s3 is not None  # noqa: S101
        client = self.s3.client()
        uris: dict[str, str] = {}
        for obj in self.record.jobs.values():
            status = obj["status"]
            for t in status.get("targets", []):
                if t.get("mlflowVersion") and t.get("deltaUri"):
                    uris[str(t["mlflowVersion"])] = t["deltaUri"]
            result = status.get("result") or {}
            if result.get("mlflowVersion") and result.get("deltaUri"):
                uris[str(result["mlflowVersion"])] = result["deltaUri"]
        for version, uri in uris.items():
            bucket, _, prefix = uri.removeprefix("s3://").partition("/")
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
            self.record.package_bytes[version] = sum(o["Size"] for o in listed.get("Contents", []))

    def _trainer_metrics(self) -> dict[tuple[str, str], dict[str, float]]:
        assert self.prometheus is not None  # noqa: S101
        out: dict[tuple[str, str], dict[str, float]] = {}
        sel = f'{{namespace="{NS}"}}'
        queries = {"step": f"edgetune_trainer_step{sel}", "loss": f"edgetune_trainer_loss{sel}",
                   "eval_accuracy": f"edgetune_trainer_eval_accuracy_ratio{sel}",
                   "peak_memory": f"max without (device) (edgetune_trainer_peak_memory_bytes{sel})",
                   "energy": f"max without (method) (edgetune_trainer_energy_joules{sel})"}  # fmt: skip
        for key, query in queries.items():
            with contextlib.suppress(OSError, EnvironmentSetupError):
                for row in self.prometheus.query(query):
                    where = (row["metric"].get("cluster", ""), row["metric"].get("node", ""))
                    out.setdefault(where, {})[key] = float(row["value"][1])
        return out

    # -- 6. releases -----------------------------------------------------------------------------------

    def _release(self, name: str, version: str) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "AdapterRelease", "metadata": {"name": name},
            "spec": {
                "adapter": {"registeredModel": MODEL, "version": version},
                "targets": {"clusterSelector": {"matchLabels": {"region": "eu"}},
                            "workloadSelector": {"matchLabels": {"app": "sensor-model"}}},
                "strategy": {"canary": {"maxUnavailable": 2, "progressDeadline": "3m", "steps": [
                    {"setWeight": 50}, {"pause": {"duration": f"{self.canary_seconds}s"}}, {"analysis": {}},
                    {"setWeight": 100}]}},
                "analysis": {"metrics": [{
                    "name": "site-accuracy", "interval": "3s", "count": 3, "failureLimit": 0,
                    "noData": "inconclusive", "thresholdRange": {"min": ACCURACY_GATE},
                    "query": ('min(edgetune_agent_eval_accuracy_ratio{namespace="{{namespace}}",'
                              'cluster="{{cluster}}",version="{{version}}"})'),
                }]},
                "rollback": {"automatic": True, "publishRevocation": True,
                             "s3": {"credentialsSecretRef": "s3-credentials"}},
                "promotion": {"alias": "champion"},
            },
        }  # fmt: skip

    def release(self, name: str, role: str, expect: str) -> dict[str, Any]:
        version = self.record.versions[role]
        title = {"good": "the federated adapter", "miswired": f"the adapter of {sensor.MISWIRED_NODE} (miswired)"}[role]
        self.display.stage(f"Release {name}: {title}, v{version}: 50 % canary, analysis, 100 %")
        api = k8s.CustomObjectsApi(self.planes["hub"].api_client())
        api.create_namespaced_custom_object(GROUP, VERSION, NS, "adapterreleases", self._release(name, version))
        start = time.time()
        seen: list[str] = []

        def done() -> dict[str, Any] | None:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, NS, "adapterreleases", name)
            status = obj.get("status") or {}
            phase = status.get("phase") or "Pending"
            label = f"{phase} step {status.get('currentStep')} weight {status.get('canaryWeight') or 0} %"
            if not seen or seen[-1] != label:
                seen.append(label)
                self.mark(name, label)
            self.display.release(name, obj, self._serving())
            return obj if phase in ("Promoted", "RolledBack", "Failed", "Aborted") else None

        obj = self._wait(done, 300, f"AdapterRelease {name} to finish", every=1.0)
        self.record.releases[name] = obj
        phase = obj["status"]["phase"]
        serving = self._wait(lambda: self._serving_settled(expect if phase == "Promoted" else None), 60,
                             "the agents to settle")  # fmt: skip
        time.sleep(2)  # a little settled traffic on the plot
        self.record.windows[name] = (start, time.time())
        self.check(f"release {name} {phase}", phase == ("Promoted" if expect == version else "RolledBack"),
                   f"serving now: {serving}")  # fmt: skip
        return dict(obj)

    def _serving(self) -> dict[str, str]:
        from edgetune_api.assignment import REPORT_ANNOTATION, AdapterReport  # noqa: PLC0415

        out = {}
        for cluster in SITES.values():
            core = k8s.CoreV1Api(self.planes[cluster].api_client())
            for p in core.list_namespaced_pod(NS, label_selector="app=sensor-model").items:
                raw = (p.metadata.annotations or {}).get(REPORT_ANNOTATION)
                report = AdapterReport.model_validate_json(raw) if raw else None
                out[f"{cluster}/{p.metadata.name}"] = report.active.version if report and report.active else "base"
        return out

    def _serving_settled(self, version: str | None) -> dict[str, str] | None:
        serving = self._serving()
        wanted = version or self.record.versions["good"]
        return serving if serving and all(v == wanted for v in serving.values()) else None

    # -- 7. results ------------------------------------------------------------------------------------

    def measure(self) -> None:
        assert self.prometheus is not None  # noqa: S101
        rows = self.prometheus.query(f'edgetune_agent_eval_accuracy_ratio{{namespace="{NS}"}}')
        for row in rows:
            m = row["metric"]
            per = self.record.accuracy.setdefault(m.get("cluster", "?"), {})
            per[m["version"]] = min(per.get(m["version"], 1.0), float(row["value"][1]))
        good, bad = self.record.versions["good"], self.record.versions["miswired"]
        for cluster in SITES.values():
            acc = self.record.accuracy.get(cluster, {})
            before, after = acc.get("base"), acc.get(good)
            self.check(f"{cluster}: adapter recovers accuracy", before is not None and after is not None
                       and after >= ACCURACY_GATE and after >= before + 0.2,
                       f"base {before if before is None else f'{before:.3f}'} -> v{good} "
                       f"{after if after is None else f'{after:.3f}'}; miswired v{bad}: "
                       f"{acc.get(bad, float('nan')):.3f}")  # fmt: skip

    def plugin(self) -> None:
        """What a person does next: ``kubectl edgetune`` on the hub (the plugin the set-up installs)."""
        self.display.stage("kubectl edgetune get -n demo  (the kubectl plugin, on the hub)")
        hub = self.planes["hub"].kubeconfig
        binary = str(Path(sys.executable).parent / "kubectl-edgetune")

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([binary, f"--kubeconfig={hub}", "-n", NS, *args], capture_output=True, text=True,
                                  timeout=60, check=False)  # fmt: skip

        tree = run("get")
        self.display.text(tree.stdout)
        codes = {name: run("status", f"release/{name}", "--timeout=10s").returncode
                 for name in ("meters-rollout", "meters-miswired")}  # fmt: skip
        logs = run("logs", "job/meters-npu", "--cluster=edge-farm", f"--node={sensor.MISWIRED_NODE}", "--tail=5")
        self.check("kubectl edgetune get / status / logs", tree.returncode == 0 and "meters-gpu-fedavg" in tree.stdout
                   and codes == {"meters-rollout": 0, "meters-miswired": 1} and '"packaged"' in logs.stdout,
                   f"status exit codes {codes} (0 promoted, 1 rolled back); the miswired trainer's log read on "
                   f"edge-farm: {len(logs.stdout.splitlines())} lines {logs.stderr.strip()}", fatal=False)  # fmt: skip

    def dashboards(self) -> None:
        """Every panel of every Grafana dashboard (edgetune_dashboards), queried over the demo's time
        range as Grafana would: each must show data after this scenario."""
        from edgetune_dashboards import queries  # noqa: PLC0415 - a development package
        from edgetune_testenv.demo.report import query_range  # noqa: PLC0415

        empty, series = [], {}
        for board, panel, expr in queries():
            found = query_range(self, expr, self.record.started, time.time(), step=5)
            series[f"{board} / {panel}: {expr}"] = len(found)
            if not found:
                empty.append(f"{board} / {panel}: {expr}")
        self.record.dashboard_series = series
        detail = f"{len(series)} queries of 4 dashboards" + (f"; empty: {empty}" if empty else "")
        self.check("every dashboard panel shows data", not empty, detail, fatal=False)

    def run(self, hold: bool) -> int:
        with contextlib.ExitStack() as stack:
            try:
                self.up(stack)
                self.install()
                self.prepare()
                self.workloads()
                self.train()
                threading.Thread(target=self._traffic, name="traffic", daemon=True).start()
                self.release("meters-rollout", "good", self.record.versions["good"])
                self.release("meters-miswired", "miswired", self.record.versions["good"])
                self.measure()
                self.dashboards()
                self.plugin()
            except DemoFailedError as exc:
                if not self.checks or self.checks[-1].passed:  # a wait that timed out, not a failed check
                    self.checks.append(Check("demo stopped", False, str(exc)))
                self.display.failure(str(exc), self._operator_log())
            except Exception as exc:  # anything else: the same report, with the traceback
                self.checks.append(Check("demo stopped", False, f"{type(exc).__name__}: {exc}"))
                self.display.failure(traceback.format_exc(), self._operator_log())
            finally:
                self._stop_traffic.set()
            self.results.mkdir(parents=True, exist_ok=True)
            from edgetune_testenv.demo import report  # noqa: PLC0415 - matplotlib only once there is a story

            summary = report.write(self, self.results)
            self.display.summary(summary, self.results)
            if hold:
                self.display.hold(self)
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
            self.display.stage("Tearing down")
        ok = bool(self.checks) and all(c.passed for c in self.checks)
        return 0 if ok else 1

    def _operator_log(self) -> str:
        with contextlib.suppress(Exception):
            pod = self._operator_pod()
            return self.executors["hub"].logs(SYSTEM, pod.metadata.name)[-3000:]
        return ""


def results_folder(given: Path | None) -> Path:
    if given is not None:
        return given
    return Path.cwd() / "demo-results" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


@contextlib.contextmanager
def workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="edgetune-demo-") as tmp:
        yield Path(tmp)
