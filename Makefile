# Two entry points; both set up everything they need (scripts/bootstrap.sh) and are idempotent.
.PHONY: demo test bootstrap manifests

demo: bootstrap
	.venv/bin/python -m edgetune_testenv demo

test:
	bash scripts/test.sh

bootstrap:
	bash scripts/bootstrap.sh

# Plain `kubectl apply` manifests rendered from the chart (kept in sync by tests/e2e/test_crds.py).
manifests: bootstrap
	.venv/bin/python -m edgetune_testenv manifests > deploy/edgetune.yaml
