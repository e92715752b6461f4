"""Property-based tests (hypothesis): the codec and the package verifier on random bytes, and the
release plan's invariants on random fleets. Each property states what must hold for every input."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetune_api import codec
from edgetune_api.assignment import AdapterAssignment, AdapterReport, ServedAdapter
from edgetune_api.delta import MANIFEST, SIGNATURE, DeltaVerificationError, verify_package
from edgetune_operator.reconcile.release import ReleasedAdapter, Target, base_assignment, canary_plan, rollback_plan

ENCODINGS = ("fp32", "fp16", "int8-zstd", "int4-zstd")
CANARY = ReleasedAdapter(version="2", uri="s3://b/canary", sha256="c" * 64)
STABLE = ReleasedAdapter(version="1", uri="s3://b/stable", sha256="a" * 64)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(data=st.binary(max_size=4096), encoding=st.sampled_from(ENCODINGS))
def test_random_bytes_never_decode_into_anything_but_a_clear_error(data: bytes, encoding: str) -> None:
    try:
        decoded = codec.decode(data, encoding, limit=1 << 20)
    except codec.DecodeError:
        return
    assert all(isinstance(v, np.ndarray) for v in decoded.values())  # (random bytes that happen to parse)


@FAST
@given(state=st.dictionaries(st.from_regex(r"[a-z]{1,8}\.lora_[AB]\.weight", fullmatch=True),
                             st.tuples(st.integers(1, 16), st.integers(1, 40)), min_size=1, max_size=4),
       encoding=st.sampled_from(ENCODINGS), seed=st.integers(0, 2**16))  # fmt: skip
def test_every_encoding_round_trips_shapes_within_its_quantisation_error(
    state: dict[str, tuple[int, int]], encoding: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    tensors = {k: rng.normal(size=shape).astype(np.float32) for k, shape in state.items()}
    decoded = codec.decode(codec.encode(tensors, encoding), encoding)
    assert decoded.keys() == tensors.keys()
    levels = {"fp32": math.inf, "fp16": 2048, "int8-zstd": 127, "int4-zstd": 7}[encoding]
    for name, original in tensors.items():
        assert decoded[name].shape == original.shape
        if encoding == "int4-zstd":
            # Least squared error per block and level table: never worse than plain absmax scaling.
            plain = codec.dequantize_int4(*codec.quantize_int4(original, search=False), original.shape)
            assert ((decoded[name] - original) ** 2).sum() <= ((plain - original) ** 2).sum() * 1.0001 + 1e-12
            continue
        bound = np.abs(original).max() / levels + 1e-6 if levels != math.inf else 1e-7
        assert np.abs(decoded[name] - original).max() <= bound * 1.01


@FAST
@given(manifest=st.binary(max_size=2048), extra=st.dictionaries(st.text(min_size=1, max_size=12),
                                                                  st.binary(max_size=64), max_size=3))  # fmt: skip
def test_the_verifier_refuses_random_packages_with_its_own_error(manifest: bytes, extra: dict[str, bytes]) -> None:
    files = {MANIFEST: manifest, **{k: v for k, v in extra.items() if k not in (MANIFEST, SIGNATURE)}}
    try:
        verify_package(files)
    except DeltaVerificationError as exc:
        assert exc.reason in ("InvalidManifest", "HashMismatch")
    else:
        raise AssertionError("a random package verified")


def _fleet(sizes: list[int], assigned: list[bool]) -> list[Target]:
    targets, i = [], 0
    for c, size in enumerate(sizes):
        for p in range(size):
            stable = assigned[i % len(assigned)] if assigned else False
            assignment = STABLE.assignment("ns/r") if stable else None
            targets.append(Target(f"edge-{c}", "ns", f"pod-{p}", f"uid-{c}-{p}", assignment=assignment))
            i += 1
    return targets


fleets = st.lists(st.integers(1, 12), min_size=1, max_size=4)


@FAST
@given(sizes=fleets, assigned=st.lists(st.booleans(), max_size=8), weight=st.integers(0, 100),
       max_unavailable=st.integers(1, 10), waves=st.booleans())  # fmt: skip
def test_a_step_never_switches_more_than_max_unavailable_and_takes_each_clusters_share(
    sizes: list[int], assigned: list[bool], weight: int, max_unavailable: int, waves: bool
) -> None:
    targets = _fleet(sizes, assigned)
    plan = canary_plan(targets, canary=CANARY, stable=STABLE, weight=weight, max_unavailable=max_unavailable,
                       release="ns/r", release_key="uid-r", waves=waves)  # fmt: skip
    canary_writes = [t for t, a in plan.writes if a.sha256 == CANARY.sha256]
    assert len(canary_writes) <= max_unavailable
    assert len({t.key for t, _ in plan.writes}) == len(plan.writes)  # one write per target at most
    if not waves:  # every cluster gives the same share: ceil(n * w / 100) of its n targets
        expected = sum(math.ceil(n * weight / 100 - 1e-9) if weight < 100 else n for n in sizes)
        assert plan.wanted == expected
    stable_writes = [t for t, a in plan.writes if a.sha256 == STABLE.sha256]
    assert all(t.assignment is None for t in stable_writes)  # only those not already on stable


VERSIONS = {"canary": CANARY, "stable": STABLE, "base": None}


def _serving(version: str | None) -> AdapterReport | None:
    if version is None:
        return None
    adapter = VERSIONS[version]
    return AdapterReport(state="Serving", observed_at="t", active=ServedAdapter(
        version=adapter.version, sha256=adapter.sha256) if adapter else None)  # fmt: skip


def _assignment(version: str | None) -> AdapterAssignment | None:
    if version is None:
        return None
    adapter = VERSIONS[version]
    return adapter.assignment("ns/r") if adapter else base_assignment("ns/r")


def _confirmed(t: Target) -> Target:
    """The agent does what it was told."""
    a = t.assignment
    assert a is not None
    active = None if a.base else ServedAdapter(version=a.version, sha256=a.sha256 or "")
    return Target(t.cluster, t.namespace, t.name, t.uid, a, AdapterReport(state="Serving", observed_at="t",
                                                                           active=active))  # fmt: skip


version = st.sampled_from([None, "canary", "stable", "base"])


@FAST
@given(pods=st.lists(st.tuples(st.integers(0, 3), version, version), min_size=1, max_size=30),
       weights=st.lists(st.integers(0, 100), min_size=1, max_size=4), max_unavailable=st.integers(1, 6),
       with_stable=st.booleans(), confirm=st.lists(st.booleans(), min_size=1, max_size=16))  # fmt: skip
def test_max_unavailable_bounds_every_write_of_a_step_towards_canary_and_back_to_stable(
    pods: list[tuple[int, str | None, str | None]], weights: list[int], max_unavailable: int, with_stable: bool,
    confirm: list[bool],
) -> None:  # fmt: skip
    """Any fleet (pods told and serving any version, or nothing), any steps: after each reconcile's
    writes, the targets switching (told a version they do not confirm) are at most maxUnavailable,
    or as many as were already switching before it wrote anything; agents confirming at random, the
    steps still complete."""
    stable = STABLE if with_stable else None
    targets = [Target(f"edge-{c}", "ns", f"pod-{i}", f"uid-{i}", _assignment(told), _serving(serves))
               for i, (c, told, serves) in enumerate(pods)]  # fmt: skip
    already = sum(t.switching for t in targets)
    tick = 0
    for weight in sorted(weights):
        for _ in range(200):
            plan = canary_plan(targets, canary=CANARY, stable=stable, weight=weight, max_unavailable=max_unavailable,
                               release="ns/r", release_key="uid-r")  # fmt: skip
            assert len({t.key for t, _ in plan.writes}) == len(plan.writes)
            written = {t.key: a for t, a in plan.writes}
            targets = [_with(t, written[t.key]) if t.key in written else t for t in targets]
            assert sum(t.switching for t in targets) <= max(max_unavailable, already)
            if plan.complete and not plan.writes and not any(t.switching for t in targets):
                break
            # some agents confirm what they were told (at least one, so every run ends)
            switching = [i for i, t in enumerate(targets) if t.switching]
            chosen = {i for n, i in enumerate(switching) if confirm[(tick + n) % len(confirm)]} or set(switching[:1])
            tick += 1
            targets = [_confirmed(t) if i in chosen else t for i, t in enumerate(targets)]
            already = min(already, sum(t.switching for t in targets))
        else:
            raise AssertionError(f"step at {weight} % never completed")


@FAST
@given(sizes=fleets, weights=st.lists(st.integers(0, 100), min_size=2, max_size=5))
def test_the_canary_set_only_grows_as_the_weight_grows(sizes: list[int], weights: list[int]) -> None:
    targets = _fleet(sizes, [])
    chosen: set[str] = set()
    for weight in sorted(weights):
        plan = canary_plan(targets, canary=CANARY, stable=STABLE, weight=weight, max_unavailable=10_000,
                           release="ns/r", release_key="uid-r")  # fmt: skip
        wanted = {t.key for t, a in plan.writes if a.sha256 == CANARY.sha256} | chosen
        assert chosen <= wanted
        chosen = wanted
        targets = [_with(t, CANARY.assignment("ns/r")) if t.key in chosen else t for t in targets]


def _with(t: Target, assignment: AdapterAssignment) -> Target:
    return Target(t.cluster, t.namespace, t.name, t.uid, assignment=assignment, report=t.report)


@FAST
@given(sizes=fleets, assigned=st.lists(st.booleans(), max_size=8), stable=st.booleans())
def test_a_rollback_assigns_every_target_once_and_is_idempotent(
    sizes: list[int], assigned: list[bool], stable: bool
) -> None:
    targets = _fleet(sizes, assigned)
    first = rollback_plan(targets, canary=CANARY, stable=STABLE if stable else None, release="ns/r")
    assert first.wanted == len(targets)
    assert all(CANARY.sha256 in a.revoked for _, a in first.writes)
    written: dict[str, Any] = {t.key: a for t, a in first.writes}
    after = [_with(t, written[t.key]) if t.key in written else t for t in targets]
    assert not rollback_plan(after, canary=CANARY, stable=STABLE if stable else None, release="ns/r").writes
