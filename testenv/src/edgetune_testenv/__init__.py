"""Local, real test environment for edgetune: Kubernetes control planes built from the
official Go modules, kwok nodes, a pod executor, and MLflow/S3/Prometheus servers.

Test and development infrastructure only; nothing in the product imports it.
"""
