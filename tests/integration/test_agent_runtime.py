"""The agent in-process with its real torch backend, real packages and the real HTTP server:
swaps under concurrent requests, bounded residency, the local evaluation gate, shadow mode,
revocation, retries, and the Open Inference Protocol surface. No Kubernetes here (see
tests/e2e/test_agent.py for the agent as a pod)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from edgetune_agent.adapters import AdapterRefused, PackageStore
from edgetune_agent.backends.torch import TorchBackend
from edgetune_agent.metrics import AgentMetrics
from edgetune_agent.runtime import AgentRuntime
from edgetune_agent.server import make_app
from edgetune_agent.settings import AgentSettings
from edgetune_api.assignment import REVOCATION_PREFIX, AdapterAssignment, Revocation, dumps
from edgetune_testenv.demo.data import inference_request
from tests.agent_support import CHANNELS, FakeS3, make_base, make_package, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A pinned base; random packages for it (one with huge weights) and one trained for real on the
    node's labelled data."""
    root = tmp_path_factory.mktemp("agent-world")
    sha = make_base(root / "base", seed=0)
    packages = {f"v{i}": (root / f"v{i}", make_package(root / f"v{i}", root / "base", sha, seed=i)) for i in (1, 2, 3)}
    packages["wild"] = (root / "wild", make_package(root / "wild", root / "base", sha, seed=9, scale=25.0))
    trained = train(root / "trained", root / "base", sha, data_seed=4, gain=1.0, key=None, steps=60)
    packages["good"] = (trained.folder, trained.sha256)
    shutil.copytree(root / "trained" / "data", root / "eval")
    return {"root": root, "sha": sha, "packages": packages}


def make_runtime(world: dict[str, Any], tmp: Path, **overrides: Any) -> AgentRuntime:
    settings = AgentSettings(
        base_uri=str(world["root"] / "base"), base_sha256=world["sha"], cache_dir=tmp / "cache",
        assignment_file=tmp / "assignment.json", poll_seconds=0.02, threads=1, **overrides,
    )  # fmt: skip
    store = PackageStore(settings.cache_dir, trusted_keys={}, require_signature=False)
    return AgentRuntime(settings, TorchBackend(settings), store, AgentMetrics())


def assignment(world: dict[str, Any], name: str, **extra: Any) -> AdapterAssignment:
    folder, sha = world["packages"][name]
    return AdapterAssignment(version=name, uri=str(folder), sha256=sha, **extra)


def request(seed: int = 0) -> list[dict[str, Any]]:
    x = np.random.default_rng(seed).normal(size=(2, CHANNELS, 48)).astype(np.float32)
    return inference_request(x)["inputs"]


def sample(runtime: AgentRuntime, name: str, **labels: str) -> float:
    total = 0.0
    for family in runtime.metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro())  # type: ignore[arg-type]


def test_swaps_between_concurrent_requests_never_fail_one(world: dict[str, Any], tmp_path: Path) -> None:
    runtime = make_runtime(world, tmp_path, max_resident=4)

    async def scenario() -> list[tuple[int, str, Any]]:
        answers: list[tuple[int, str, Any]] = []

        async def client(seed: int) -> None:
            for _ in range(40):
                outputs, used = await runtime.infer(request(seed), {})
                answers.append((seed, used.version if used else "base", outputs[1]["data"]))

        async def swapper() -> None:
            for name in ("v1", "v2", "v3", "v1", "v2", "v3"):
                await runtime.apply(assignment(world, name), 0.0)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(client(s) for s in range(4)), swapper())
        return answers

    answers = run(scenario)
    assert len(answers) == 160
    versions = {v for _, v, _ in answers}
    assert len(versions) >= 3, versions  # requests saw several adapters come and go

    async def reference(version: str, seed: int) -> Any:
        if version == "base":
            await runtime.on_model(runtime._activate, None)
        else:
            await runtime.apply(assignment(world, version), 0.0)
        return (await runtime.infer(request(seed), {}))[0][1]["data"]

    # Every answer is exactly what its adapter computes alone: no request ran on a half-swapped model.
    expected = {(v, s): run(lambda v=v, s=s: reference(v, s)) for s in range(4) for v in versions}
    mismatched = [(s, v) for s, v, data in answers if data != expected[(v, s)]]
    assert not mismatched, mismatched[:5]
    assert sample(runtime, "edgetune_agent_swaps_total", source="resident") >= 3
    runtime.close()


