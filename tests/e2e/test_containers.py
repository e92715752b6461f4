"""The images built from the project's Dockerfiles (``edgetune_testenv.images``: buildah, offline)
run as real containers (the executor's container mode: runc), under the security context the
operator and the chart give them: non-root, read-only root filesystem, no capabilities, seccomp.

The first use builds the images (minutes, the CUDA trainer image most of it); later runs find them
in the cache (docs/images.md)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from kubernetes import client as k8s

from edgetune_testenv import binaries
from edgetune_testenv.cluster import EXECUTOR_LABEL, ControlPlane
from edgetune_testenv.containers import ContainerImage
from edgetune_testenv.demo.data import inference_request
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.images import BuiltImage, ImageBuilder, check_tools
from edgetune_testenv.nodes import default_fleet
from edgetune_testenv.procs import free_port, http_ok
from edgetune_testenv.servers import MlflowServer, S3Server
from tests.agent_support import BASE_HOST_PATH, CHANNELS, CLASSES, agent_pod, keypair, make_base
from tests.operator_support import DATA, get, job_manifest, s3_secret, wait_finished
from tests.support import eventually, new_namespace
from tests.trainer_support import sine_classes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
OPERATOR = "edgetune/operator:container"
TRAINER = "edgetune/trainer:container"
AGENT = "edgetune/agent:container"
CONTAINER = {EXECUTOR_LABEL: "container"}
LOCKED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
          "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


@pytest.fixture(scope="module")
def builder() -> ImageBuilder:
    check_tools()  # names what is missing (buildah, runc, mmdebstrap); the host-process suite is unaffected
    return ImageBuilder()


@pytest.fixture(scope="module")
def operator_image(builder: ImageBuilder) -> BuiltImage:
    return builder.build("operator")


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane("containers", tmp_path_factory.mktemp("containers")) as control_plane:
        control_plane.add_nodes(default_fleet("ctr"))
        yield control_plane


@pytest.fixture(scope="module")
def executor(plane: ControlPlane, operator_image: BuiltImage) -> Iterator[PodExecutor]:
    images = {OPERATOR: ContainerImage(operator_image.rootfs, operator_image.config)}
    with PodExecutor(plane, images, label_selector=f"{EXECUTOR_LABEL}=container") as running:
        yield running


@pytest.fixture
def core(plane: ControlPlane) -> Iterator[Any]:
    api = plane.api_client()
    yield k8s.CoreV1Api(api)
    api.close()


def _pod(name: str, script: str, pod: dict[str, Any] | None = None, **container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": CONTAINER},
        "spec": {
            "restartPolicy": "Never",
            "nodeName": "ctr-cpu-0",
            "securityContext": {"runAsNonRoot": True},
            "containers": [{"name": "main", "image": OPERATOR, "command": ["python", "-c", script], **container}],
            **(pod or {}),
        },
    }


def _terminated(core: Any, ns: str, name: str) -> Any:
    def ended() -> Any:
        statuses = core.read_namespaced_pod(name, ns).status.container_statuses or []
        return statuses[0].state.terminated if statuses and statuses[0].state.terminated else None

    return eventually(ended, timeout=90, what=f"pod {name} terminated")


FACTS = """
import ctypes, errno, json, os, pathlib, socket
facts = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()), "pid": os.getpid(),
         "hostname": socket.gethostname(), "pod": os.environ["POD"], "config": open("/etc/cfg/job.json").read()}
try:
    open("/owned-by-the-image", "w")
except OSError as exc:
    facts["root_write"] = errno.errorcode[exc.errno]
