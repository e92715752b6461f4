"""The trainer against the real S3 server and Prometheus: upload with verification, metrics that
reach Prometheus, and no raw sample value in anything that leaves the node."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard

from edgetune_api.delta import DeltaVerificationError, Lineage, read_folder, verify_package
from edgetune_operator.clients.object_store import PackageNotFoundError, fetch_and_verify
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server
from edgetune_trainer import package
from edgetune_trainer.__main__ import main
from edgetune_trainer.models import TimeSeriesCNN, save_builtin
from tests.support import eventually
from tests.trainer_support import config, sine_classes, termination, write_config

pytestmark = pytest.mark.e2e

NAMES = ["Alice Smith", "Bob Jones", "Chen Wei", "Dana Kowalski"]


def _private_csv(folder: Path) -> list[str]:
    """Readings tagged with operator names and badge ids; returns every raw value that must stay."""
    folder.mkdir(parents=True)
    rows = ["operator,badge,temp_c,vibration_g,label"]
    secrets = list(NAMES)
    for i in range(200):
        name, badge = NAMES[i % 4], f"B-{77100 + i}"
        temp, vib = 60 + (i % 7) * 3.14159 + i / 1000, (i % 5) * 0.731 + (1.5 if i % 2 else 0)
        rows.append(f"{name},{badge},{temp:.5f},{vib:.5f},{'fault' if i % 2 else 'ok'}")
        secrets += [badge, f"{temp:.5f}", f"{vib:.5f}"]
    (folder / "readings.csv").write_text("\n".join(rows) + "\n")
    return secrets


def test_trainer_uploads_verified_package_and_leaks_no_raw_values(
    tmp_path: Path,
    s3: S3Server,
    prometheus: Prometheus,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secrets = _private_csv(tmp_path / "data")
    (tmp_path / "salt").write_text("site-salt-7f3a\n")
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3.create_bucket("edge-adapters")
    cfg = config(
        tmp_path, tmp_path / "data",
        data={"format": "csv", "labelField": "label", "privacy": {
            "dropFields": ["operator"], "hashFields": ["badge"], "saltSecretRef": {"name": "s", "key": "k"}}},
        training={"maxSteps": 8, "evalEvery": 4},
        output={"encoding": "int8-zstd"},
        runtime={"s3Endpoint": s3.endpoint, "s3Bucket": bucket, "s3Prefix": "edgetune/ns/job/local/node-1",
                 "saltPath": str(tmp_path / "salt"), "pushgatewayUrl": prometheus.pushgateway_url,
                 "jobName": "privacy", "jobNamespace": "ns", "node": "node-1"},
    )  # fmt: skip
    assert main(["--config", str(write_config(tmp_path, cfg))]) == 0
    summary = termination(tmp_path)
    assert summary["deltaUri"] == f"s3://{bucket}/edgetune/ns/job/local/node-1"

    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    files = {k.rsplit("/", 1)[1]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    manifest = verify_package(files, expected_digest=str(summary["sha256"]))
    assert manifest.lineage.node == "node-1" and manifest.lineage.samples == 200

    pushed = urllib.request.urlopen(f"{prometheus.pushgateway_url}/metrics", timeout=10).read().decode()  # noqa: S310
    logs = capsys.readouterr()
    leaving = dict(files)
    if "adapter.safetensors.zst" in files:
        leaving["adapter.decompressed"] = zstandard.ZstdDecompressor().decompress(files["adapter.safetensors.zst"])
    leaving["stdout"] = logs.out.encode()
    leaving["stderr"] = logs.err.encode()
    leaving["pushgateway"] = pushed.encode()
    leaving["termination"] = (tmp_path / "termination-log").read_bytes()
    for where, blob in leaving.items():
        for secret in secrets:
            assert secret.encode() not in blob, f"raw value {secret!r} found in {where}"

    # The trainer's metrics reached Prometheus (through the Pushgateway), labelled by node.
    result = eventually(
        lambda: prometheus.query('edgetune_trainer_step{node="node-1",namespace="ns"}'), what="trainer step metric"
    )
    assert float(result[0]["value"][1]) == 8
    energy = prometheus.query('edgetune_trainer_energy_joules{node="node-1"}')
    assert energy and energy[0]["metric"]["method"] == "estimate"


def test_base_model_from_mlflow_registry_backed_by_s3(
    tmp_path: Path, s3: S3Server, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base is a registered MLflow model version whose source is an S3 folder: the trainer
    resolves `models:/…` (by version and by alias) over MLflow's REST API, downloads, verifies."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    digest = save_builtin(TimeSeriesCNN(3, 3), tmp_path / "base", ["0", "1", "2"])
    bucket = s3.create_bucket("base-models")
    for path in (tmp_path / "base").iterdir():
        s3.client().upload_file(str(path), bucket, f"sensor/v1/{path.name}")
    name = f"sensor-base-{tmp_path.name[-6:]}"
    _mlflow(mlflow_server, "registered-models/create", {"name": name})
    version = _mlflow(mlflow_server, "model-versions/create", {"name": name, "source": f"s3://{bucket}/sensor/v1"})
    _mlflow(
        mlflow_server,
        "registered-models/alias",
        {"name": name, "alias": "champion", "version": version["model_version"]["version"]},
    )
    data = sine_classes(tmp_path / "data")
    for uri in (f"models:/{name}/1", f"models:/{name}@champion"):
        work = tmp_path / uri.rsplit("/", 1)[-1].replace("@", "-")
        work.mkdir()
        cfg = config(work, data, baseModel={"uri": uri, "sha256": digest}, training={"maxSteps": 2},
                     runtime={"s3Endpoint": s3.endpoint})  # fmt: skip
        assert main(["--config", str(write_config(work, cfg))]) == 0, termination(work)
        manifest = verify_package(read_folder(work / "work" / "package"))
        assert (manifest.lineage.base_model_uri, manifest.lineage.base_model_sha256) == (uri, digest)


def _mlflow(server: MlflowServer, path: str, body: dict[str, object]) -> dict[str, Any]:
    req = urllib.request.Request(  # noqa: S310 - loopback server we started
        f"{server.url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        return json.loads(resp.read() or b"{}")  # type: ignore[no-any-return]


def test_operator_side_verification_detects_a_tampered_package(tmp_path: Path, s3: S3Server) -> None:
    """A package changed in S3 after upload is refused, naming the file; a missing one is named too."""
    lineage = Lineage(base_model_uri="builtin:timeseries-cnn", data_sha256="0" * 64, samples=3, data_format="npy",
                      trainer_version="test")  # fmt: skip
    digest, _ = package.build(
        tmp_path / "pkg", {"lora_A.weight": torch.ones(4, 8)}, encoding="int4-zstd", peft_config={"r": 4},
        lineage=lineage, steps=1, duration_s=0.1, metrics={}, energy_joules=None, energy_method=None,
        peak_memory_bytes=None, signing_key_pem=None,
    )  # fmt: skip
    client = s3.client()
    bucket = s3.create_bucket("tamper")
    uri = package.upload(tmp_path / "pkg", client, bucket, "ns/job/local/n1")
    manifest, files = fetch_and_verify(client, uri, expected_digest=digest, public_key_pem=None)
    assert manifest.encoding == "int4-zstd" and "adapter.safetensors.zst" in files

    original = client.get_object(Bucket=bucket, Key="ns/job/local/n1/adapter.safetensors.zst")["Body"].read()
    client.put_object(
        Bucket=bucket, Key="ns/job/local/n1/adapter.safetensors.zst", Body=original[:-1] + bytes([original[-1] ^ 1])
    )
    with pytest.raises(DeltaVerificationError, match=r"adapter\.safetensors\.zst has SHA-256 .* the manifest says"):
        fetch_and_verify(client, uri, expected_digest=digest, public_key_pem=None)
    with pytest.raises(PackageNotFoundError, match="no package at s3://tamper/ns/job/local/n2"):
        fetch_and_verify(client, f"s3://{bucket}/ns/job/local/n2", expected_digest=None, public_key_pem=None)


def _sigv4(s3: S3Server) -> Any:
    import boto3  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    env = s3.env()
    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=s3.region,
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))  # fmt: skip


def test_presigned_upload_and_base_model_download_need_no_credentials_and_stay_in_their_prefix(
    tmp_path: Path, s3: S3Server
) -> None:
    """What a trainer does under the operator (docs/security.md): upload with the POST policy it was
    handed, download its base model from presigned URLs — the S3 server enforces both."""
    from edgetune_api.trainer_config import BaseFiles, UploadPolicy  # noqa: PLC0415
    from edgetune_trainer.models import ModelError, fetch_presigned  # noqa: PLC0415

    bucket = s3.create_bucket("presigned")
    signer = _sigv4(s3)
    folder = tmp_path / "package"
    folder.mkdir()
    (folder / "adapter.safetensors.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 40)
    (folder / "manifest.json").write_text("{}")

    def policy(prefix: str, seconds: int = 600) -> UploadPolicy:
        post = signer.generate_presigned_post(Bucket=bucket, Key=f"{prefix}/${{filename}}", ExpiresIn=seconds,
                                              Conditions=[["content-length-range", 0, 1 << 20]])  # fmt: skip
        return UploadPolicy(url=post["url"], bucket=bucket, prefix=prefix, expires="in a while",
                            fields={k: v for k, v in post["fields"].items() if k != "key"})  # fmt: skip

    uri = package.upload_presigned(folder, policy("jobs/a/edge-1/node-1"))
    assert uri == f"s3://{bucket}/jobs/a/edge-1/node-1"
    client = s3.client()
    stored = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert stored == {"jobs/a/edge-1/node-1/adapter.safetensors.zst": 10244, "jobs/a/edge-1/node-1/manifest.json": 2}
    # The same policy cannot write elsewhere: the server refuses, the trainer says so.
    stolen = policy("jobs/a/edge-1/node-1").model_copy(update={"prefix": "jobs/b/edge-2/node-9"})
    with pytest.raises(package.UploadError, match="HTTP 403"):
        package.upload_presigned(folder, stolen)
    expiring = policy("jobs/a/edge-1/node-1", seconds=1)
    time.sleep(2)
    with pytest.raises(package.UploadError, match="HTTP 403"):  # expired
        package.upload_presigned(folder, expiring)
    # A base model folder from presigned GETs, cached once complete; a name leaving the folder refused.
    for name in ("config.json", "weights/model.safetensors"):
        client.put_object(Bucket=bucket, Key=f"models/base/{name}", Body=name.encode())
    files = {name: signer.generate_presigned_url("get_object", ExpiresIn=600,
                                                 Params={"Bucket": bucket, "Key": f"models/base/{name}"})
             for name in ("config.json", "weights/model.safetensors")}  # fmt: skip
    base = BaseFiles(uri="models:/base@prod", source=f"s3://{bucket}/models/base", files=files, expires="later")
    fetched = fetch_presigned(base, tmp_path / "cache")
    assert (fetched / "weights" / "model.safetensors").read_bytes() == b"weights/model.safetensors"
    assert fetch_presigned(base, tmp_path / "cache") == fetched  # cached
    escape = base.model_copy(update={"source": "elsewhere", "files": {"../../x": files["config.json"]}})
    with pytest.raises(ModelError, match="leaves the model folder"):
        fetch_presigned(escape, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "base"]  # nothing half-downloaded left