def test_residency_is_bounded_and_least_recently_used_goes_first(world: dict[str, Any], tmp_path: Path) -> None:
    runtime = make_runtime(world, tmp_path, max_resident=2)
    for name in ("v1", "v2", "v3"):
        run(lambda n=name: runtime.apply(assignment(world, n), 0.0))
    assert [a.version for a in runtime.resident.values()] == ["v2", "v3"]
    assert sorted(runtime.backend.peft.peft_config) == sorted(a.name for a in runtime.resident.values())  # type: ignore[attr-defined]
    assert sample(runtime, "edgetune_agent_resident_adapters") == 2
    runtime.close()


def test_eval_gate_refuses_a_regression_and_keeps_serving(world: dict[str, Any], tmp_path: Path) -> None:
    runtime = make_runtime(world, tmp_path, eval_data_dir=world["root"] / "eval", eval_format="npy",
                           eval_max_drop=0.05)  # fmt: skip
    run(lambda: runtime.apply(assignment(world, "good"), 0.0))
    good = runtime.active
    assert good is not None and good.scores and good.scores["eval_accuracy"] > 0.9
    with pytest.raises(AdapterRefused) as info:
        run(lambda: runtime.apply(assignment(world, "wild"), 0.0))
    assert info.value.reason == "EvalRegression" and "below the current" in info.value.message
    assert runtime.active is good and world["packages"]["wild"][1] not in runtime.resident
    assert sample(runtime, "edgetune_agent_eval_accuracy_ratio", version="wild") < sample(
        runtime, "edgetune_agent_eval_accuracy_ratio", version="good"
    )
    # the base itself was scored too (the reference before the first adapter)
    assert runtime.base_scores is not None and runtime.base_scores["eval_accuracy"] < 0.9
    runtime.close()


def test_shadow_runs_beside_the_active_adapter_and_counts_agreement(world: dict[str, Any], tmp_path: Path) -> None:
    runtime = make_runtime(world, tmp_path)

    async def scenario() -> None:
        await runtime.apply(assignment(world, "v1"), 0.0)
        await runtime.apply(assignment(world, "v1", mode="shadow"), 0.0)  # shadowing oneself is a no-op
        assert runtime.shadow is None
        await runtime.apply(assignment(world, "wild", mode="shadow"), 0.0)
        for seed in range(10):
            _, used = await runtime.infer(request(seed), {})
            assert used is not None and used.version == "v1"  # the shadow never answers
        await runtime.on_model(lambda: None)  # shadow jobs queued behind the requests have run

    run(scenario)
    shadowed = sample(runtime, "edgetune_agent_shadow_requests_total", version="wild", active_version="v1")
    agreed = sample(runtime, "edgetune_agent_shadow_agreements_total", version="wild", active_version="v1")
    assert shadowed == 10 and 0 <= agreed < 10  # huge random weights disagree somewhere

    async def served_again() -> None:
        # The assignment is the whole desired state: serving v1 again (what the release writes when
        # a shadow step is over) ends the shadow, though v1 was active all along.
        again = assignment(world, "v1")
        assert not runtime._satisfied(again)
        await runtime.apply(again, 0.0)
        assert runtime.shadow is None and runtime.active is not None and runtime.active.version == "v1"
        assert runtime._satisfied(again)

    run(served_again)
    runtime.close()


