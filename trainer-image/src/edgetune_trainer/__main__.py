"""``python -m edgetune_trainer --config job.json``: train, package, sign, upload, report. The file is
what the operator writes, or, run by hand, the same in YAML or an EdgeTrainingJob manifest: see
docs/trainer.md, "On a laptop".
(``python -m edgetune_trainer evaluate …`` scores a base or a package on a data set: ``evaluate.py``;
``python -m edgetune_trainer pretrain …`` builds a base model folder from labelled series: ``pretrain.py``.)

Exit codes (also in the termination message's ``reason``):
0 Succeeded · 2 InvalidInput (data, model, config) · 3 InsufficientData · 4 BudgetTooSmall ·
5 StorageError (disk, S3) · 6 AcceleratorUnavailable (a gpu/npu placement the trainer cannot use, no
placement.allowCpuFallback) · 1 anything unexpected · 143 Interrupted (SIGTERM; checkpoint written,
a retried pod resumes).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from edgetune_api.delta import SIGNATURE, TRAINER_SIGNATURE, Lineage
from edgetune_api.trainer_config import BaseFiles, Baseline, TrainerConfig, TrainerRuntime, UploadPolicy

EXIT = {"Succeeded": 0, "InvalidInput": 2, "InsufficientData": 3, "BudgetTooSmall": 4, "StorageError": 5,
        "AcceleratorUnavailable": 6, "Failed": 1, "Interrupted": 143}  # fmt: skip


def trainer_version() -> str:
    try:
        return metadata.version("edgetune")
    except metadata.PackageNotFoundError:
        return "0+unknown"


SMALL_HELD_OUT = 30
"""Fewer held-out samples than this and the run warns that its evaluation is mostly noise."""


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the fields in plain words."""


def plain(exc: ValidationError) -> str:
    """``spec.training.learningRate: must be greater than 0; …`` instead of pydantic's dump."""
    parts = []
    for error in exc.errors()[:8]:
        where = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-")) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        message = message.replace("Input should be", "must be").replace("Field required", "is required")
        message = message.replace("Extra inputs are not permitted", "is not a known field")
        parts.append(f"{where}: {message}")
    more = f" (and {exc.error_count() - 8} more)" if exc.error_count() > 8 else ""
    return "; ".join(parts) + more


def load_config(path: str | None) -> TrainerConfig:
    """The configuration from ``path`` (or ``$EDGETUNE_TRAINER_CONFIG``): a trainer configuration in
    JSON (what the operator writes) or YAML, or an EdgeTrainingJob manifest, whose spec is used as it
    is (the job's name and namespace go into the lineage)."""
    raw = Path(path).read_text() if path else os.environ.get("EDGETUNE_TRAINER_CONFIG", "")
    if not raw:
        raise ConfigError("no configuration: pass --config FILE or set EDGETUNE_TRAINER_CONFIG to the JSON")
    try:
        document = json.loads(raw)
    except ValueError:
        try:
            document = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"the configuration is neither JSON nor YAML: {exc}") from None
    if isinstance(document, dict) and document.get("kind") == "EdgeTrainingJob":
        meta = document.get("metadata") or {}
        document = {"spec": document.get("spec"), "runtime": {"jobName": meta.get("name"),
                                                              "jobNamespace": meta.get("namespace")}}  # fmt: skip
    try:
        config = TrainerConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"invalid trainer configuration: {plain(exc)}") from None
    base = config.spec.base_model
    if not base.uri.startswith("builtin:") and not base.sha256:
        raise ConfigError(f"spec.baseModel.sha256 is required for {base.uri}: the trainer only trains on a base "
                          "model whose weights it can verify (builtin:… bases need none)")  # fmt: skip
    return config


LOCAL_WORK_DIR = "edgetune-work"
"""Checkpoints and the package of a run by hand that names no work folder (in the current folder)."""


def locate(config: TrainerConfig) -> TrainerConfig:
    """Fill in where the data and the work folder are when the configuration leaves them out (a run by
    hand; the operator always names both): the data at ``spec.data.source.hostPath``, the work in
    ``./edgetune-work``."""
    rt, source = config.runtime, config.spec.data.source
    data_dir = rt.data_dir or (source.host_path if source else None)
    if not data_dir:
        where = "data.source names a PersistentVolumeClaim, which" if source else "the configuration names no data, and"
        raise ConfigError(f"where is the data? {where} only Kubernetes can mount: pass --data-dir FOLDER "
                          "(or set runtime.dataDir or data.source.hostPath)")  # fmt: skip
    runtime = rt.model_copy(update={"data_dir": data_dir, "work_dir": rt.work_dir or str(Path.cwd() / LOCAL_WORK_DIR)})
    return config.model_copy(update={"runtime": runtime})


