"""Query-attack detection in the HTTP service: `ClientGate` names the client of each request
(`serving.clients`) and refuses blocked clients before their body is read; `screen` runs the
stateful detector (`serving.stateful`) on a guarded batch and merges its verdict into the guard's;
`QueryAttackMetrics` puts both in /metrics."""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable

import anyio
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from serving.asgi import ApiError, error_response
from serving.clients import ClientIdentity, read_tokens
from serving.guard import Guard, GuardResult
from serving.stateful import POLICIES, MatchRule, MemoryBackend, QueryAttackDetector

log = logging.getLogger(__name__)


def query_detection(guard: Guard, *, token: str | None = None, tokens_file: str | None = None,
                    trusted_proxies: tuple[str, ...] = (), policy: str = "block", state: str = "memory",
                    block_seconds: float = 600.0, between_window: int = 32) -> tuple[ClientIdentity, QueryAttackDetector | None]:
    """`safetynet serve`'s client identity and query-attack detector (None for policy "off"); `state`
    is "memory" (this process) or a redis:// URL shared by replicas; `between_window` is the rule's
    (`serving.stateful.MatchRule`; 0: fingerprints only)."""
    if policy not in (*POLICIES, "off"):
        raise ValueError(f"unknown query-attack policy {policy!r}; choose one of {[*POLICIES, 'off']}")
    clients = ClientIdentity(token=None if tokens_file else token,
                             tokens=read_tokens(tokens_file) if tokens_file else None, trusted_proxies=trusted_proxies)
    if policy == "off":
        return clients, None
    rule = MatchRule(between_window=between_window)
    if state == "memory":
        backend = MemoryBackend(rule)
    elif state.startswith(("redis://", "rediss://", "unix://")):
        from serving.stateful_redis import RedisBackend

        backend = RedisBackend(state, rule)
    else:
        raise ValueError(f"query-attack state must be 'memory' or a redis:// URL, got {state!r}")
    return clients, QueryAttackDetector(backend, rule, guard.clip, policy=policy, block_seconds=block_seconds)


class QueryAttackMetrics:
    """Counters of the stateful detector, in the service's registry."""

    def __init__(self, registry: CollectorRegistry, top_k: int) -> None:
        self.matched = Counter("safetynet_query_attack_matched_inputs", "Inputs that matched a recent query of their "
                               "client (a query attack)", registry=registry)
        self.between = Counter("safetynet_query_attack_between_inputs", "Inputs that lay between two recent queries "
                               "of their client (a binary or line search; also counted as matched)", registry=registry)
        self.rejected = Counter("safetynet_query_attack_rejected_inputs", "Inputs rejected for matching a recent "
                                "query", registry=registry)
        self.blocks = Counter("safetynet_query_attack_blocks", "Clients blocked for a query attack", registry=registry)
        self.refused = Counter("safetynet_query_attack_refused_requests", "Requests refused because their client "
                               "is blocked", registry=registry)
        self.errors = Counter("safetynet_query_attack_errors", "Batches the state backend failed on (answered 503)",
                              registry=registry)
        self.shared = Histogram("safetynet_query_attack_shared_hashes", "Per input, the most fingerprint hashes "
                                "shared with one recent query of the client",
                                buckets=sorted({0, 1, 2, 5, 10, 15, 20, 25, 30, 40, top_k}), registry=registry)


class ClientGate:
    """ASGI middleware inside `serving.asgi.Gate` (which set the request id): names the client
    (scope["state"]["client"]), answers 401 when per-client tokens are required and missing or
    wrong, and 429 (with Retry-After) while the client is blocked."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, clients: ClientIdentity,
                 detector: QueryAttackDetector | None, metrics: QueryAttackMetrics | None) -> None:
        self.app, self.clients, self.detector, self.metrics = app, clients, detector, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in ("/healthz", "/metrics"):
            return await self.app(scope, receive, send)
        request_id = scope["state"]["request_id"]
        client = self.clients.identify(scope)
        if client is None:
            response = error_response(401, "missing or unknown client token (send Authorization: Bearer <token>)",
                                      request_id, {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        scope["state"]["client"] = client
        if self.detector is not None and scope["path"].startswith("/v1/models/"):
            try:
                seconds = await anyio.to_thread.run_sync(self.detector.blocked_for, client)
            except Exception:
                log.exception("request %s: the query-attack state is unavailable", request_id)
                self.metrics.errors.inc()
                return await error_response(503, "the query-attack state is unavailable: retry later", request_id,
                                            {"Retry-After": "1"})(scope, receive, send)
            if seconds > 0:
                self.metrics.refused.inc()
                response = error_response(429, f"too many similar queries: this client is blocked for "
                                          f"{math.ceil(seconds)} s", request_id, {"Retry-After": str(math.ceil(seconds))})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def screen(detector: QueryAttackDetector, metrics: QueryAttackMetrics, client: str, x: np.ndarray,
                 result: GuardResult, request_id: str) -> tuple[GuardResult, np.ndarray]:
    """`result` with the inputs that matched a recent query of `client` flagged (and rejected, unless
    the policy is "flag"), and which inputs matched. The guard fails closed: a backend failure
    answers 503."""
    try:
        verdict = await anyio.to_thread.run_sync(detector.check, client, x)
    except Exception:
        log.exception("request %s: the query-attack state is unavailable", request_id)
        metrics.errors.inc()
        raise ApiError(503, "the query-attack state is unavailable: retry later", {"Retry-After": "1"}) from None
    for shared in verdict.shared:
        metrics.shared.observe(int(shared))
    metrics.matched.inc(int(verdict.matched.sum()))
    metrics.between.inc(int((verdict.between <= detector.rule.between_tolerance).sum()))
    metrics.rejected.inc(int(verdict.rejected.sum()))
    if verdict.blocked:
        metrics.blocks.inc()
        log.warning("request %s: client %s blocked for %g s (a query attack: %d of %d inputs matched)",
                    request_id, client, detector.block_seconds, verdict.matched.sum(), len(x))
    merged = dataclasses.replace(result, flagged=result.flagged | verdict.matched, rejected=result.rejected | verdict.rejected)
    return merged, verdict.matched
