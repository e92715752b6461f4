"""Simulated edge nodes: Node objects that kwok keeps alive and the real scheduler places pods on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
NPU_RESOURCE = "rockchip.com/npu"
ACCELERATOR_LABEL = "edgetune.io/accelerator"


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node. ``capacity`` uses Kubernetes quantity strings."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    capacity: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()

    def to_manifest(self) -> dict[str, Any]:
        capacity = {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "64Gi", **self.capacity}
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            **self.labels,
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
            "spec": {"taints": [dict(t) for t in self.taints]},
            "status": {"capacity": capacity, "allocatable": capacity},
        }


def gpu_node(name: str, gpus: int = 1, **labels: str) -> NodeSpec:
    return NodeSpec(
        name,
        labels={
            ACCELERATOR_LABEL: "gpu",
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-Jetson-Orin",
            **labels,
        },
        capacity={GPU_RESOURCE: str(gpus), "cpu": "8", "memory": "32Gi"},
    )


def npu_node(name: str, npus: int = 1, **labels: str) -> NodeSpec:
    return NodeSpec(
        name,
        labels={ACCELERATOR_LABEL: "npu", "rockchip.com/npu.present": "true", **labels},
        capacity={NPU_RESOURCE: str(npus), "cpu": "8", "memory": "16Gi"},
    )


def cpu_node(name: str, **labels: str) -> NodeSpec:
    return NodeSpec(name, labels={ACCELERATOR_LABEL: "cpu", **labels}, capacity={"cpu": "4", "memory": "8Gi"})


def default_fleet(prefix: str = "edge") -> list[NodeSpec]:
    """Two GPU, two NPU and two CPU-only nodes: the shape of a small edge site."""
    return [
        gpu_node(f"{prefix}-gpu-0"),
        gpu_node(f"{prefix}-gpu-1"),
        npu_node(f"{prefix}-npu-0"),
        npu_node(f"{prefix}-npu-1"),
        cpu_node(f"{prefix}-cpu-0"),
        cpu_node(f"{prefix}-cpu-1"),
    ]


def scale_fleet(count: int, prefix: str = "scale") -> list[NodeSpec]:
    """``count`` nodes in a 1:1:2 GPU/NPU/CPU mix, for scale tests and benchmarks."""
    makers = (gpu_node, npu_node, cpu_node, cpu_node)
    return [makers[i % 4](f"{prefix}-{i:04d}") for i in range(count)]