def _s3_client(endpoint: str | None) -> Any:
    import boto3  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    return boto3.client(
        "s3",
        endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or None,
        config=Config(retries={"max_attempts": 5, "mode": "adaptive"}, connect_timeout=5, read_timeout=30,
                      s3={"addressing_style": "path"}),
    )  # fmt: skip


def _base_folder(rt: TrainerRuntime, uri: str, work: Path, s3: Any) -> Path:
    """The base model's folder: fetched through presigned URLs (what the operator issues), read where
    the operator mounted a base already on the node, or fetched by URI (a run by hand)."""
    from edgetune_trainer import models  # noqa: PLC0415 - imports torch: only once the config is valid

    if rt.base_files_path:
        return models.fetch_presigned(BaseFiles.model_validate_json(Path(rt.base_files_path).read_text()), work)
    if rt.base_dir:
        return Path(rt.base_dir)
    return models.fetch(uri, work, s3, os.environ.get("MLFLOW_TRACKING_URI"))


def run(config: TrainerConfig) -> dict[str, Any]:  # noqa: PLR0915 - the whole run, top to bottom, on purpose
    """One trainer run; returns the termination summary (raises on failure)."""
    import torch  # noqa: PLC0415 - heavy: imported only once the config is known to be valid

    from edgetune_trainer import accelerator, encoding_gate, models, package  # noqa: PLC0415
    from edgetune_trainer.data import NodeDataset  # noqa: PLC0415
    from edgetune_trainer.energy import peak_rss_bytes  # noqa: PLC0415
    from edgetune_trainer.loop import evaluate, train  # noqa: PLC0415
    from edgetune_trainer.report import Reporter  # noqa: PLC0415

    spec, rt = config.spec, config.runtime
    if rt.node is None and os.environ.get("EDGETUNE_NODE"):  # the pod's spec.nodeName (downward API)
        rt = rt.model_copy(update={"node": os.environ["EDGETUNE_NODE"]})
    if rt.threads:
        torch.set_num_threads(rt.threads)
    placement = spec.placement
    hardware = accelerator.choose(placement.accelerator, allow_cpu_fallback=placement.allow_cpu_fallback,
                                      runtime_device=rt.device, cuda=torch.cuda.is_available())  # fmt: skip
    device = torch.device(hardware.torch_device)
    reporter = Reporter(
        job=rt.job_name or "adhoc", namespace=rt.job_namespace or "", cluster=rt.cluster,
        node=rt.node or os.uname().nodename,  # outside Kubernetes
        metrics_port=rt.metrics_port, pushgateway_url=rt.pushgateway_url, progress_seconds=rt.progress_seconds,
    )  # fmt: skip

    class _Report:
        """Callable for events, with `.gauge` for metrics: what the loop needs and nothing more."""

        def __call__(self, name: str, **fields: Any) -> None:
            reporter.event(name, **fields)

        def gauge(self, name: str, value: float, **extra: str) -> None:
            reporter.gauge(name, value, **extra)

    report = _Report()
    try:
        warnings: list[str] = []
        report("device", device=hardware.device, requested=placement.accelerator, torch_device=str(device),
               model=torch.cuda.get_device_name(device) if device.type == "cuda" else "")  # fmt: skip
        reporter.gauge("device_info", 1, device=hardware.device, requested=placement.accelerator)
        if hardware.warning:
            warnings.append(hardware.warning)
            report("accelerator_fallback", message=hardware.warning)
        salt = Path(rt.salt_path).read_bytes().strip() if rt.salt_path else None
        dataset = NodeDataset(Path(str(rt.data_dir)), spec.data, salt,
                              eval_root=Path(rt.eval_data_dir) if rt.eval_data_dir else None)  # fmt: skip
        info = dataset.scan()
        reporter.gauge("samples", info.samples)
        lengths = (
            {
                "length": info.length,
                "shortest": info.shortest,
                "longest": info.longest,
                "refitted": info.refitted,
                "length_policy": spec.data.length_policy,
            }
            if info.length
            else {}
        )
        held = {"eval_source_sha256": info.eval_sha256} if info.eval_sha256 else {}
        report("data", samples=info.samples, train=info.train_samples, eval=info.eval_samples, labels=len(info.labels),
               kind=info.kind, sha256=info.sha256, **lengths, **held)  # fmt: skip
        if info.eval_samples < SMALL_HELD_OUT:
            warnings.append(
                f"the held-out data has {info.eval_samples} samples: early stopping, targetLoss, the reported eval "
                f"metrics and the encoding gate decide on that few, where one sample moves accuracy by "
                f"{1 / max(info.eval_samples, 1):.0%}; name a separate evaluation set (data.evalSource) or score the "
                "result on more data with `python -m edgetune_trainer evaluate`"
            )
            report("held_out_split_small", eval=info.eval_samples, recommended=SMALL_HELD_OUT, message=warnings[-1])
        work = Path(str(rt.work_dir))
        work.mkdir(parents=True, exist_ok=True)
        remote_model = spec.base_model.remote and not rt.base_files_path
        needs_s3 = (rt.s3_bucket and not rt.upload_policy_path) or remote_model  # a trainer run by hand
        s3 = _s3_client(rt.s3_endpoint) if needs_s3 else None
        uri = spec.base_model.uri
        if uri.startswith("builtin:"):
            base = models.builtin_random(
                uri.removeprefix("builtin:"), info.channels or 1, max(2, len(info.labels)), spec.training.seed
            )
        else:
            folder = _base_folder(rt, uri, work, s3)
            base = models.load_base(
                folder,
                spec.base_model.sha256,
                num_labels=len(info.labels) if info.kind == "series" and info.labels else None,
            )
        report("base_model", uri=uri, sha256=base.sha256, kind=base.kind)

        outcome = train(config, base, dataset, report, device=device)

        def whole_run_peak() -> int:
            """Training's peak, or the process's since then (quality gate, packaging) when higher."""
            return max(outcome.peak_memory_bytes, peak_rss_bytes() if device.type == "cpu" else 0)

        metrics = {k: round(v, 6) for k, v in outcome.eval.items()}
        if rt.baseline:  # measured, never shipped: the same figures a packaged run reports, no package
            metrics["train_loss"] = outcome.history[-1]["loss"] if outcome.history else float("nan")
            trainable = sum(p.numel() for p in outcome.model.parameters() if p.requires_grad)
            report("baseline", baseline=rt.baseline, trainable_parameters=trainable, metrics=metrics)
            reporter.push()
            return {
                "status": "Succeeded", "reason": "Succeeded", "baseline": rt.baseline, "stopReason": outcome.reason,
                "steps": outcome.steps, "trainableParameters": trainable, "samples": info.samples, "metrics": metrics,
                "energyJoules": round(outcome.energy_j, 3), "energyMethod": outcome.energy_method,
                "peakMemoryBytes": whole_run_peak(), "batchSize": outcome.batch_size, "device": hardware.device,
                "durationSeconds": round(outcome.duration_s, 2), "warnings": warnings,
            }  # fmt: skip
        state = models.adapter_state(outcome.model)

        def score(decoded: dict[str, Any]) -> dict[str, float]:
            """Held-out metrics of the adapter as it will run at the edge (encoded, then decoded)."""
            models.load_adapter_state(outcome.model, decoded)
            return evaluate(outcome.model, outcome.extra["task"], dataset, outcome.batch_size, spec.data.augmentation)

        choice = encoding_gate.choose(spec.output.encoding, state, outcome.eval, spec.output.max_metric_drop, score)
        encoding = choice.encoding
        refused = [a for a in choice.attempts if not a.ok]
        for a in refused:
            report("encoding_refused", encoding=a.encoding, degradation=a.degradation,
                   weight_error=round(a.weight_error, 5), max_metric_drop=spec.output.max_metric_drop)  # fmt: skip
        reporter.gauge("encoding_fallbacks", len(refused))
        if encoding != "fp32":
            metrics.update({f"{k}_encoded": round(v, 6) for k, v in choice.metrics.items()})
        metrics["train_loss"] = outcome.history[-1]["loss"] if outcome.history else float("nan")
        peft_config = package.slim_peft_config(outcome.model.peft_config["default"])
        lineage = Lineage(
            base_model_uri=uri, base_model_sha256=base.sha256, data_sha256=info.sha256, samples=info.samples,
            data_format=spec.data.format, job_namespace=rt.job_namespace, job_name=rt.job_name, job_uid=rt.job_uid,
            cluster=rt.cluster, node=rt.node, trainer_version=trainer_version(),
            base_model_revision=spec.base_model.revision, device=hardware.device,
        )  # fmt: skip
        key_path = rt.trainer_key_path or rt.signing_key_path
        key = Path(key_path).read_bytes() if key_path else None
        digest, manifest = package.build(
            work / "package", state, encoding=encoding, peft_config=peft_config, lineage=lineage, steps=outcome.steps,
            duration_s=outcome.duration_s, metrics=metrics, energy_joules=round(outcome.energy_j, 3),
            energy_method=outcome.energy_method, peak_memory_bytes=whole_run_peak(), signing_key_pem=key,
            signature=TRAINER_SIGNATURE if rt.trainer_key_path else SIGNATURE,
        )  # fmt: skip
        delta_uri = str(work / "package")
        if rt.s3_bucket and rt.upload_policy_path:  # no bucket: the package stays in the work folder
            policy = UploadPolicy.model_validate_json(Path(rt.upload_policy_path).read_text())
            delta_uri = package.upload_presigned(work / "package", policy)
        elif rt.s3_bucket:
            delta_uri = package.upload(work / "package", s3, rt.s3_bucket, rt.s3_prefix)
        report("packaged", uri=delta_uri, sha256=digest, adapter_bytes=manifest.adapter_bytes, encoding=encoding)
        reporter.push()
        return {
            "status": "Succeeded", "reason": "Succeeded", "stopReason": outcome.reason, "steps": outcome.steps,
            "deltaUri": delta_uri, "sha256": digest, "adapterBytes": manifest.adapter_bytes, "encoding": encoding,
            "encodingRequested": choice.requested,
            "encodingAttempts": [{"encoding": a.encoding, "weightError": round(a.weight_error, 5), "ok": a.ok,
                                  "degradation": None if a.degradation is None else round(a.degradation, 5)}
                                 for a in choice.attempts],
            "samples": info.samples, "metrics": metrics, "energyJoules": round(outcome.energy_j, 3),
            "energyMethod": outcome.energy_method, "peakMemoryBytes": whole_run_peak(),
            "batchSize": outcome.batch_size, "resumedFrom": outcome.resumed_from, "device": hardware.device,
            "baseModelRevision": spec.base_model.revision,
            "durationSeconds": round(outcome.duration_s, 2), "warnings": warnings,
        }  # fmt: skip
    finally:
        reporter.push()
        reporter.close()


