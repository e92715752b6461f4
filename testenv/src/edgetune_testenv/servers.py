"""The real servers edgetune talks to, started on loopback for tests and the demo:
an S3-compatible object store (versitygw, built from its Go module), an MLflow tracking
server (sqlite backend, artifacts proxied to that store), Prometheus and its Pushgateway
(Debian's packages).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from edgetune_testenv import binaries
from edgetune_testenv.errors import EnvironmentSetupError
from edgetune_testenv.procs import ManagedProcess, ProcessGroup, free_port, http_ok


class _Server(ProcessGroup):
    name = "server"

    def __init__(self, workdir: Path | None = None) -> None:
        super().__init__(self.name, workdir)


class S3Server(_Server):
    """versitygw in POSIX mode: a real S3 API server over a local directory."""

    name = "s3"
    region = "us-east-1"

    def __init__(self, workdir: Path | None = None) -> None:
        super().__init__(workdir)
        self.access_key = "edgetune" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(20)
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        exe = binaries.binary(binaries.VERSITYGW, "versitygw")
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        (self.workdir / "meta").mkdir(exist_ok=True)
        self.port = free_port()
        proc = self.launch(
            ManagedProcess(
                "s3/versitygw",
                [
                    str(exe),
                    "--access",
                    self.access_key,
                    "--secret",
                    self.secret_key,
                    "--region",
                    self.region,
                    "--port",
                    f"127.0.0.1:{self.port}",
                    # Object metadata (ETags, checksums) in a sidecar folder: needs no xattr support.
                    "posix",
                    "--sidecar",
                    str(self.workdir / "meta"),
                    str(data),
                ],
                self.workdir / "versitygw.log",
                ports=(self.port,),
            )
        )
        proc.wait_until(self._answers, 30, "ready")
        return self

    def _answers(self) -> bool:
        self.client().list_buckets()
        return True

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs (and MLflow) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self) -> Any:
        import boto3  # noqa: PLC0415 - heavy import, only when a test needs S3
        from botocore.config import Config  # noqa: PLC0415

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` unless it exists (fixtures of several test modules share one server)."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name


class MlflowServer(_Server):
    """``mlflow server`` with a sqlite backend store and artifacts proxied to an S3 bucket."""

    name = "mlflow"

    def __init__(self, s3: S3Server, bucket: str = "mlflow", workdir: Path | None = None) -> None:
        super().__init__(workdir)
        self.s3 = s3
        self.bucket = bucket
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> MlflowServer:
        mlflow = Path(sys.executable).parent / "mlflow"
        if not mlflow.exists():
            raise EnvironmentSetupError(
                f"the mlflow command is missing next to {sys.executable}: install edgetune[dev]"
            )
        self.s3.create_bucket(self.bucket)
        self.port = free_port()
        env = {**_base_env(), **self.s3.env()}
        proc = self.launch(
            ManagedProcess(
                "mlflow",
                [
                    str(mlflow),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.workdir / 'mlflow.db'}",
                    "--artifacts-destination",
                    f"s3://{self.bucket}/artifacts",
                    "--serve-artifacts",
                ],
                self.workdir / "mlflow.log",
                env=env,
                cwd=self.workdir,
                ports=(self.port,),
            )
        )
        proc.wait_until(lambda: http_ok(f"{self.url}/health"), timeout, "healthy")
        return self


def _target_group(job: str, address: str, labels: dict[str, str]) -> dict[str, Any]:
    """One ``file_sd`` target group."""
    return {"targets": [address], "labels": {"job": job, **labels}}


class Prometheus(_Server):
    """Prometheus (1 s scrapes) with a Pushgateway; targets are added at run time via file_sd."""

    name = "prometheus"

    def __init__(self, workdir: Path | None = None, scrape_interval: str = "1s") -> None:
        super().__init__(workdir)
        self.scrape_interval = scrape_interval
        self.port = 0
        self.pushgateway_port = 0
        self._targets: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._server: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pushgateway_url(self) -> str:
        return f"http://127.0.0.1:{self.pushgateway_port}"

    def start(self) -> Prometheus:
        prom, gw = shutil.which("prometheus"), shutil.which("prometheus-pushgateway")
        if prom is None or gw is None:
            raise EnvironmentSetupError(
                "prometheus and prometheus-pushgateway are needed on PATH "
                "(Debian: apt-get install prometheus prometheus-pushgateway; `make test` does this)"
            )
        self.port, self.pushgateway_port = free_port(), free_port()
        pushgateway = self.launch(
            ManagedProcess(
                "pushgateway",
                [gw, f"--web.listen-address=127.0.0.1:{self.pushgateway_port}", "--log.level=warn"],
                self.workdir / "pushgateway.log",
                ports=(self.pushgateway_port,),
            )
        )
        self._write_targets()
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [
                {
                    "job_name": "pushgateway",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{self.pushgateway_port}"]}],
                },
                {"job_name": "file", "file_sd_configs": [{"files": [str(self.workdir / "targets" / "*.json")]}]},
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        proc = self.launch(
            ManagedProcess(
                "prometheus",
                [
                    prom,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                self.workdir / "prometheus.log",
                ports=(self.port,),
            )
        )
        pushgateway.wait_until(lambda: http_ok(f"{self.pushgateway_url}/-/ready"), 30, "ready")
        proc.wait_until(lambda: http_ok(f"{self.url}/-/ready"), 60, "ready")
        self._server = proc
        return self

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Prometheus stopped (connections refused) inside the block, then started again on the same
        port with the same data (the Pushgateway stays up)."""
        server = self._server
        if server is None:
            raise EnvironmentSetupError("Prometheus is not running")
        server.stop()
        try:
            yield
        finally:
            server.start()
            server.wait_until(lambda: http_ok(f"{self.url}/-/ready"), 60, "ready")

    def push(self, job: str, text: str, **grouping: str) -> None:
        """Replace the Pushgateway group ``job`` (+ ``grouping`` labels) with ``text`` (exposition format)."""
        import urllib.request  # noqa: PLC0415

        path = "".join(f"/{k}/{v}" for k, v in grouping.items())
        req = urllib.request.Request(f"{self.pushgateway_url}/metrics/job/{job}{path}", data=text.encode(),  # noqa: S310
                                     method="PUT")  # fmt: skip
        with urllib.request.urlopen(req, timeout=10):  # noqa: S310 - the loopback Pushgateway
            pass

    def add_target(self, job: str, address: str, **labels: str) -> None:
        """Scrape ``address`` (host:port) as job ``job``; Prometheus notices the file within a second."""
        with self._lock:
            self._targets.setdefault(job, []).append(_target_group(job, address, labels))
            self._write_targets()

    def set_targets(self, job: str, groups: list[tuple[str, dict[str, str]]]) -> None:
        """Scrape exactly these (address, labels) as job ``job`` from now on (none: stop); the files
        are written again only when something changed."""
        wanted = [_target_group(job, address, labels) for address, labels in groups]
        with self._lock:
            if self._targets.get(job) == wanted:
                return
            self._targets[job] = wanted
            self._write_targets()

    def _write_targets(self) -> None:
        directory = self.workdir / "targets"
        directory.mkdir(exist_ok=True)
        for job, groups in self._targets.items():
            tmp = directory / f".{job}.json.tmp"
            tmp.write_text(json.dumps(groups))
            tmp.rename(directory / f"{job}.json")  # atomic, so Prometheus never reads half a file

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        import urllib.parse  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback URL we built
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise EnvironmentSetupError(f"Prometheus query {promql!r} failed: {body}")
        return list(body["data"]["result"])


def _base_env() -> dict[str, str]:
    import os  # noqa: PLC0415

    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k in keep}