def test_assignment_loop_reports_revocation_and_retries(world: dict[str, Any], tmp_path: Path) -> None:
    runtime = make_runtime(world, tmp_path)
    reports: list[Any] = []
    runtime.on_report = lambda report, event: reports.append((report, event))
    path = tmp_path / "assignment.json"

    async def until(predicate: Callable[[], bool]) -> None:
        for _ in range(300):
            await runtime.step()
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not reached; last report {reports[-1] if reports else None}")

    async def scenario() -> None:
        path.write_text(dumps(assignment(world, "v1")))
        await until(lambda: runtime.active is not None and runtime.active.version == "v1")
        path.write_text(dumps(assignment(world, "v2")))
        await until(lambda: runtime.active is not None and runtime.active.version == "v2")
        # v2 is rolled back: the operator assigns v1 again and revokes v2.
        path.write_text(dumps(assignment(world, "v1", revoked=[world["packages"]["v2"][1]])))
        await until(lambda: runtime.active is not None and runtime.active.version == "v1")
        # A stale assignment naming v2 again is refused.
        path.write_text(dumps(assignment(world, "v2")))
        await until(lambda: runtime.outcome.state == "Refused")
        assert runtime.outcome.error is not None and runtime.outcome.error.reason == "Revoked"
        assert runtime.active is not None and runtime.active.version == "v1"
        # Storage trouble is retried with backoff, and v1 serves meanwhile.
        flaky = {"left": 2}
        original = runtime.store.load

        def failing(*args: Any) -> Any:
            if flaky["left"]:
                flaky["left"] -= 1
                raise AdapterRefused("StorageUnavailable", "S3 unreachable (test)")
            return original(*args)

        runtime.store.load = failing  # type: ignore[method-assign]
        path.write_text(dumps(assignment(world, "v3")))
        await until(lambda: runtime.outcome.state == "Retrying")
        assert runtime.active.version == "v1"
        runtime.pending.next_try = 0.0  # skip the backoff's wait
        await until(lambda: runtime.outcome.state == "Retrying" and flaky["left"] == 0)
        runtime.pending.next_try = 0.0
        await until(lambda: runtime.active is not None and runtime.active.version == "v3")
        # Back to the bare base model (a rollback with no earlier stable adapter).
        path.write_text('{"version": "base", "base": true}')
        await until(lambda: runtime.active is None and runtime.outcome.state == "Serving")
        _, used = await runtime.infer(request(), {})
        assert used is None

    run(scenario)
    reasons = [e[1] for _, e in reports if e]
    assert reasons == ["AdapterSwapped", "AdapterSwapped", "AdapterRevoked", "AdapterRefused", "AdapterFetchRetrying",
                       "AdapterSwapped", "AdapterSwapped"]  # fmt: skip
    assert reports[-1][0].state == "Serving" and reports[-1][0].active is None
    assert reports[-1][0].desired is not None and reports[-1][0].desired.version == "base"
    runtime.close()


def test_a_revocation_published_in_s3_makes_the_agent_fall_back_by_itself(world: dict[str, Any],
                                                                           tmp_path: Path) -> None:  # fmt: skip
    """An agent the operator cannot reach still learns of a rollback: the operator publishes the
    revocation next to the package in S3, the agent polls it for what it serves."""
    runtime = make_runtime(world, tmp_path, revocation_poll_seconds=0.05)
    folder, v2 = world["packages"]["v2"]
    s3 = FakeS3(folder)
    runtime.store._s3 = s3
    reports: list[Any] = []
    runtime.on_report = lambda report, event: reports.append((report, event))

    async def scenario() -> None:
        stop = asyncio.Event()
        watch = asyncio.create_task(runtime.watch_revocations(stop))
        await runtime.apply(assignment(world, "v1"), 0.0)  # a local folder: nothing to poll
        await runtime.apply(AdapterAssignment(version="v2", uri="s3://adapters/prod/v2", sha256=v2), 0.0)
        assert runtime.store.origins[v2] == "s3://adapters/prod/v2"
        await asyncio.sleep(0.2)
        assert runtime.active is not None and runtime.active.version == "v2"  # nothing published yet
        record = Revocation(sha256=v2, version="v2", release="prod/r", reason="AnalysisFailed")
        s3.objects[("adapters", f"{REVOCATION_PREFIX}{v2}.json")] = record.model_dump_json().encode()
        for _ in range(100):
            if runtime.active is not None and runtime.active.version == "v1":
                break
            await asyncio.sleep(0.02)
        stop.set()
        await watch

    run(scenario)
    assert runtime.active is not None and runtime.active.version == "v1"
    assert v2 in json.loads((tmp_path / "cache" / "revoked.json").read_text())  # sticky across restarts
    report, event = reports[-1]
    assert report.state == "Refused" and report.error is not None and report.error.reason == "Revoked"
    assert "prod/r rolled it back (AnalysisFailed)" in report.error.message
    assert event is not None and event[1] == "AdapterRevoked"
    with pytest.raises(AdapterRefused, match="revoked"):
        run(lambda: runtime.apply(AdapterAssignment(version="v2", uri="s3://adapters/prod/v2", sha256=v2), 0.0))
    runtime.close()


