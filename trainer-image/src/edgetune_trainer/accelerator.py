"""Which device a trainer trains on, decided from what the job reserved and what the pod can use.

Never silently: a gpu placement whose pod sees no usable GPU, or an npu placement (the trainer has
no NPU backend yet), fails with ``AcceleratorUnavailableError`` unless the job allows a CPU
fallback, and the device actually used is reported (summary, status per target, package lineage,
the ``edgetune_trainer_device_info`` metric). Pure: the caller says whether CUDA is usable.
"""

from __future__ import annotations

from dataclasses import dataclass


class AcceleratorUnavailableError(RuntimeError):
    """The job reserved an accelerator the trainer cannot use, and allowed no CPU fallback."""


@dataclass(frozen=True)
class DeviceChoice:
    torch_device: str
    """What torch trains on: ``cuda`` or ``cpu``."""
    warning: str | None = None
    """Set when a gpu or npu placement trains on the CPU (allowed by placement.allowCpuFallback)."""

    @property
    def device(self) -> str:
        """The device in the API's words: gpu or cpu."""
        return "gpu" if self.torch_device == "cuda" else "cpu"


def choose(accelerator: str, *, allow_cpu_fallback: bool, runtime_device: str, cuda: bool) -> DeviceChoice:
    """``accelerator``: placement.accelerator (gpu, npu, cpu, any); ``runtime_device``: runtime.device
    (auto, cpu, cuda: a run by hand may force one); ``cuda``: whether CUDA is usable in this process."""
    if runtime_device == "cuda" and not cuda:
        raise AcceleratorUnavailableError("runtime.device is cuda but no CUDA device is usable in this process")
    if accelerator == "gpu":
        if cuda and runtime_device != "cpu":
            return DeviceChoice("cuda")
        why = "runtime.device is cpu" if runtime_device == "cpu" else "no CUDA device is usable in the trainer's pod"
        return _fallback("gpu", why, allow_cpu_fallback)
    if accelerator == "npu":
        return _fallback("npu", "the trainer has no NPU backend yet", allow_cpu_fallback)
    if accelerator == "cpu":
        return DeviceChoice("cpu")
    return DeviceChoice("cuda" if cuda and runtime_device != "cpu" else "cpu")


def _fallback(kind: str, why: str, allowed: bool) -> DeviceChoice:
    if not allowed:
        raise AcceleratorUnavailableError(
            f"placement.accelerator is {kind} but {why}; the trainer does not train on the CPU of a node it "
            f"reserved a {kind.upper()} on unless placement.allowCpuFallback is true"
        )
    return DeviceChoice("cpu", f"placement.accelerator is {kind} but {why}: trained on the CPU "
                               "(placement.allowCpuFallback)")  # fmt: skip
