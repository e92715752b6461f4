"""Energy, battery and memory metering on the edge node.

Energy sources, best first: NVML (NVIDIA GPUs, total energy counter), Jetson power rails
(INA3221 sysfs), RAPL (``/sys/class/powercap``, package + DRAM counters with wrap-around), and
last an *estimate* from the process's CPU time times an assumed power per busy core. Every
reading carries its method, so an estimate is always labelled as one.

Why not Zeus: it measures GPUs and RAPL well, but has no Jetson rails, no battery, and no labelled
fallback for boards without counters — the edge cases that matter here; it also adds its own
dependency tree to the trainer image. The readers below are ~100 lines against documented
kernel and NVML interfaces, testable against a fixture sysfs tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class EnergyMeter(Protocol):
    method: str

    def joules(self) -> float:
        """Energy used since the meter was created."""
        ...


class RaplMeter:
    """Sum of RAPL package/DRAM domains (``energy_uj``), handling counter wrap-around."""

    method = "rapl"

    def __init__(self, root: Path) -> None:
        self.domains = sorted(p for p in root.glob("intel-rapl:*") if (p / "energy_uj").exists() and ":" in p.name)
        # Top-level domains only (intel-rapl:0, not intel-rapl:0:0 which is counted inside it),
        # except DRAM which some platforms expose as a top-level sibling.
        self.domains = [p for p in self.domains if p.name.count(":") == 1]
        if not self.domains:
            raise OSError(f"no readable RAPL domains under {root}")
        self._max = [self._read(p / "max_energy_range_uj") for p in self.domains]
        self._last = [self._read(p / "energy_uj") for p in self.domains]
        self._total_uj = 0.0

    @staticmethod
    def _read(path: Path) -> int:
        return int(path.read_text().strip())

    def joules(self) -> float:
        for i, domain in enumerate(self.domains):
            now = self._read(domain / "energy_uj")
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped
                delta += self._max[i]
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj / 1e6


class JetsonMeter:
    """NVIDIA Jetson INA3221 rails: integrates ``in_power*_input`` (milliwatts) over time."""

    method = "jetson"

    def __init__(self, root: Path = Path("/sys/bus/i2c/drivers/ina3221x")) -> None:
        self.rails = sorted(root.glob("*/iio:device*/in_power*_input"))
        if not self.rails:
            raise OSError(f"no Jetson power rails under {root}")
        self._last_t = time.monotonic()
        self._total = 0.0

    def joules(self) -> float:
        now = time.monotonic()
        watts = sum(int(p.read_text().strip()) for p in self.rails) / 1000.0
        self._total += watts * (now - self._last_t)
        self._last_t = now
        return self._total


class NvmlMeter:
    """NVML's total energy counter (millijoules since driver load) of every visible GPU."""

    method = "nvml"

    def __init__(self) -> None:
        import pynvml  # noqa: PLC0415 - only on NVIDIA nodes

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if not self._handles:
            raise OSError("NVML sees no GPU")
        self._start = self._read()

    def _read(self) -> float:
        return float(sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles)) / 1000.0

    def joules(self) -> float:
        return self._read() - self._start


class EstimateMeter:
    """CPU seconds of this process times an assumed power per busy core. Labelled ``estimate``."""

    method = "estimate"

    def __init__(self, watts_per_core: float) -> None:
        self.watts = watts_per_core
        self._start = self._cpu_s()

    @staticmethod
    def _cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime

    def joules(self) -> float:
        return (self._cpu_s() - self._start) * self.watts


def best_meter(powercap_root: Path, watts_estimate: float, use_gpu: bool) -> EnergyMeter:
    """The most accurate meter this node offers."""
    candidates: list[Callable[[], EnergyMeter]] = [NvmlMeter] if use_gpu else []
    candidates += [JetsonMeter, lambda: RaplMeter(powercap_root)]
    for make in candidates:
        try:
            return make()
        except (OSError, ImportError, ValueError, PermissionError):
            continue
        except Exception as exc:  # e.g. pynvml.NVMLError: fall through to the next meter
            if type(exc).__name__.startswith("NVML"):
                continue
            raise
    return EstimateMeter(watts_estimate)


def battery_percent(power_supply_root: Path) -> float | None:
    """Charge of the first battery under ``/sys/class/power_supply`` (None without a battery)."""
    for supply in sorted(power_supply_root.glob("*")):
        try:
            if (supply / "type").read_text().strip() != "Battery":
                continue
            return float((supply / "capacity").read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def on_ac_power(power_supply_root: Path) -> bool:
    for supply in sorted(power_supply_root.glob("*")):
        try:
            if (supply / "type").read_text().strip() == "Mains" and (supply / "online").read_text().strip() == "1":
                return True
        except OSError:
            continue
    return False


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmHWM, VmRSS), or None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM; getrusage where there is no procfs)."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def trim_heap() -> None:
    """Hand freed heap memory back to the kernel (glibc's ``malloc_trim``), so that the resident size
    measured next is what is in use, not what an earlier, larger allocation left cached. Best effort
    (other C libraries: nothing)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs). False where not allowed."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    except OSError:
        return False
    return True
