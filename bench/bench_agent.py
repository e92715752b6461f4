"""Edge agent benchmark: swap latency (from memory, from the local cache, from S3), failed requests
during swaps, inference latency with and without an adapter, idle memory.

Run with ``.venv/bin/python bench/bench_agent.py [--quick | --smoke]``; the last line printed is one JSON
object with ``swap_p99_ms`` (assignment written → first response computed by the new adapter,
package already on local disk, not resident), ``swap_download_p99_ms`` (the same, fetched from S3
and verified), ``rollback_to_resident_p99_ms`` (back to a version held in memory),
``requests_failed_during_swaps``, ``infer_p50_ms_base``, ``infer_p50_ms_adapter``,
``adapter_overhead_ratio`` (merged; ``_unmerged`` too; base and adapter measured in alternating
blocks), ``agent_idle_rss_mb`` and ``torch_peft_import_rss_mb`` (what dominates the idle figure),
plus the agent's own mean swap time by source (from its histogram: file noticed → adapter active).

The agent runs as a real process (``python -m edgetune_agent``) with the sensor CNN base; a real S3
server (versitygw) holds the packages. "Assignment written" is the moment the file the kubelet
would refresh (the downward-API annotations file) changes: every swap figure is **agent-side**
(``swap_figures`` says so); in a cluster, the kubelet's propagation of a pod annotation into that
file comes on top. ``poll_seconds`` is read from the running agent
(``edgetune_agent_assignment_poll_interval_seconds``).

End to end (``e2e_*`` keys): the same agent as a pod of the example Deployment's template on a real
control plane, run by the test environment's pod executor (the kubelet here), with the chart's
agent RBAC and own-pod policy. A swap is timed from the ``PATCH`` of the pod's assignment annotation
to the first answer from the new version: the API server, the executor's refresh of the
downward-API file (it rewrites the file on the pod's watch event; a real kubelet refreshes projected
files on its sync period, up to about a minute later, so on a real node that comes on top) and the
agent. ``--smoke``: two swaps of each kind and short blocks, to check the script (not the published
figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.agent_support import BASE_HOST_PATH, CHANNELS, agent_pod, keypair, make_base, make_package, upload  # noqa: E402
from tests.support import AGENT_IMAGE  # noqa: E402

from edgetune_api.assignment import ASSIGNMENT_ANNOTATION, REPORT_ANNOTATION, AdapterAssignment, dumps  # noqa: E402
from edgetune_testenv import chart  # noqa: E402
from edgetune_testenv.cluster import ControlPlane  # noqa: E402
from edgetune_testenv.demo.data import inference_request  # noqa: E402
from edgetune_testenv.executor import LocalImage, PodExecutor  # noqa: E402
from edgetune_testenv.nodes import cpu_node  # noqa: E402
from edgetune_testenv.procs import free_port  # noqa: E402
from edgetune_testenv.servers import S3Server  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Load:
    """Back-to-back requests from one thread; every response's time and adapter version recorded."""

    def __init__(self, url: str, body: bytes) -> None:
        self.url, self.body = url, body
        self.log: list[tuple[float, str]] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            req = urllib.request.Request(self.url, data=self.body, headers={"Content-Type": "application/json"})  # noqa: S310
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                    version = json.loads(resp.read())["model_version"]
                self.log.append((time.perf_counter(), version))
            except Exception:
                self.failed += 1

    def first_after(self, t0: float, version: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, v in reversed(self.log[-200:]):
                if t < t0:
                    break
                if v == version:
                    hits = [t for t, v2 in self.log[-400:] if t >= t0 and v2 == version]
                    return min(hits) - t0
            time.sleep(0.001)
        raise TimeoutError(f"version {version} never answered")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def block_median_ms(url: str, body: bytes, n: int) -> float:
    times = []
    for _ in range(n):
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            resp.read()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def paired_overhead(infer_url: str, body: bytes, switch: Any, version: str, *, rounds: int, n: int) -> dict[str, float]:
    """Base and adapter measured in alternating blocks on the same agent (``switch`` assigns the
    base or the adapter and waits until it answers): this VM's neighbours slow whole seconds down
    by 10-20 %, which would otherwise decide a comparison of two figures measured apart."""
    base, adapter, ratios = [], [], []
    for _ in range(rounds):
        switch("base")
        b = block_median_ms(infer_url, body, n)
        switch(version)
        a = block_median_ms(infer_url, body, n)
        base.append(b)
        adapter.append(a)
        ratios.append(a / b)
    return {"base_ms": statistics.median(base), "adapter_ms": statistics.median(adapter),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}  # fmt: skip


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1):  # noqa: S310 - loopback
            return True
    except OSError:
        return False


