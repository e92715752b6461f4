# Two entry points; both set up everything they need (scripts/bootstrap.sh) and are idempotent.
.PHONY: demo test bootstrap manifests images

demo: bootstrap
	.venv/bin/python -m edgetune_testenv demo

test:
	bash scripts/test.sh

bootstrap:
	bash scripts/bootstrap.sh

# Plain `kubectl apply` manifests rendered from the chart (kept in sync by tests/e2e/test_crds.py).
manifests: bootstrap
	.venv/bin/python -m edgetune_testenv manifests > deploy/edgetune.yaml

# The operator, trainer (CUDA variant) and agent images from their Dockerfiles, built offline with
# buildah and cached by the hash of their inputs (docs/images.md); the container tests build them too.
images: bootstrap
	.venv/bin/python -m edgetune_testenv images
