"""The MLflow, S3 and Prometheus fixtures are real servers that answer real protocol calls."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
import urllib.request
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app

from edgetune_testenv.procs import free_port
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server
from tests.support import eventually

pytestmark = pytest.mark.e2e


def _mlflow(server: MlflowServer, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = f"{server.url}/api/2.0/mlflow/{path}"
    data = None
    if method == "GET" and body:
        url += "?" + urllib.parse.urlencode(body)
    elif body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback server we started
        return json.loads(resp.read() or b"{}")  # type: ignore[no-any-return]


def test_s3_server_round_trips_multipart_objects(s3: S3Server) -> None:
    client = s3.client()
    bucket = s3.create_bucket("roundtrip")
    payload = bytes(range(256)) * (6 * 2**20 // 256)  # 6 MiB: two parts of 5 MiB + rest
    upload = client.create_multipart_upload(Bucket=bucket, Key="delta.bin")
    parts = []
    for number, offset in enumerate(range(0, len(payload), 5 * 2**20), start=1):
        part = client.upload_part(
            Bucket=bucket,
            Key="delta.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=payload[offset : offset + 5 * 2**20],
        )
        parts.append({"ETag": part["ETag"], "PartNumber": number})
    client.complete_multipart_upload(
        Bucket=bucket, Key="delta.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    body = client.get_object(Bucket=bucket, Key="delta.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload).hexdigest()
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket=bucket, Key="missing")


def test_mlflow_registers_model_version_from_s3_artifact(mlflow_server: MlflowServer, s3: S3Server) -> None:
    # The adapter bytes go to the S3 store; the version's source points at them.
    client = s3.client()
    bucket = s3.create_bucket("adapters")
    adapter = b"\x00safetensors-bytes\x01" * 64
    client.put_object(Bucket=bucket, Key="jobs/j1/adapter.safetensors", Body=adapter)
    source = f"s3://{bucket}/jobs/j1"

    _mlflow(mlflow_server, "POST", "registered-models/create", {"name": "sensor-lora"})
    experiment = _mlflow(mlflow_server, "POST", "experiments/create", {"name": "edgetune-foundation"})
    run = _mlflow(mlflow_server, "POST", "runs/create", {"experiment_id": experiment["experiment_id"]})["run"]
    run_id = run["info"]["run_id"]
    _mlflow(
        mlflow_server, "POST", "runs/log-metric", {"run_id": run_id, "key": "eval_loss", "value": 0.25, "timestamp": 0}
    )
    version = _mlflow(
        mlflow_server, "POST", "model-versions/create", {"name": "sensor-lora", "source": source, "run_id": run_id}
    )["model_version"]
    assert version["source"] == source
    _mlflow(
        mlflow_server,
        "POST",
        "registered-models/alias",
        {"name": "sensor-lora", "alias": "candidate", "version": version["version"]},
    )
    _mlflow(
        mlflow_server,
        "POST",
        "model-versions/set-tag",
        {
            "name": "sensor-lora",
            "version": version["version"],
            "key": "edgetune.io/delta-sha256",
            "value": hashlib.sha256(adapter).hexdigest(),
        },
    )

    by_alias = _mlflow(mlflow_server, "GET", "registered-models/alias", {"name": "sensor-lora", "alias": "candidate"})
    mv = by_alias["model_version"]
    assert mv["version"] == version["version"]
    assert mv["run_id"] == run_id
    tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
    assert tags["edgetune.io/delta-sha256"] == hashlib.sha256(adapter).hexdigest()
    # The version's source really resolves to the bytes in the S3 store.
    key = urllib.parse.urlparse(mv["source"]).path.lstrip("/") + "/adapter.safetensors"
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == adapter


def test_mlflow_proxies_run_artifacts_into_the_s3_bucket(mlflow_server: MlflowServer, s3: S3Server) -> None:
    experiment = _mlflow(mlflow_server, "POST", "experiments/create", {"name": "artifact-proxy"})
    run = _mlflow(mlflow_server, "POST", "runs/create", {"experiment_id": experiment["experiment_id"]})["run"]
    artifact_uri = run["info"]["artifact_uri"]
    assert artifact_uri.startswith("mlflow-artifacts:/")
    rel = artifact_uri.removeprefix("mlflow-artifacts:/").lstrip("/")
    url = f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/{rel}/manifest.json"
    req = urllib.request.Request(url, data=b'{"ok": true}', method="PUT")  # noqa: S310
    with urllib.request.urlopen(req, timeout=30):  # noqa: S310
        pass
    objects = s3.client().list_objects_v2(Bucket=mlflow_server.bucket, Prefix=f"artifacts/{rel}")
    keys = [o["Key"] for o in objects.get("Contents", [])]
    assert keys == [f"artifacts/{rel}/manifest.json"]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def test_prometheus_scrapes_a_target_and_answers_promql(prometheus: Prometheus) -> None:
    registry = CollectorRegistry()
    gauge = Gauge("edgetune_test_peak_memory_bytes", "Peak memory of a test trainer.", ["node"], registry=registry)
    gauge.labels(node="edge-gpu-0").set(123456789)
    port = free_port()
    httpd = make_server("127.0.0.1", port, make_wsgi_app(registry), handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        prometheus.add_target("trainer", f"127.0.0.1:{port}", cluster="edge-a")
        result = eventually(
            lambda: prometheus.query('edgetune_test_peak_memory_bytes{job="trainer",cluster="edge-a"}'),
            timeout=60,
            what="the scraped sample",
        )
        assert len(result) == 1
        assert result[0]["metric"]["node"] == "edge-gpu-0"
        assert float(result[0]["value"][1]) == 123456789
    finally:
        httpd.shutdown()


def test_pushgateway_samples_reach_prometheus(prometheus: Prometheus) -> None:
    body = b"# TYPE edgetune_test_loss gauge\nedgetune_test_loss 0.75\n"
    req = urllib.request.Request(  # noqa: S310
        f"{prometheus.pushgateway_url}/metrics/job/trainer/node/edge-npu-1", data=body, method="PUT"
    )
    with urllib.request.urlopen(req, timeout=10):  # noqa: S310
        pass
    result = eventually(lambda: prometheus.query('edgetune_test_loss{node="edge-npu-1"}'), what="pushed sample")
    assert float(result[0]["value"][1]) == 0.75