pathlib.Path("/scratch/ok").write_text("x")
facts["scratch"] = pathlib.Path("/scratch/ok").read_text()
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
facts.update({k: status[k].strip() for k in ("Seccomp", "NoNewPrivs", "CapEff", "CapBnd")})
libc = ctypes.CDLL(None, use_errno=True)
facts["unshare"] = libc.unshare(0x04000000) == 0 or errno.errorcode[ctypes.get_errno()]
facts["mount"] = libc.mount(b"none", b"/scratch", b"tmpfs", 0, None) == 0 or errno.errorcode[ctypes.get_errno()]
open("/dev/termination-log", "w").write(json.dumps(facts))
raise SystemExit(3)
"""


def test_a_container_runs_as_its_image_user_with_a_read_only_root_and_no_privileges(
    executor: PodExecutor, core: Any
) -> None:
    ns = new_namespace(core)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}, "data": {"job.json": '{"r": 8}'}})
    pod = _pod("facts", FACTS, securityContext=LOCKED,
               env=[{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
               volumeMounts=[{"name": "scratch", "mountPath": "/scratch"},
                             {"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True}],
               pod={"volumes": [{"name": "scratch", "emptyDir": {}},
                                {"name": "cfg", "configMap": {"name": "cfg", "defaultMode": 0o440}}],
                    "securityContext": {"runAsNonRoot": True, "fsGroup": 2000}})  # fmt: skip
    core.create_namespaced_pod(ns, pod)
    terminated = _terminated(core, ns, "facts")
    assert terminated.exit_code == 3 and terminated.reason == "Error", terminated
    facts = json.loads(terminated.message)
    # The image's user (Dockerfile USER 10001:10001), the pod's fsGroup as a supplementary group:
    # that is how it reads a 0440 ConfigMap it does not own.
    assert (facts["uid"], facts["gid"]) == (10001, 10001) and 2000 in facts["groups"]
    assert facts["config"] == '{"r": 8}'
    assert facts["root_write"] == "EROFS"  # readOnlyRootFilesystem is in force
    assert facts["scratch"] == "x"  # the emptyDir is writable for it
    assert facts["pid"] == 1 and facts["hostname"] == facts["pod"] == "facts"  # its own PID and UTS namespaces
    assert facts["Seccomp"] == "2" and facts["NoNewPrivs"] == "1"  # RuntimeDefault, no privilege escalation
    assert int(facts["CapEff"], 16) == 0 and int(facts["CapBnd"], 16) == 0  # drop: [ALL]
    assert facts["unshare"] == "EPERM" and facts["mount"] == "EPERM"


def test_the_memory_limit_is_the_cgroups_and_its_kill_is_oomkilled(executor: PodExecutor, core: Any) -> None:
    ns = new_namespace(core)
    script = "import time\nblob = bytearray(400 * 2**20)\ntime.sleep(30)"
    core.create_namespaced_pod(ns, _pod("hog", script, securityContext=LOCKED,
                                        resources={"limits": {"memory": "128Mi"}}))  # fmt: skip
    terminated = _terminated(core, ns, "hog")
    assert (terminated.reason, terminated.exit_code) == ("OOMKilled", 137)


def test_run_as_non_root_refuses_a_root_container_as_the_kubelet_does(executor: PodExecutor, core: Any) -> None:
    ns = new_namespace(core)
    core.create_namespaced_pod(ns, _pod("root", "print('never')", securityContext={"runAsUser": 0}))

    def waiting() -> Any:
        statuses = core.read_namespaced_pod("root", ns).status.container_statuses or []
        return statuses[0].state.waiting if statuses and statuses[0].state.waiting else None

    state = eventually(waiting, timeout=60, what="the container waiting")
    assert state.reason == "CreateContainerConfigError"
    assert "runAsNonRoot and image will run as root" in state.message


def test_the_chart_installs_an_operator_that_trains_in_a_trainer_container(
    plane: ControlPlane, executor: PodExecutor, builder: ImageBuilder, core: Any, s3: S3Server,
    mlflow_server: MlflowServer, tmp_path: Path,
) -> None:  # fmt: skip
    """The operator Deployment as the chart renders it, from the operator image, runs as a container;
    its trainer pod (init container included) runs from the trainer image, as a container, on a GPU node."""
    trainer = builder.build("trainer")  # the CUDA variant (PyPI's torch)
    executor.images[TRAINER] = ContainerImage(trainer.rootfs, trainer.config)
    ns = new_namespace(core, "ctr")
    s3.create_bucket("adapters")
    health = free_port()
    values = {
        "operator": {"image": {"repository": "edgetune/operator", "tag": "container"}, "podLabels": CONTAINER,
                     "metricsPort": free_port(), "healthPort": health, "resyncSeconds": 2,
                     "secretNamespaces": [ns]},
        "trainer": {"image": TRAINER, "podLabels": CONTAINER},
        "mlflow": {"trackingUri": mlflow_server.url},
        "s3": {"endpoint": s3.endpoint},
    }  # fmt: skip
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    helm = str(binaries.binary(binaries.HELM, "helm"))
    installed = subprocess.run(
        [helm, "install", "edgetune", str(REPO / "charts/edgetune"), f"--kubeconfig={plane.kubeconfig}",
         "--namespace=edgetune-system", "--create-namespace", f"--values={tmp_path / 'values.yaml'}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    eventually(lambda: _answers(f"http://127.0.0.1:{health}/healthz"), timeout=120, what="the operator container live")
    (operator_pod,) = core.list_namespaced_pod(
        "edgetune-system", label_selector="app.kubernetes.io/component=operator"
    ).items
    assert operator_pod.status.container_statuses[0].state.running

    for node in ("ctr-gpu-0", "ctr-gpu-1"):
        sine_classes(executor.node_root(node) / DATA.lstrip("/"), n=120)
    s3_secret(core, ns, s3.env())
    manifest = job_manifest("in-a-container")
    manifest["spec"]["placement"] = {"accelerator": "gpu", "allowCpuFallback": True}  # this plane's GPU nodes
    api = plane.api_client()
    k8s.CustomObjectsApi(api).create_namespaced_custom_object("edgetune.io", "v1alpha1", ns, "edgetrainingjobs",
                                                              manifest)  # fmt: skip
    job = wait_finished(api, ns, "in-a-container", timeout=420)
    assert job["status"]["phase"] == "Succeeded", (job["status"], executor.logs(ns, _trainer_pod(core, ns)))
    (target,) = job["status"]["targets"]
    assert target["node"].startswith("ctr-gpu-") and target["sha256"] and target["mlflowVersion"]
    pod = core.read_namespaced_pod(_trainer_pod(core, ns), ns)
    assert pod.status.init_container_statuses[0].state.terminated.exit_code == 0
    assert get(api, ns, "in-a-container")["status"]["progress"] == "1/1"
    api.close()


def _answers(url: str) -> bool:
    try:
        return http_ok(url)
    except OSError:  # not listening yet
        return False


def _trainer_pod(core: Any, ns: str) -> str:
    pods = core.list_namespaced_pod(ns).items
    return str(pods[0].metadata.name) if pods else ""


def test_the_agent_image_serves_an_inference_request(
    plane: ControlPlane, executor: PodExecutor, builder: ImageBuilder, core: Any, tmp_path: Path
) -> None:
    """The example agent Deployment's pod, from the agent image (built on the trainer's), as a
    container: it loads the base model from the node's disk and answers the Open Inference Protocol."""
    agent = builder.build("agent")
    executor.images[AGENT] = ContainerImage(agent.rootfs, agent.config)
    ns = new_namespace(core, "agent")
    helm = str(binaries.binary(binaries.HELM, "helm"))
    rbac = subprocess.run([helm, "template", "edgetune", str(REPO / "charts/edgetune"), "--show-only",
                           "templates/agent.yaml", f"--set=agent.namespaces={{{ns}}}", "--kube-version=1.36.3"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    plane.kubectl("apply", "-f", "-", input_text=rbac)
    node = "ctr-cpu-1"
    base_sha = make_base(executor.node_root(node) / BASE_HOST_PATH.lstrip("/"), seed=0)
    _, public = keypair(tmp_path, "trusted")
    core.create_namespaced_config_map(ns, {"metadata": {"name": "trusted-keys"},
                                           "data": {"release-signer.pem": public.read_text()}})  # fmt: skip
    pod = agent_pod("agent-0", node=node, base_sha=base_sha, keys_configmap="trusted-keys", s3_env={})
    pod["metadata"]["labels"][EXECUTOR_LABEL] = "container"
    pod["spec"]["containers"][0]["image"] = AGENT
    core.create_namespaced_pod(ns, pod)
    ip = eventually(lambda: core.read_namespaced_pod("agent-0", ns).status.pod_ip, what="the agent's pod IP")
    body = json.dumps(inference_request(np.zeros((1, CHANNELS, 48), np.float32))).encode()

    def answer() -> dict[str, Any] | None:
        request = urllib.request.Request(f"http://{ip}:8080/v2/models/edgetune/infer", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - the pod's loopback address
                return json.loads(response.read())  # type: ignore[no-any-return]
        except OSError:
            return None

    out = eventually(answer, timeout=120, what="the agent container answering")
    assert out["model_version"] == "base" and out["outputs"][1]["shape"] == [1, CLASSES], out
    statuses = core.read_namespaced_pod("agent-0", ns).status.container_statuses
    assert statuses[0].state.running  # still serving: a real container, not a finished process
