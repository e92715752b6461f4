"""The agent's Prometheus metrics: every name is defined here and nowhere else.

Served on the inference port at ``/metrics``. Per-version series carry ``model``, ``version``
(the adapter version, ``base`` for the bare base model) and ``release`` (``namespace/name`` of
the AdapterRelease, empty when none), which is what an AdapterRelease analysis queries.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

PREFIX = "edgetune_agent"
VERSION_LABELS = ("model", "version", "release")


class AgentMetrics:
    """One registry per agent (tests run several in one process)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series only add noise
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Inference requests answered.", VERSION_LABELS, registry=r)
        self.request_errors = Counter(
            f"{PREFIX}_request_errors", "Inference requests that failed, by HTTP status code.",
            [*VERSION_LABELS, "code"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds", "Inference latency (receive to response), per adapter version.",
            VERSION_LABELS, registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )  # fmt: skip
        self.adapter_info = Gauge(
            f"{PREFIX}_adapter_info", "1 for the adapter serving (role=active) or shadowing (role=shadow).",
            [*VERSION_LABELS, "sha256", "role"], registry=r,
        )  # fmt: skip
        self.swaps = Counter(f"{PREFIX}_swaps", "Adapter swaps completed, by where the adapter came from.",
                             ["model", "source"], registry=r)  # fmt: skip
        self.swap_seconds = Histogram(
            f"{PREFIX}_swap_duration_seconds",
            "Assignment seen to new adapter serving, by source (resident, cache, download).",
            ["model", "source"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.swap_failures = Counter(
            f"{PREFIX}_swap_failures", "Adapters refused or not loaded, by reason (HashMismatch, SignatureInvalid, …).",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.downloads = Counter(f"{PREFIX}_downloads", "Delta packages downloaded.", ["model"], registry=r)
        self.download_bytes = Counter(f"{PREFIX}_download_bytes", "Bytes of delta packages downloaded.", ["model"],
                                      registry=r)  # fmt: skip
        self.poll_interval = Gauge(
            f"{PREFIX}_assignment_poll_interval_seconds",
            "How often the agent looks at its assignment file (--poll-seconds): a floor under every swap's latency.",
            ["model"], registry=r,
        )  # fmt: skip
        self.resident = Gauge(f"{PREFIX}_resident_adapters", "Adapters held in memory.", ["model"], registry=r)
        self.resident_bytes = Gauge(
            f"{PREFIX}_resident_adapter_bytes", "Bytes of adapter weights held in memory.", ["model"], registry=r
        )
        self.eval_accuracy = Gauge(
            f"{PREFIX}_eval_accuracy_ratio", "Accuracy on the node's labelled held-out data, per adapter version.",
            VERSION_LABELS, registry=r,
        )  # fmt: skip
        self.eval_loss = Gauge(
            f"{PREFIX}_eval_loss", "Loss on the node's labelled held-out data, per adapter version.",
            VERSION_LABELS, registry=r,
        )  # fmt: skip
        self.shadow_requests = Counter(
            f"{PREFIX}_shadow_requests", "Live requests also run through the shadow adapter.",
            [*VERSION_LABELS, "active_version"], registry=r,
        )  # fmt: skip
        self.shadow_agreements = Counter(
            f"{PREFIX}_shadow_agreements", "Shadowed requests where the shadow's answer equals the active one's.",
            [*VERSION_LABELS, "active_version"], registry=r,
        )  # fmt: skip
        self.reports_failed = Counter(
            f"{PREFIX}_report_failures", "Pod status/annotation/Event writes that failed (retried).", ["kind"],
            registry=r,
        )  # fmt: skip

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
