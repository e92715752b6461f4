"""``python -m edgetune_operator``: run the operator (cluster-wide, one replica)."""

from __future__ import annotations

import argparse
import logging

import kopf

from edgetune_operator import handlers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="edgetune-operator", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = handlers.SETTINGS
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    if settings.namespaces:
        kopf.run(namespaces=settings.namespaces, standalone=True, liveness_endpoint=liveness)
    else:
        kopf.run(clusterwide=True, standalone=True, liveness_endpoint=liveness)


if __name__ == "__main__":
    main()
