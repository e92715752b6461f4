"""EdgeCluster: a member cluster the hub can schedule trainers and releases on."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from edgetune_api.meta import ApiModel, Condition, Duration

ShortString = Annotated[str, StringConstraints(max_length=253)]


class KubeconfigSecretRef(ApiModel):
    """The Secret holding the member cluster's kubeconfig."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    """Secret name."""
    namespace: Annotated[str, StringConstraints(min_length=1, max_length=63)]
    """Namespace of the Secret (EdgeCluster is cluster-scoped, so it must be given)."""
    key: Annotated[str, StringConstraints(min_length=1, max_length=253)] = "kubeconfig"
    """Key of the kubeconfig inside the Secret."""


class EdgeClusterSpec(ApiModel):
    """Desired state of an EdgeCluster. Select clusters by their metadata labels (region, site, accelerator …)."""

    kubeconfig_secret_ref: KubeconfigSecretRef
    """How the operator reaches the cluster's API server."""
    heartbeat_interval: Duration = "30s"
    """How often the operator checks that the cluster answers."""
    paused: bool = False
    """Schedule no new work on this cluster (running work finishes)."""


class NodeCounts(ApiModel):
    """Ready nodes of each accelerator profile."""

    gpu: Annotated[int, Field(ge=0)] = 0
    """Nodes matching the gpu profile."""
    npu: Annotated[int, Field(ge=0)] = 0
    """Nodes matching an npu profile."""
    cpu: Annotated[int, Field(ge=0)] = 0
    """Nodes with no accelerator."""


class EdgeClusterStatus(ApiModel):
    """Observed state of an EdgeCluster, written by the operator only."""

    conditions: Annotated[list[Condition], Field(max_length=32)] = Field(default_factory=list)
    """Reachable …"""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The generation of the spec this status describes."""
    reachable: bool | None = None
    """The API server answered the last heartbeat."""
    kubernetes_version: ShortString | None = None
    """Version the API server reports."""
    nodes: Annotated[int, Field(ge=0)] | None = None
    """Nodes in the cluster."""
    nodes_by_accelerator: NodeCounts | None = None
    """Ready nodes per accelerator profile."""
    last_heartbeat_time: datetime | None = None
    """When the cluster last answered."""


class EdgeCluster(ApiModel):
    """A member edge cluster (e.g. K3s at a site) reachable through a kubeconfig Secret. The cluster the
    operator runs in is implicit and needs no EdgeCluster."""

    api_version: Literal["edgetune.io/v1alpha1"] = "edgetune.io/v1alpha1"
    kind: Literal["EdgeCluster"] = "EdgeCluster"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: EdgeClusterSpec
    status: EdgeClusterStatus | None = None
