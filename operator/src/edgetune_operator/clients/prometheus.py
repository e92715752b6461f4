"""Prometheus: instant queries for release analysis, over its HTTP API (``/api/v1/query``).

One value per query is what an analysis metric needs: a scalar, or a vector of exactly one
sample. A query Prometheus rejects (bad PromQL) is ``QueryRejectedError`` quoting Prometheus'
own message; an empty vector or NaN is no data; a vector of several series is rejected too,
because picking one silently would analyse something else than the user meant (aggregate with
``sum``/``max`` in the query). Connection errors and 5xx are ``PrometheusUnavailableError``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import urllib3

from edgetune_operator import metrics
from edgetune_operator.reconcile.analysis import Measurement

CONNECTIONS = 16
"""Kept-alive connections to Prometheus: reconcile threads call it at once (a pool of one, urllib3's
default, opened and dropped a connection per concurrent call under load, with a warning each)."""
TIMEOUT = urllib3.Timeout(connect=3.0, read=20.0)


class PrometheusUnavailableError(ConnectionError):
    """Prometheus did not answer, or answered 5xx."""


class QueryRejectedError(ValueError):
    """Prometheus rejected the query; the message quotes its error."""


class Prometheus:
    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.http = urllib3.PoolManager(timeout=TIMEOUT, retries=False, maxsize=CONNECTIONS)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def query(self, promql: str) -> list[dict[str, Any]] | float:
        """The raw result: a vector (list of samples) or a scalar."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            resp = self.http.request("POST", f"{self.url}/api/v1/query", fields={"query": promql},
                                     encode_multipart=False, headers=self.headers)  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:
            outcome = "unavailable"
            raise PrometheusUnavailableError(f"Prometheus at {self.url} unreachable: {exc}") from exc
        finally:
            metrics.observe_call("prometheus", "query", outcome, time.perf_counter() - started)
        try:
            body = json.loads(resp.data)
        except ValueError:
            body = {}
        if resp.status >= 500 and body.get("errorType") not in ("bad_data", "execution"):
            metrics.observe_call("prometheus", "query", "unavailable", 0.0)
            raise PrometheusUnavailableError(f"Prometheus at {self.url} answered {resp.status}: {resp.data[:200]!r}")
        if body.get("status") != "success":
            error = body.get("error") or resp.data[:300].decode(errors="replace")
            raise QueryRejectedError(f"Prometheus rejected the query ({body.get('errorType', resp.status)}): {error}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return float(data["result"][1])
        if data["resultType"] == "vector":
            return list(data["result"])
        raise QueryRejectedError(f"the query returns a {data['resultType']}; analysis needs a scalar or one sample")

    def measure(self, promql: str) -> Measurement:
        """One analysis measurement: a value, no data, or an error (never raises)."""
        try:
            result = self.query(promql)
        except (PrometheusUnavailableError, QueryRejectedError) as exc:
            return Measurement("error", message=str(exc))
        if isinstance(result, float):
            return Measurement("nodata") if math.isnan(result) else Measurement("value", result)
        if not result:
            return Measurement("nodata")
        if len(result) > 1:
            labels = [s.get("metric", {}) for s in result[:3]]
            return Measurement("error", message=f"the query returns {len(result)} series (e.g. {labels}); "
                               "aggregate it to one value, e.g. with sum() or max()")  # fmt: skip
        value = float(result[0]["value"][1])
        return Measurement("nodata") if math.isnan(value) else Measurement("value", value)
