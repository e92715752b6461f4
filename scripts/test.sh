#!/usr/bin/env bash
# The whole test suite: static checks, unit tests, then the end-to-end tests against real local
# control planes and servers. Benchmarks are separate (bench/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy operator/src trainer-image/src agent/src testenv/src
echo "== import contracts"; .venv/bin/lint-imports
echo "== CRDs and the chart's values schema in sync with the models"; .venv/bin/python -m edgetune_api check
echo "== Grafana dashboards in sync with their code"; .venv/bin/python -m edgetune_dashboards check
echo "== pytest"
set +e
.venv/bin/python -m pytest -m "not bench" "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
  echo "test: pytest collected no tests; that is a failure here" >&2
fi
exit "$status"
