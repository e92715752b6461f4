# Two entry points; both set up everything they need (scripts/bootstrap.sh) and are idempotent.
.PHONY: demo test bootstrap

demo: bootstrap
	.venv/bin/python -m edgetune_testenv demo

test:
	bash scripts/test.sh

bootstrap:
	bash scripts/bootstrap.sh
