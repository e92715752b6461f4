"""The agent's parts on their own: the annotation contract, the kubelet's file format, the
readiness condition, and the package store's refusals (packages built here, a fake S3 client
where a test needs one)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import zstandard

from edgetune_agent.adapters import AdapterRefused, BaseIdentity, PackageStore, load_trusted_keys
from edgetune_agent.report import ready_condition
from edgetune_api.assignment import (
    AdapterAssignment,
    AdapterReport,
    AssignmentError,
    ReportError,
    ServedAdapter,
    format_downward_map,
    key_fingerprint,
    parse_assignment,
    parse_downward_map,
)
from edgetune_api.delta import MANIFEST, SIGNATURE, DeltaManifest, FileEntry, sha256_bytes, write_manifest
from tests.agent_support import FakeS3, keypair, make_base, make_package

SHA = "a" * 64

# -- the contract -----------------------------------------------------------------------------


def test_downward_map_round_trips_what_annotations_hold() -> None:
    values = {
        "edgetune.io/adapter": json.dumps({"version": "3", "uri": "s3://b/p", "note": 'say "hi"\\n'}),
        "multi": "line one\nline two\ttab",
        "unicode": "Zürich ✓",
        "empty": "",
    }
    text = format_downward_map(values)
    assert text.splitlines()[0].startswith("edgetune.io/adapter=")  # sorted keys, one per line
    assert parse_downward_map(text) == values


def test_downward_map_reads_go_escapes_the_kubelet_may_write() -> None:
    assert parse_downward_map('k="a\\x41\\u00fc\\101\\"b"') == {"k": 'aAüA"b'}
    with pytest.raises(ValueError, match="quoted"):
        parse_downward_map("k=unquoted")


def test_assignment_errors_name_the_field() -> None:
    with pytest.raises(AssignmentError, match=r"assignment: sha256 must be the package digest: 64 lowercase hex"):
        parse_assignment('{"version": "1", "uri": "s3://b/p"}')
    with pytest.raises(AssignmentError, match=r"uri must start with s3://, models:/, file:// or /, got 'ftp://x'"):
        parse_assignment(json.dumps({"version": "1", "uri": "ftp://x", "sha256": SHA}))
    with pytest.raises(AssignmentError, match=r"version: Field required"):
        parse_assignment(json.dumps({"uri": "s3://b/p", "sha256": SHA}))
    with pytest.raises(AssignmentError, match="not a valid adapter assignment"):
        parse_assignment("{not json")
    with pytest.raises(AssignmentError, match=r"base: true\) has no uri or sha256"):
        parse_assignment(json.dumps({"version": "base", "base": True, "sha256": SHA}))
    ok = parse_assignment(json.dumps({"version": "1", "uri": "s3://b/p", "sha256": SHA, "mode": "shadow"}))
    assert ok.mode == "shadow" and ok.revoked == [] and not ok.base
    assert parse_assignment('{"version": "base", "base": true}').base


def test_messages_from_a_newer_side_still_parse() -> None:
    """Operator and agents are upgraded separately: a field one side adds is ignored by the other."""
    newer = parse_assignment(json.dumps({"version": "1", "uri": "s3://b/p", "sha256": SHA, "priority": 3}))
    assert newer.sha256 == SHA
    report = AdapterReport.model_validate_json(json.dumps({
        "state": "Serving", "observed_at": "t", "gpu": "h200",
        "active": {"version": "1", "sha256": SHA, "warm": True}}))  # fmt: skip
    assert report.active is not None and report.active.sha256 == SHA


@pytest.mark.parametrize(
    ("state", "active", "expected"),
    [
        ("NoAssignment", None, ("True", "NoAssignment")),
        ("Serving", "2", ("True", "Serving")),
        ("Loading", "1", ("True", "Swapping")),
        ("Refused", "1", ("True", "Refused")),
        ("Retrying", "1", ("True", "Retrying")),
        ("Loading", None, ("False", "Loading")),  # a new pod without its first adapter takes no traffic
        ("Refused", None, ("False", "Refused")),
    ],
)
def test_readiness_condition_is_false_only_without_a_good_adapter(
    state: str, active: str | None, expected: tuple[str, str]
) -> None:
    error = ReportError(reason="HashMismatch", message="bad") if state == "Refused" else None
    report = AdapterReport(
        state=state,  # type: ignore[arg-type]
        active=ServedAdapter(version=active, sha256=SHA) if active else None,
        error=error,
        observed_at="now",
    )
    status, reason, message = ready_condition(report)
    assert (status, reason) == expected
    if active and state != "Serving":
        assert f"still serving {active}" in message


# -- the package store ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("base") / "base"
    return folder, make_base(folder, seed=0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    trusted, trusted_pub = keypair(root / "k", "trusted")
    stranger, _ = keypair(root / "k", "stranger")
    (root / "trusted").mkdir()
    shutil.copy(trusted_pub, root / "trusted" / "signer.pem")
    (root / "trusted" / "README").write_text("not a key")  # skipped, not fatal
    return {"trusted": trusted, "stranger": stranger, "dir": root / "trusted", "pub": trusted_pub}


def store(tmp: Path, keys: dict[str, Path] | None = None, **kw: Any) -> PackageStore:
    trusted = load_trusted_keys(keys["dir"]) if keys else {}
    return PackageStore(tmp / "cache", trusted_keys=trusted, require_signature=bool(trusted), **kw)


def load(s: PackageStore, folder: Path, sha: str, base: tuple[Path, str], **extra: Any) -> Any:
    return s.load(
        AdapterAssignment(version="1", uri=str(folder), sha256=sha, **extra), BaseIdentity(str(base[0]), base[1])
    )


def refusal(fn: Any) -> AdapterRefused:
    with pytest.raises(AdapterRefused) as info:
        fn()
    return info.value


def test_a_signed_package_from_a_trusted_key_loads(
    tmp_path: Path, base: tuple[Path, str], keys: dict[str, Path]
) -> None:
    sha = make_package(tmp_path / "p", *base, seed=1, key=keys["trusted"], encoding="int8-zstd")
    delta = load(store(tmp_path, keys), tmp_path / "p", sha, base, signer=key_fingerprint(keys["pub"].read_bytes()))
    assert delta.manifest.encoding == "int8-zstd" and delta.tensors and delta.downloaded_bytes == 0
    assert len(load_trusted_keys(keys["dir"])) == 1


def test_key_rotation_trusts_old_and_new_signers_at_once_then_only_the_new(
    tmp_path: Path, base: tuple[Path, str], keys: dict[str, Path]
) -> None:
    """Rotation: add the new public key beside the old one (both trusted: packages of either load),
    re-sign or retire the old packages, then remove the old key (its packages are refused)."""
    new, new_pub = keypair(tmp_path / "rotated", "new")
    both = tmp_path / "both"
    shutil.copytree(keys["dir"], both)
    shutil.copy(new_pub, both / "new.pem")
    old_sha = make_package(tmp_path / "old", *base, seed=1, key=keys["trusted"])
    new_sha = make_package(tmp_path / "new", *base, seed=2, key=new)
    during = PackageStore(tmp_path / "c1", trusted_keys=load_trusted_keys(both), require_signature=True)
    assert len(load_trusted_keys(both)) == 2
    assert load(during, tmp_path / "old", old_sha, base).manifest and load(during, tmp_path / "new", new_sha, base)
    only_new = tmp_path / "only-new"
    only_new.mkdir()
    shutil.copy(new_pub, only_new / "new.pem")
    after = PackageStore(tmp_path / "c2", trusted_keys=load_trusted_keys(only_new), require_signature=True)
    assert load(after, tmp_path / "new", new_sha, base).manifest
    assert refusal(lambda: load(after, tmp_path / "old", old_sha, base)).reason == "SignatureInvalid"


@pytest.mark.parametrize(
    ("case", "reason", "words"),
    [
        ("flipped", "HashMismatch", "has SHA-256"),
        ("other-digest", "HashMismatch", "expected"),
        ("unsigned", "Unsigned", "unsigned"),
        ("stranger", "SignatureInvalid", "does not verify"),
        ("untrusted-signer-id", "SignatureInvalid", "not among"),
        ("corrupt-zstd", "DecodeFailed", "does not decode"),
        ("other-base", "IncompatibleBase", "trained on base"),
        ("missing", "NotFound", "no package folder"),
        ("revoked", "Revoked", "revoked"),
        ("encoding", "InvalidAssignment", "encoding"),
    ],
)
def test_bad_packages_are_refused_with_a_reason(
    tmp_path: Path, base: tuple[Path, str], keys: dict[str, Path], case: str, reason: str, words: str
) -> None:
    folder = tmp_path / "p"
    sha = make_package(folder, *base, seed=1, key=keys["trusted"], encoding="int8-zstd")
    extra: dict[str, Any] = {}
    if case == "flipped":
        weights = folder / "adapter.safetensors.zst"
        weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    elif case == "other-digest":
        sha = "b" * 64
    elif case == "unsigned":
        (folder / SIGNATURE).unlink()
    elif case == "stranger":
        write_manifest(folder, DeltaManifest.model_validate_json((folder / MANIFEST).read_bytes()),
                       keys["stranger"].read_bytes())  # fmt: skip
    elif case == "untrusted-signer-id":
        extra["signer"] = "c" * 64
    elif case == "corrupt-zstd":  # hashes and signature right, the stream itself broken
        weights = folder / "adapter.safetensors.zst"
        broken = zstandard.ZstdCompressor().compress(b"not a safetensors file")[:-3]
        weights.write_bytes(broken)
        manifest = DeltaManifest.model_validate_json((folder / MANIFEST).read_bytes())
        manifest.files[weights.name] = FileEntry(sha256=sha256_bytes(broken), bytes=len(broken))
        sha = write_manifest(folder, manifest, keys["trusted"].read_bytes())
    elif case == "other-base":
        other = tmp_path / "other"
        other_sha = make_base(other, seed=5)
        shutil.rmtree(folder)
        sha = make_package(folder, other, other_sha, seed=1, key=keys["trusted"], encoding="int8-zstd")
    elif case == "missing":
        shutil.rmtree(folder)
    elif case == "revoked":
        extra["revoked"] = [sha]
    elif case == "encoding":
        extra["encoding"] = "fp16"
    err = refusal(lambda: load(store(tmp_path, keys), folder, sha, base, **extra))
    assert err.reason == reason and words in err.message, (err.reason, err.message)
    assert not err.retryable


def test_revocations_survive_a_restart(tmp_path: Path, base: tuple[Path, str]) -> None:
    sha = make_package(tmp_path / "p", *base, seed=1)
    store(tmp_path).remember_revoked([sha])
    assert refusal(lambda: load(store(tmp_path), tmp_path / "p", sha, base)).reason == "Revoked"


def test_disk_full_while_downloading_is_retryable_and_leaves_nothing_behind(
    tmp_path: Path, base: tuple[Path, str]
) -> None:
    sha = make_package(tmp_path / "p", *base, seed=1)
    s = store(tmp_path, s3_client=FakeS3(tmp_path / "p", OSError(errno.ENOSPC, "No space left on device")))
    assignment = AdapterAssignment(version="1", uri="s3://bucket/p", sha256=sha)
    err = refusal(lambda: s.load(assignment, BaseIdentity(str(base[0]), base[1])))
    assert err.reason == "DiskFull" and err.retryable
    assert [p.name for p in (tmp_path / "cache" / "packages").iterdir()] == []


def test_a_damaged_cache_entry_is_fetched_again(tmp_path: Path, base: tuple[Path, str]) -> None:
    sha = make_package(tmp_path / "p", *base, seed=1)
    s3 = FakeS3(tmp_path / "p")
    s = store(tmp_path, s3_client=s3)
    assignment = AdapterAssignment(version="1", uri="s3://bucket/p", sha256=sha)
    identity = BaseIdentity(str(base[0]), base[1])
    assert s.load(assignment, identity).downloaded_bytes > 0
    assert s.load(assignment, identity).downloaded_bytes == 0  # from the cache
    cached = tmp_path / "cache" / "packages" / sha / "adapter.safetensors"
    cached.write_bytes(b"bitrot" + cached.read_bytes()[6:])
    again = s.load(assignment, identity)
    assert again.downloaded_bytes > 0 and s3.downloads == 4  # two files (weights, manifest), downloaded twice


def test_an_empty_s3_prefix_is_not_found(tmp_path: Path, base: tuple[Path, str]) -> None:
    (tmp_path / "empty").mkdir()
    s = store(tmp_path, s3_client=FakeS3(tmp_path / "empty"))
    err = refusal(lambda: s.load(AdapterAssignment(version="1", uri="s3://bucket/gone", sha256=SHA),
                                 BaseIdentity(str(base[0]), base[1])))  # fmt: skip
    assert err.reason == "NotFound" and "s3://bucket/gone" in err.message and not err.retryable


# -- reporting to the pod ---------------------------------------------------------------------


class ApiserverDouble:
    """Answers the agent's three writes like an apiserver would, after ``fail_first`` 503s; keeps
    what it received. Unit-test double: the real apiserver is in tests/e2e/test_agent.py."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[str, str, str, dict[str, Any]]] = []

    async def handle(self, request: Any) -> Any:
        from aiohttp import web  # noqa: PLC0415

        body = await request.json()
        self.received.append((request.method, request.path, request.headers["Content-Type"], body))
        if self.fail_first:
            self.fail_first -= 1
            return web.Response(status=503, text="etcd leader changed")
        assert request.headers["Authorization"] == "Bearer token-1"
        return web.json_response({}, status=201 if request.method == "POST" else 200)


