"""``python -m edgetune_testenv``: build the binaries, or bring up the demo environment.

binaries        build (once) and verify every Go-built binary; print where they are
demo [--hold]   start a hub and two edge clusters with simulated GPU/NPU/CPU nodes plus the
                S3, MLflow and Prometheus servers; print what is running; with --hold keep it
                up until Ctrl-C (kubeconfigs are printed so kubectl can be pointed at them)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

from edgetune_testenv import binaries
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.errors import EnvironmentSetupError
from edgetune_testenv.nodes import ACCELERATOR_LABEL, GPU_RESOURCE, NPU_RESOURCE, default_fleet
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server


def _binaries() -> int:
    for name, path in binaries.ensure_all().items():
        print(f"{name:12} {path}")
    return 0


def _demo(hold: bool, workdir: Path | None) -> int:
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        clusters = []
        for name, site in (("hub", "hub"), ("edge-factory", "factory"), ("edge-farm", "farm")):
            plane = ControlPlane(name, workdir / name if workdir else None)
            stack.enter_context(plane)
            plane.add_nodes(default_fleet(site))
            clusters.append(plane)
        s3 = stack.enter_context(S3Server(workdir / "s3" if workdir else None))
        mlflow = stack.enter_context(MlflowServer(s3, workdir=workdir / "mlflow" if workdir else None))
        prometheus = stack.enter_context(Prometheus(workdir / "prometheus" if workdir else None))
        elapsed = time.monotonic() - started

        print(f"\nedgetune demo environment up in {elapsed:.1f} s\n")
        accel, gpu, npu = (key.replace(".", "\\.") for key in (ACCELERATOR_LABEL, GPU_RESOURCE, NPU_RESOURCE))
        columns = (
            f"NAME:.metadata.name,ACCELERATOR:.metadata.labels.{accel},GPU:.status.allocatable.{gpu},"
            f"NPU:.status.allocatable.{npu},CPU:.status.allocatable.cpu,MEMORY:.status.allocatable.memory"
        )
        for plane in clusters:
            server = json.loads(plane.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
            print(f"== cluster {plane.name}  ({plane.server}, Kubernetes {server})")
            print(f"   kubeconfig: {plane.kubeconfig}")
            print(plane.kubectl("get", "nodes", "-o", f"custom-columns={columns}").stdout)
        print(f"S3 (versitygw)   {s3.endpoint}")
        print(f"MLflow           {mlflow.url}")
        print(f"Prometheus       {prometheus.url}   Pushgateway {prometheus.pushgateway_url}")
        if hold:
            print("\nholding; press Ctrl-C to tear everything down")
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        print("\ntearing down ...")
    print("done: every process stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgetune_testenv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("binaries", help="build and verify the Go-built binaries")
    demo = sub.add_parser("demo", help="bring up the local demo environment")
    demo.add_argument("--hold", action="store_true", help="keep it running until Ctrl-C")
    demo.add_argument("--workdir", type=Path, help="keep state and logs here instead of a temp dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "binaries":
            return _binaries()
        return _demo(args.hold, args.workdir)
    except EnvironmentSetupError as exc:
        print(f"edgetune: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
