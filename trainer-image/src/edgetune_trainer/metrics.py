"""The trainer's Prometheus metrics, defined once. Names follow `edgetune_<thing>_<unit>`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

LABELS = ("job", "namespace", "cluster", "node")


class TrainerMetrics:
    """One registry per run, so tests and multiple runs in a process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, (*LABELS, *extra), registry=self.registry)

        self.step = gauge("edgetune_trainer_step", "Optimizer steps completed.")
        self.loss = gauge("edgetune_trainer_loss", "Training loss (mean over the last optimizer step).")
        self.eval_loss = gauge("edgetune_trainer_eval_loss", "Loss on the held-out split at the last evaluation.")
        self.eval_accuracy = gauge(
            "edgetune_trainer_eval_accuracy_ratio", "Accuracy on the held-out split (classification)."
        )
        self.samples_per_second = gauge("edgetune_trainer_samples_per_second", "Training throughput.")
        self.device_info = gauge(
            "edgetune_trainer_device_info",
            "1, labelled with the device the trainer trains on (gpu, cpu) and the one placement.accelerator asked for.",
            ("device", "requested"),
        )
        self.peak_memory = gauge("edgetune_trainer_peak_memory_bytes", "Peak memory of the trainer.", ("device",))
        self.energy = gauge("edgetune_trainer_energy_joules", "Energy used by training so far.", ("method",))
        self.memory_budget = gauge("edgetune_trainer_memory_budget_bytes", "The job's budgets.memory.")
        self.energy_budget = gauge("edgetune_trainer_energy_budget_joules", "The job's budgets.energyJoules (if set).")
        self.battery = gauge("edgetune_trainer_battery_percent", "Battery charge seen by the trainer.")
        self.paused = gauge("edgetune_trainer_paused", "1 while training is paused (low battery).")
        self.samples = gauge("edgetune_trainer_data_samples", "Samples available on the node.")
        self.encoding_fallbacks = gauge(
            "edgetune_trainer_encoding_fallbacks",
            "Encodings refused by the quality gate before the shipped one (0: the requested one shipped).",
        )
