"""Adapters for agent tests, trained for real by the trainer CLI on data made here, and the pieces
of an agent pod (the manifest an operator or a user would write)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgetune_api.assignment import AdapterAssignment, dumps
from tests.support import AGENT_IMAGE
from tests.trainer_support import REPO, config, sine_classes, write_config

CHANNELS, CLASSES = 3, 3


@dataclass
class Trained:
    folder: Path
    sha256: str
    metrics: dict[str, float]


def keypair(folder: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private = folder / f"{name}.pem"
    public = folder / f"{name}.pub.pem"
    folder.mkdir(parents=True, exist_ok=True)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return private, public


def make_base(folder: Path, seed: int) -> str:
    """A built-in sensor CNN saved as a pinned base-model folder; returns its SHA-256."""
    import torch  # noqa: PLC0415

    from edgetune_trainer import models  # noqa: PLC0415

    torch.manual_seed(seed)
    return models.save_builtin(models.TimeSeriesCNN(CHANNELS, CLASSES), folder, [str(i) for i in range(CLASSES)])


def train(tmp: Path, base: Path, base_sha: str, *, data_seed: int, gain: float, key: Path | None,
          encoding: str = "int8-zstd", steps: int = 30) -> Trained:  # fmt: skip
    """Run the trainer CLI; the package stays in ``<tmp>/work/package``."""
    data = sine_classes(tmp / "data", n=240, channels=CHANNELS, length=48, seed=data_seed, gain=gain)
    training = {"maxSteps": steps, "evalEvery": steps, "checkpointEvery": steps, "learningRate": 0.02}
    cfg = config(tmp, data, baseModel={"uri": str(base), "sha256": base_sha}, output={"encoding": encoding},
                 training=training)  # fmt: skip
    if key is not None:
        cfg["runtime"]["signingKeyPath"] = str(key)
    done = subprocess.run([sys.executable, "-m", "edgetune_trainer", "--config", str(write_config(tmp, cfg))],
                          capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
    summary = json.loads((tmp / "termination-log").read_text())
    assert done.returncode == 0, (summary, done.stdout[-2000:])
    return Trained(tmp / "work" / "package", summary["sha256"], summary["metrics"])


def upload(client: Any, folder: Path, bucket: str, prefix: str) -> str:
    for path in sorted(folder.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


def variant(source: Path, dest: Path, mutate: Any) -> Path:
    """A copy of a package folder changed by ``mutate(folder)`` (tampering, re-signing, …)."""
    shutil.copytree(source, dest)
    mutate(dest)
    return dest


def assignment(version: str, uri: str, sha256: str, **extra: Any) -> str:
    return dumps(AdapterAssignment(version=version, uri=uri, sha256=sha256, release="demo/rollout", **extra))


EXAMPLE = REPO / "examples" / "agent" / "deployment.yaml"
BASE_HOST_PATH = "/var/lib/edgetune/models/base"  # where the tests put the base model on each node


def agent_pod(name: str, *, node: str, base_sha: str, keys_configmap: str, s3_env: dict[str, str],
              annotations: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """A pod from the example Deployment's template (examples/agent/deployment.yaml), so the example
    is what the tests run: pinned to ``node``, run by the test executor, S3 credentials inline."""
    template = yaml.safe_load(EXAMPLE.read_text())["spec"]["template"]
    spec = template["spec"]
    container = spec["containers"][0]
    container["image"] = AGENT_IMAGE
    container["args"] += ["--threads=1"]
    # The base model from a folder on the node (the example's comment says how), values inline.
    container["env"] = [e for e in container["env"] if not e["name"].startswith(("AWS_", "BASE_"))]
    container["env"] += [{"name": k, "value": v} for k, v in s3_env.items()]
    container["env"] += [{"name": "BASE_URI", "value": "/models/base"}, {"name": "BASE_SHA256", "value": base_sha}]
    container["volumeMounts"].append({"name": "base", "mountPath": "/models/base", "readOnly": True})
    spec["volumes"].append({"name": "base", "hostPath": {"path": BASE_HOST_PATH, "type": "Directory"}})
    container.pop("resources", None)  # the executor would enforce limits on a test machine's RSS
    spec["nodeName"] = node
    spec["tolerations"] = [{"operator": "Exists"}]
    next(v for v in spec["volumes"] if v["name"] == "keys")["configMap"]["name"] = keys_configmap
    labels = {**template["metadata"]["labels"], "edgetune.io/executor": "local"}
    metadata = {
        "name": name,
        "labels": labels,
        "annotations": {**template["metadata"]["annotations"], **(annotations or {})},
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def make_package(folder: Path, base_dir: Path, base_sha: str | None, *, seed: int, key: Path | None = None,
                 encoding: str = "fp16", scale: float = 0.05, base_uri: str | None = None,
                 channels: int = CHANNELS, num_labels: int | None = None) -> str:  # fmt: skip
    """A delta package built in-process (no training): LoRA weights drawn at random, B non-zero so
    the adapter changes the model's answers. Returns the package digest."""
    import torch  # noqa: PLC0415

    from edgetune_api.delta import Lineage  # noqa: PLC0415
    from edgetune_api.training_job import PeftSpec  # noqa: PLC0415
    from edgetune_trainer import models, package  # noqa: PLC0415

    base = models.load_base(base_dir, base_sha, num_labels=num_labels) if base_sha else models.builtin_random(
        "timeseries-cnn", channels, CLASSES, 0)  # fmt: skip
    peft_model = models.attach_lora(base, PeftSpec(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) * scale for k, v in models.adapter_state(peft_model).items()}
    config = peft_model.peft_config["default"].to_dict()
    config = json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    lineage = Lineage(base_model_uri=base_uri or str(base_dir), base_model_sha256=base_sha, data_sha256="0" * 64,
                      samples=1, data_format="npy", trainer_version="test")  # fmt: skip
    digest, _ = package.build(
        folder, state, encoding=encoding, peft_config=config, lineage=lineage, steps=1, duration_s=0.0, metrics={},
        energy_joules=None, energy_method=None, peak_memory_bytes=None,
        signing_key_pem=key.read_bytes() if key else None,
    )  # fmt: skip
    return digest


class FakeS3:
    """boto3's shape for the calls the store makes; serves a folder, or fails as told."""

    def __init__(self, folder: Path, fail: OSError | None = None) -> None:
        self.folder, self.fail, self.downloads = folder, fail, 0
        self.objects: dict[tuple[str, str], bytes] = {}  # other objects (published revocations)

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        from botocore.exceptions import ClientError  # noqa: PLC0415

        if (Bucket, Key) not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": Key}}, "GetObject")
        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}

    def get_paginator(self, _: str) -> Any:
        folder = self.folder

        class Pages:
            def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:  # noqa: N803 - boto3's names
                return [{"Contents": [{"Key": Prefix + p.name, "Size": p.stat().st_size} for p in folder.iterdir()]}]

        return Pages()

    def download_file(self, bucket: str, key: str, dest: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.downloads += 1
        shutil.copy(self.folder / key.rsplit("/", 1)[1], dest)