def test_an_adapter_that_does_not_fit_the_layers_is_refused(world: dict[str, Any], tmp_path: Path) -> None:
    runtime = make_runtime(world, tmp_path)
    # Claims our base (same digest in its lineage) but was built for a 5-channel model.
    folder = tmp_path / "misfit"
    sha = make_package(folder, world["root"] / "base", None, seed=1, channels=5, base_uri=str(world["root"] / "base"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["lineage"]["base_model_sha256"] = world["sha"]
    from edgetune_api.delta import DeltaManifest, write_manifest  # noqa: PLC0415

    sha = write_manifest(folder, DeltaManifest.model_validate(manifest))
    run(lambda: runtime.apply(assignment(world, "v1"), 0.0))
    with pytest.raises(AdapterRefused) as info:
        run(lambda: runtime.apply(AdapterAssignment(version="misfit", uri=str(folder), sha256=sha), 0.0))
    assert info.value.reason == "ShapeMismatch" and "size mismatch" in info.value.message
    assert runtime.active is not None and runtime.active.version == "v1"
    assert run(lambda: runtime.infer(request(), {}))[1].version == "v1"  # nothing half-loaded serves
    runtime.close()


def test_open_inference_protocol_endpoints(world: dict[str, Any], tmp_path: Path) -> None:
    runtime = make_runtime(world, tmp_path)
    runtime.ready = True

    async def scenario() -> dict[str, Any]:
        async with TestClient(TestServer(make_app(runtime))) as client:
            out: dict[str, Any] = {}
            for path in (
                "/v2/health/live",
                "/v2/health/ready",
                "/v2",
                "/v2/models/edgetune",
                "/v2/models/edgetune/ready",
            ):
                resp = await client.get(path)
                out[path] = (resp.status, await resp.json())
            body = {"id": "r1", "inputs": request()}
            resp = await client.post("/v2/models/edgetune/infer", json=body)
            out["infer"] = (resp.status, await resp.json())
            await runtime.apply(assignment(world, "v1"), 0.0)
            resp = await client.post(
                "/v2/models/edgetune/versions/v1/infer", json={**body, "outputs": [{"name": "label"}]}
            )
            out["versioned"] = (resp.status, await resp.json())
            resp = await client.post("/v2/models/edgetune/versions/v7/infer", json=body)
            out["wrong-version"] = resp.status
            resp = await client.post("/v2/models/other/infer", json=body)
            out["other-model"] = resp.status
            bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 7, 10], "data": [0.0] * 70}]}
            resp = await client.post("/v2/models/edgetune/infer", json=bad)
            out["bad-shape"] = (resp.status, await resp.json())
            resp = await client.post("/v2/models/edgetune/infer", data=b"{nope")
            out["bad-json"] = resp.status
            resp = await client.get("/metrics")
            out["metrics"] = await resp.text()
            return out

    out = run(scenario)
    runtime.close()
    assert out["/v2/health/live"][0] == 200 and out["/v2/health/ready"] == (200, {"ready": True})
    meta = out["/v2/models/edgetune"][1]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, CHANNELS, -1]}]
    status, infer = out["infer"]
    assert status == 200 and infer["id"] == "r1" and infer["model_version"] == "base"
    assert [o["name"] for o in infer["outputs"]] == ["label", "probabilities"] and infer["outputs"][1]["shape"] == [
        2,
        3,
    ]
    status, versioned = out["versioned"]
    assert (
        status == 200 and versioned["model_version"] == "v1" and [o["name"] for o in versioned["outputs"]] == ["label"]
    )
    assert versioned["parameters"]["adapter_sha256"] == world["packages"]["v1"][1]
    assert out["wrong-version"] == 404 and out["other-model"] == 404 and out["bad-json"] == 400
    assert out["bad-shape"][0] == 400 and f"[batch, {CHANNELS}, length]" in out["bad-shape"][1]["error"]
    # The exposition is valid for Prometheus' own linter.
    check = subprocess.run(["promtool", "check", "metrics"], input=out["metrics"], capture_output=True, text=True,
                           check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert (
        'edgetune_agent_request_errors_total{code="400",model="edgetune",release="",version="v1"} 2.0' in out["metrics"]
    )


def test_the_base_model_comes_from_s3_verified_and_must_be_pinned(world: dict[str, Any], tmp_path: Path) -> None:
    from edgetune_trainer.models import ModelError  # noqa: PLC0415

    settings = AgentSettings(base_uri="s3://models/sensor-base", base_sha256=world["sha"], cache_dir=tmp_path / "c")
    backend = TorchBackend(settings, s3=FakeS3(world["root"] / "base"))
    assert backend.base.sha256 == world["sha"] and backend.kind == "series"
    with pytest.raises(ModelError, match="SHA-256"):
        TorchBackend(settings.model_copy(update={"base_sha256": "0" * 64, "cache_dir": tmp_path / "d"}),
                     s3=FakeS3(world["root"] / "base"))  # fmt: skip
    with pytest.raises(ModelError, match="not pinned"):
        TorchBackend(AgentSettings(base_uri=str(world["root"] / "base"), cache_dir=tmp_path / "e"))