def test_reports_reach_the_pod_after_the_apiserver_comes_back(tmp_path: Path) -> None:
    import asyncio  # noqa: PLC0415

    from aiohttp import web  # noqa: PLC0415

    from edgetune_agent.metrics import AgentMetrics  # noqa: PLC0415
    from edgetune_agent.report import PodReporter  # noqa: PLC0415

    double = ApiserverDouble(fail_first=2)
    (tmp_path / "token").write_text("token-1\n")
    metrics = AgentMetrics()

    async def scenario() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", double.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        reporter = PodReporter(namespace="ns", pod="agent-0", uid="u1", metrics=metrics,
                               server=f"http://127.0.0.1:{port}", token_path=tmp_path / "token")  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(reporter.run(stop))
        loading = AdapterReport(state="Loading", observed_at="t0")
        serving = AdapterReport(state="Serving", active=ServedAdapter(version="2", sha256=SHA), observed_at="t1")
        reporter.publish(loading, None)
        reporter.publish(serving, ("Normal", "AdapterSwapped", "agent serves adapter version 2"))  # coalesced
        for _ in range(100):
            if any(r[0] == "POST" for r in double.received):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        await runner.cleanup()

    asyncio.run(scenario())
    ok = double.received[2:]  # the first two attempts met 503s and were retried
    annotation = next(r for r in ok if r[1] == "/api/v1/namespaces/ns/pods/agent-0")
    assert annotation[2] == "application/strategic-merge-patch+json"
    sent = json.loads(annotation[3]["metadata"]["annotations"]["edgetune.io/adapter-status"])
    assert sent["state"] == "Serving" and sent["active"]["version"] == "2"  # only the newest report went out
    condition = next(r for r in ok if r[1].endswith("/status"))[3]["status"]["conditions"][0]
    assert (condition["type"], condition["status"], condition["reason"]) == ("edgetune.io/AdapterReady", "True",
                                                                           "Serving")  # fmt: skip
    event = next(r for r in ok if r[0] == "POST")[3]
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "name": "agent-0", "namespace": "ns",
                                       "uid": "u1"} and event["reason"] == "AdapterSwapped"  # fmt: skip
    failures = sum(s.value for f in metrics.registry.collect() for s in f.samples
                   if s.name == "edgetune_agent_report_failures_total")  # fmt: skip
    assert failures == 2