def serving(infer_url: str, body: bytes) -> str:
    req = urllib.request.Request(infer_url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        return str(json.loads(resp.read())["model_version"])


def end_to_end(tmp: Path, s3: S3Server, body: bytes, swaps: int) -> dict[str, Any]:
    """Swaps through Kubernetes: PATCH the pod's assignment annotation -> first answer from the new
    version (see the module docstring)."""
    from kubernetes import client as k8s  # noqa: PLC0415

    node, ns = "site-cpu-0", "bench"
    images = {AGENT_IMAGE: LocalImage(entrypoint=(sys.executable, "-m", "edgetune_agent"),
                                      env={"PYTHONUNBUFFERED": "1"})}  # fmt: skip
    with ControlPlane("bench-agent", tmp / "plane") as plane, PodExecutor(plane, images) as executor:
        plane.add_nodes([cpu_node(node)])
        core = k8s.CoreV1Api(plane.api_client())
        plane.kubectl("create", "namespace", ns)
        plane.kubectl("apply", "-f", "-", input_text=chart.render("agent.yaml", f"agent.namespaces={{{ns}}}"))
        base_dir = executor.node_root(node) / BASE_HOST_PATH.lstrip("/")
        base_sha = make_base(base_dir, seed=0)
        private, public = keypair(tmp / "e2e-keys", "signer")
        core.create_namespaced_config_map(ns, {"metadata": {"name": "signers"},
                                               "data": {"signer.pem": public.read_text()}})  # fmt: skip
        versions = [f"e{i}" for i in range(4)]
        client = s3.client()
        assignments = {}
        for i, v in enumerate(versions):
            sha = make_package(tmp / v, base_dir, base_sha, seed=100 + i, key=private)
            assignments[v] = AdapterAssignment(version=v, uri=upload(client, tmp / v, "bench", f"e2e/{v}"), sha256=sha)
        s3_env = {k: val for k, val in s3.env().items() if k.startswith("AWS_")}
        time.sleep(0.5)  # the namespace's default ServiceAccount
        core.create_namespaced_pod(ns, agent_pod("agent-0", node=node, base_sha=base_sha, keys_configmap="signers",
                                                 s3_env=s3_env))  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            pod = core.read_namespaced_pod("agent-0", ns)
            if pod.status.pod_ip and (pod.metadata.annotations or {}).get(REPORT_ANNOTATION):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the agent pod did not start and report")
            time.sleep(0.5)
        url = f"http://{pod.status.pod_ip}:8080/v2/models/edgetune/infer"

        def assign(version: str) -> float:
            t0 = time.perf_counter()
            core.patch_namespaced_pod("agent-0", ns, {"metadata": {"annotations": {
                ASSIGNMENT_ANNOTATION: dumps(assignments[version])}}})  # fmt: skip
            return t0

        resident: list[float] = []
        with Load(url, body) as load:
            downloads = [load.first_after(assign(v), v) * 1000 for v in versions]  # from S3, verified
            for i in range(swaps):  # back and forth between two versions held in memory
                v = versions[-2] if i % 2 == 0 else versions[-1]
                resident.append(load.first_after(assign(v), v) * 1000)
            failed = load.failed
    return {
        "e2e_swap_download_p50_ms": round(pct(downloads, 0.5), 1),
        "e2e_swap_download_p99_ms": round(pct(downloads, 0.99), 1),
        "e2e_swap_resident_p50_ms": round(pct(resident, 0.5), 1),
        "e2e_swap_resident_p99_ms": round(pct(resident, 0.99), 1),
        "e2e_requests_failed": failed, "e2e_swaps": {"download": len(downloads), "resident": len(resident)},
        "e2e_through": "PATCH of the pod annotation -> API server -> the test executor's downward-API refresh "
                       "(on the pod's watch event; a real kubelet's sync period comes on top) -> agent",
    }  # fmt: skip


def torch_floor_mb() -> float:
    code = "import resource, torch, peft; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:  # noqa: PLR0915 - one measurement script, top to bottom
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer swaps and requests (under two minutes)")
    parser.add_argument("--smoke", action="store_true", help="two swaps of each kind: checks the script")
    args = parser.parse_args()
    swaps = 2 if args.smoke else 8 if args.quick else 30
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    base_sha = make_base(tmp / "base", seed=0)
    versions = [f"v{i}" for i in range(swaps + 4)]
    packages = {v: (tmp / v, make_package(tmp / v, tmp / "base", base_sha, seed=i)) for i, v in enumerate(versions)}
    import numpy as np  # noqa: PLC0415

    x = np.random.default_rng(0).normal(size=(1, CHANNELS, 48)).astype(np.float32)
    body = json.dumps(inference_request(x)).encode()
    with S3Server(tmp / "s3") as s3:
        s3.create_bucket("bench")
        client = s3.client()
        uris = {v: upload(client, folder, "bench", v) for v, (folder, _) in packages.items()}
        assignment_file = tmp / "annotations"
        env = {**os.environ, **s3.env(), "PYTHONUNBUFFERED": "1"}

        def start(*extra: str) -> tuple[subprocess.Popen[str], str]:
            port = free_port()
            agent = subprocess.Popen(
                [sys.executable, "-m", "edgetune_agent", f"--base-uri={tmp / 'base'}", f"--base-sha256={base_sha}",
                 "--host=127.0.0.1", f"--port={port}", f"--assignment-file={assignment_file}",
                 f"--cache-dir={tmp / 'cache'}", "--max-resident=2", "--threads=1", "--no-report", *extra],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while not ready(url):
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise RuntimeError(f"agent did not start: {agent.stderr.read() if agent.stderr else ''}")
                time.sleep(0.1)
            return agent, url

        n, rounds = (5, 2) if args.smoke else (40, 6) if args.quick else (60, 15)

        def switcher(infer_url: str) -> Any:
            def switch(version: str) -> float:
                t0 = time.perf_counter()
                if version == "base":
                    a = AdapterAssignment(version="base", base=True)
                else:
                    a = AdapterAssignment(version=version, uri=uris[version], sha256=packages[version][1])
                tmp_file = assignment_file.with_suffix(".tmp")
                tmp_file.write_text(dumps(a))
                tmp_file.replace(assignment_file)  # atomic, as the kubelet writes it
                return t0

            return switch

        def switch_and_wait(infer_url: str) -> Any:
            switch = switcher(infer_url)

            def go(version: str) -> None:
                switch(version)
                while serving(infer_url, body) != version:
                    time.sleep(0.005)

            return go

        # Inference cost of an unmerged adapter (LoRA computed per request), on a separate agent.
        assignment_file.write_text("")
        unmerged, url = start("--no-merge")
        try:
            infer_url = f"{url}/v2/models/edgetune/infer"
            block_median_ms(infer_url, body, 20)
            unmerged_cost = paired_overhead(
                infer_url, body, switch_and_wait(infer_url), versions[0], rounds=rounds, n=n
            )
        finally:
            unmerged.terminate()
            unmerged.wait(30)
        assignment_file.write_text("")
        agent, url = start()
        infer_url = f"{url}/v2/models/edgetune/infer"
        try:
            block_median_ms(infer_url, body, 20)  # warm-up
            time.sleep(1.0)
            idle_rss = rss_mb(agent.pid)
            assign = switcher(infer_url)

            downloads, local, resident = [], [], []
            with Load(infer_url, body) as load:
                # 1. every version once: fetched from S3, verified, loaded
                for v in versions:
                    t0 = assign(v)
                    downloads.append(load.first_after(t0, v) * 1000)
                # 2. versions cached on disk but evicted from memory (max 2 resident)
                for i in range(swaps):
                    v = versions[i % 4]
                    t0 = assign(v)
                    local.append(load.first_after(t0, v) * 1000)
                # 3. back and forth between two resident versions (rollback)
                for i in range(swaps):
                    v = versions[-1] if i % 2 else versions[-2]
                    if i == 0:
                        assign(versions[-1])
                        load.first_after(time.perf_counter() - 1, versions[-1])
                    t0 = assign(v)
                    resident.append(load.first_after(t0, v) * 1000)
                failed, served = load.failed, len(load.log)
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:  # noqa: S310
                metrics = resp.read().decode()  # before the paired blocks add swaps of their own
            busy_rss = rss_mb(agent.pid)
            merged_cost = paired_overhead(infer_url, body, switch_and_wait(infer_url), versions[-1], rounds=rounds, n=n)
        finally:
            agent.terminate()
            agent.wait(30)
        e2e = end_to_end(tmp, s3, body, swaps)

    def series(name: str) -> dict[str, float]:
        return {
            line.split('source="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(name + "{")
        }

    sums, counts = (
        series("edgetune_agent_swap_duration_seconds_sum"),
        series("edgetune_agent_swap_duration_seconds_count"),
    )
    internal = {source: round(sums[source] / counts[source] * 1000, 1) for source in sums if counts.get(source)}
    poll = next(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("edgetune_agent_assignment_poll_interval_seconds{"))  # fmt: skip
    result: dict[str, Any] = {
        "swap_figures": "agent-side: from the downward-API file written to the first answer from the new version; "
        "the kubelet's propagation of the pod annotation comes on top",
        "swap_p99_ms": round(pct(local, 0.99), 1),
        "swap_p50_ms": round(pct(local, 0.5), 1),
        "swap_download_p99_ms": round(pct(downloads, 0.99), 1),
        "swap_download_p50_ms": round(pct(downloads, 0.5), 1),
        "rollback_to_resident_p99_ms": round(pct(resident, 0.99), 1),
        "rollback_to_resident_p50_ms": round(pct(resident, 0.5), 1),
        "requests_failed_during_swaps": failed,
        "requests_during_swaps": served,
        "infer_p50_ms_base": round(merged_cost["base_ms"], 3),
        "infer_p50_ms_adapter": round(merged_cost["adapter_ms"], 3),
        "adapter_overhead_ratio": round(merged_cost["ratio"], 3),
        "adapter_overhead_ratio_range": [round(merged_cost["ratio_min"], 3), round(merged_cost["ratio_max"], 3)],
        "infer_p50_ms_adapter_unmerged": round(unmerged_cost["adapter_ms"], 3),
        "adapter_overhead_ratio_unmerged": round(unmerged_cost["ratio"], 3),
        "adapter_overhead_ratio_unmerged_range": [
            round(unmerged_cost["ratio_min"], 3),
            round(unmerged_cost["ratio_max"], 3),
        ],
        "agent_idle_rss_mb": round(idle_rss, 1),
        "agent_rss_after_swaps_mb": round(busy_rss, 1),
        "torch_peft_import_rss_mb": round(torch_floor_mb(), 1),
        "swaps": {"download": len(downloads), "local": len(local), "resident": len(resident)},
        "agent_swap_mean_ms_by_source": internal,
        "poll_seconds": poll,
        **e2e,
        "smoke": args.smoke,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