class Terminated(BaseException):
    """SIGTERM outside the training loop (which handles it itself, checkpointing first): before it
    started or while packaging. The pod is being stopped; a retried pod resumes."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated("SIGTERM")


def classify(exc: BaseException) -> str:  # noqa: PLR0911 - one reason per kind of failure
    """Map an exception to the termination reason (and so the exit code)."""
    from edgetune_trainer.accelerator import AcceleratorUnavailableError  # noqa: PLC0415
    from edgetune_trainer.data import DataError  # noqa: PLC0415
    from edgetune_trainer.loop import BudgetTooSmallError, InsufficientDataError, Interrupted  # noqa: PLC0415
    from edgetune_trainer.models import ModelError  # noqa: PLC0415
    from edgetune_trainer.package import UploadError  # noqa: PLC0415

    if isinstance(exc, Interrupted | Terminated):
        return "Interrupted"
    if isinstance(exc, InsufficientDataError):
        return "InsufficientData"
    if isinstance(exc, AcceleratorUnavailableError):
        return "AcceleratorUnavailable"
    if isinstance(exc, BudgetTooSmallError):
        return "BudgetTooSmall"
    if isinstance(exc, UploadError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    ):
        return "StorageError"
    if isinstance(exc, DataError | ModelError | ValidationError | ValueError | FileNotFoundError):
        return "InvalidInput"
    return "Failed"


def prepare_work_dir(argv: list[str]) -> int:
    """``prepare-work-dir DIR --owner UID:GID``: the trainer pod's init container. The checkpoint
    folder is a hostPath the kubelet creates owned by root (mode 0755); the trainer runs as a
    non-root user, so this hands the folder to it (as root with CAP_CHOWN only, nothing else)."""
    parser = argparse.ArgumentParser(prog="python -m edgetune_trainer prepare-work-dir",
                                     description=prepare_work_dir.__doc__)  # fmt: skip
    parser.add_argument("directory", type=Path)
    parser.add_argument("--owner", required=True, help="UID:GID the trainer runs as")
    args = parser.parse_args(argv)
    uid, _, gid = args.owner.partition(":")
    target = args.directory.stat()
    if (target.st_uid, target.st_gid) != (int(uid), int(gid or uid)):
        os.chown(args.directory, int(uid), int(gid or uid))
        print(f"{args.directory}: owner {target.st_uid}:{target.st_gid} -> {uid}:{gid or uid}")  # noqa: T201
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        from edgetune_trainer import evaluate  # noqa: PLC0415

        return evaluate.main(argv[1:])
    if argv[:1] == ["pretrain"]:
        from edgetune_trainer import pretrain  # noqa: PLC0415

        return pretrain.main(argv[1:])
    if argv[:1] == ["prepare-work-dir"]:
        return prepare_work_dir(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m edgetune_trainer", description=__doc__,
        epilog="subcommands: `evaluate --help` (score a base or a package on a data set), "
        "`pretrain --help` (build a base model folder from labelled series), "
        "`prepare-work-dir --help` (the pod's init container: hand the checkpoint folder to the trainer's user)",
    )  # fmt: skip
    parser.add_argument(
        "--config",
        help="trainer configuration (JSON or YAML) or an EdgeTrainingJob manifest; default: $EDGETUNE_TRAINER_CONFIG",
    )
    parser.add_argument("--data-dir", help="override runtime.dataDir (where the data is mounted)")
    parser.add_argument("--work-dir", help="override runtime.workDir (checkpoints, package)")
    parser.add_argument("--termination-log", help="override runtime.terminationLog")
    parser.add_argument("--eval-data-dir", help="override runtime.evalDataDir (a separate held-out set)")
    parser.add_argument("--signing-key", help="override runtime.signingKeyPath (Ed25519 private key, PEM)")
    parser.add_argument("--salt-file", help="override runtime.saltPath (salt for privacy.hashFields)")
    parser.add_argument("--trainer-key", help="override runtime.trainerKeyPath (its derived key: trainer.sig)")
    parser.add_argument("--upload-policy", help="override runtime.uploadPolicyPath (presigned S3 POST policy, JSON)")
    parser.add_argument("--base-files", help="override runtime.baseFilesPath (presigned base model URLs, JSON)")
    parser.add_argument("--base-dir", help="override runtime.baseDir (a base model on the node, mounted read-only)")
    parser.add_argument("--baseline", choices=get_args(Baseline),
                        help="train the output head alone or every weight instead of an adapter, report the "
                             "metrics, package nothing (what LoRA recovers: docs/trainer.md)")  # fmt: skip
    args = parser.parse_args(argv)
    # Until the configuration says where, the summary goes where the command line or environment
    # says, or to the container's termination log when there is one, else to stdout: a trainer run
    # by hand never creates /dev/termination-log.
    named = args.termination_log or os.environ.get("EDGETUNE_TERMINATION_LOG")
    container_log = Path("/dev/termination-log")
    termination: Path | None = Path(named) if named else (container_log if container_log.exists() else None)
    signal.signal(signal.SIGTERM, _terminate)  # every moment of the run ends with a termination message
    started = time.time()
    try:
        config = load_config(args.config)
        overrides = {"data_dir": args.data_dir, "work_dir": args.work_dir, "termination_log": args.termination_log,
                     "eval_data_dir": args.eval_data_dir, "signing_key_path": args.signing_key,
                     "salt_path": args.salt_file, "trainer_key_path": args.trainer_key,
                     "upload_policy_path": args.upload_policy, "base_files_path": args.base_files,
                     "base_dir": args.base_dir, "baseline": args.baseline}  # fmt: skip
        runtime = config.runtime.model_copy(update={k: v for k, v in overrides.items() if v})
        if runtime.termination_log:
            termination = Path(runtime.termination_log)
        config = locate(config.model_copy(update={"runtime": runtime}))
        summary = run(config)
    except BaseException as exc:  # every failure must reach the termination message
        if isinstance(exc, KeyboardInterrupt):
            exc = InterruptedError("interrupted")
        reason = classify(exc)
        summary = {
            "status": "Failed" if reason != "Interrupted" else "Interrupted",
            "reason": reason,
            "message": str(exc),
        }
        sys.stderr.write(json.dumps({"event": "failed", "reason": reason, "message": str(exc)}) + "\n")
        if reason == "Failed":
            traceback.print_exc()
    summary["wallSeconds"] = round(time.time() - started, 2)
    from edgetune_trainer.report import TERMINATION_LIMIT, write_termination  # noqa: PLC0415

    if termination is None:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        write_termination(termination, summary, TERMINATION_LIMIT)
    return EXIT.get(summary["reason"], 1)


if __name__ == "__main__":
    sys.exit(main())
