"""The upstream model server (TF Serving REST) that answers for the accepted inputs."""
from __future__ import annotations

import logging

import httpx
import numpy as np
import orjson

from serving.asgi import ApiError
from serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)


def checked_upstream_url(upstream: str) -> str:
    """A TF Serving model URL without its trailing slash; refuses anything else."""
    upstream = upstream.rstrip("/")
    url = httpx.URL(upstream)
    if url.scheme not in ("http", "https") or not url.host or upstream.endswith(":predict"):
        raise ValueError(f"upstream must be a model URL such as http://host:8501/v1/models/name, got {upstream!r}")
    return upstream


async def forward(client: httpx.AsyncClient, upstream: str, x: np.ndarray, request_id: str,
                  metrics: ServiceMetrics) -> np.ndarray:
    """The upstream's class-score vectors for the accepted inputs `x`; 502 or 504 when it fails."""
    try:
        response = await client.post(
            f"{upstream}:predict", content=orjson.dumps({"instances": x}, option=orjson.OPT_SERIALIZE_NUMPY),
            headers={"Content-Type": "application/json", "X-Request-ID": request_id})
    except httpx.TimeoutException:
        metrics.upstream_errors.inc()
        raise ApiError(504, f"the upstream model server did not answer within {client.timeout.read} s") from None
    except httpx.HTTPError as error:
        metrics.upstream_errors.inc()
        raise ApiError(502, f"the upstream model server is unreachable ({type(error).__name__})") from None
    try:
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        predictions = np.asarray(response.json()["predictions"], np.float64)
        if predictions.ndim != 2 or len(predictions) != len(x) or not np.isfinite(predictions).all():
            raise ValueError(f"predictions of shape {predictions.shape} for {len(x)} inputs")
    except (ValueError, KeyError, TypeError) as error:
        metrics.upstream_errors.inc()
        log.warning("request %s: upstream answered %s: %.500s", request_id, error, response.text)
        raise ApiError(502, f"the upstream model server failed ({error}; expected one class-score vector "
                       "per input)") from None
    return predictions
