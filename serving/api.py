"""The HTTP API of a serving replica (aiohttp).

=====================  ========================================================================
``GET /recommendations``  ``user_id`` (required), ``k`` (1..100, default 10), ``policy``
                          (greedy | epsilon_greedy | softmax, default greedy), ``exclude_seen``
                          (true | false, default true), ``epsilon`` (0..1) and ``temperature``
                          (0.01..100) to override the replica's defaults.
                          Returns ``{request_id, model_version, user_id, policy, fallback,
                          items: [{item_id, position, score, propensity}]}``, and ``variant``
                          when the replica runs A/B variants (``serving.variants``: the
                          variant may fix the policy, which ``policy`` then reports).
``POST /predict``         JSON ``{user_id, item_ids: [...] (1..1000), kind?: rating | click}``.
                          Returns ``{model_version, user_id, kind, known_user,
                          items: [{item_id, score, known}]}``.
``GET /healthz``          200 while the process serves HTTP.
``GET /readyz``           200 once a model is loaded and the update topic has been caught up
                          with, else 503 with the reason.
``GET /metrics``          Prometheus text format (this replica's registry only).
=====================  ========================================================================

Every input is validated and bounded: unknown or repeated query parameters, ids longer than 256
characters, query parameters that are not valid UTF-8 once percent-decoded (aiohttp would turn
them into U+FFFD), bodies over 64 KiB (aiohttp's ``client_max_size``) or slower than
``body_timeout_s`` (408, and the connection closes) and malformed JSON get a 4xx whose JSON body
says what is wrong (``{"error": ...}``); an unexpected failure is logged and answered with a 500,
and the server keeps going. A client that leaves before its answer (mid-body, or while it is
computed) is counted apart (``streamrec_serving_client_aborts_total``), not as a response.
Responses are encoded with orjson.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, unquote_to_bytes

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.metrics import ROUTES, ServingMetrics
from serving.model import KINDS
from serving.policies import POLICIES
from serving.recommend import NotReady, Recommender
from stream.events import MAX_ID_CHARS

log = logging.getLogger(__name__)

MAX_K = 100
MAX_PREDICT_ITEMS = 1000
MAX_BODY_BYTES = 64 * 1024
PATHS = ("/recommendations", "/predict", "/healthz", "/readyz", "/metrics")
RECOMMENDATION_PARAMS = ("user_id", "k", "policy", "exclude_seen", "epsilon", "temperature")
PREDICT_FIELDS = ("user_id", "item_ids", "kind")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_ALLOWED = frozenset(RECOMMENDATION_PARAMS)


class BadRequest(ValueError):
    """The request breaks the API; the message says how."""


@dataclass(frozen=True)
class RecommendationQuery:
    user_id: str
    k: int = 10
    policy: str = "greedy"
    exclude_seen: bool = True
    epsilon: float | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class PredictRequest:
    user_id: str
    item_ids: list[str]
    kind: str | None = None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if not value:
        raise BadRequest(f"{name} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise BadRequest(f"{name} has {len(value)} characters, at most {MAX_ID_CHARS} allowed")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{name} is not valid Unicode (it holds a lone surrogate)") from None
    return value


def check_query_encoding(raw_query: str) -> None:
    """Raise BadRequest, naming the parameter, when a name or value of the raw (percent-encoded)
    query string is not valid UTF-8 once decoded; a lone surrogate is not (UTF-8 cannot encode
    one). aiohttp decodes such bytes to U+FFFD, which would serve an id nobody has.

    >>> check_query_encoding("user_id=caf%C3%A9&k=5")
    >>> check_query_encoding("k=5&user_id=%ED%A0%80")
    Traceback (most recent call last):
    ...
    serving.api.BadRequest: user_id is not valid UTF-8 once percent-decoded
    """
    for pair in raw_query.split("&"):
        name, _, value = pair.partition("=")
        if not _is_utf8(name):
            raise BadRequest("a parameter name is not valid UTF-8 once percent-decoded")
        if not _is_utf8(value):
            raise BadRequest(f"{unquote(name)[:40]} is not valid UTF-8 once percent-decoded")


def _is_utf8(percent_encoded: str) -> bool:
    try:
        unquote_to_bytes(percent_encoded).decode("utf-8")
    except UnicodeError:  # bytes that are not UTF-8, or a raw byte aiohttp kept as a surrogate escape
        return False
    return True


def _number(text: str, name: str, low: float, high: float, integer: bool = False) -> float:
    kind = "an integer" if integer else "a number"
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise BadRequest(f"{name} must be {kind} in {low:g}..{high:g}, got {_shown(text)}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise BadRequest(f"{name} must be {kind} in {low:g}..{high:g}, got {_shown(text)}")
    return value


def parse_recommendation_query(query: Mapping[str, str]) -> RecommendationQuery:
    """Validate the query of ``GET /recommendations`` (a multidict); raises BadRequest.

    >>> parse_recommendation_query({"user_id": "u1", "k": "5"})
    RecommendationQuery(user_id='u1', k=5, policy='greedy', exclude_seen=True, epsilon=None, temperature=None)
    >>> parse_recommendation_query({"user_id": "u1", "k": "0"})
    Traceback (most recent call last):
    ...
    serving.api.BadRequest: k must be an integer in 1..100, got '0'
    """
    names = set(query)
    if not names <= _ALLOWED:
        unknown = sorted(names - _ALLOWED)
        raise BadRequest(f"unknown parameter(s) {', '.join(map(_shown, unknown))}; "
                         f"allowed: {', '.join(RECOMMENDATION_PARAMS)}")
    getall = getattr(query, "getall", None)
    if getall is not None and len(query) != len(names):  # a multidict with a repeated name
        for name in RECOMMENDATION_PARAMS:
            if len(getall(name, ())) > 1:
                raise BadRequest(f"{name} is given more than once")
    if "user_id" not in query:
        raise BadRequest("user_id is required")
    user_id = _check_id(query["user_id"], "user_id")
    k = int(_number(query.get("k", "10"), "k", 1, MAX_K, integer=True))
    policy = query.get("policy", "greedy")
    if policy not in POLICIES:
        raise BadRequest(f"policy must be one of {', '.join(POLICIES)}, got {_shown(policy)}")
    exclude_text = query.get("exclude_seen", "true").lower()
    if exclude_text not in _TRUE + _FALSE:
        raise BadRequest(f"exclude_seen must be true or false, got {_shown(query['exclude_seen'])}")
    epsilon = _number(query["epsilon"], "epsilon", 0.0, 1.0) if "epsilon" in query else None
    temperature = _number(query["temperature"], "temperature", 0.01, 100.0) if "temperature" in query else None
    return RecommendationQuery(user_id, k, policy, exclude_text in _TRUE, epsilon, temperature)


def parse_predict_body(body: bytes) -> PredictRequest:
    """Validate the body of ``POST /predict``; raises BadRequest.

    >>> parse_predict_body(b'{"user_id": "u1", "item_ids": ["a", "b"]}')
    PredictRequest(user_id='u1', item_ids=['a', 'b'], kind=None)
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise BadRequest(f"the body must be a JSON object: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(data) - set(PREDICT_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(_shown, unknown))}; allowed: {', '.join(PREDICT_FIELDS)}")
    if "user_id" not in data:
        raise BadRequest("user_id is required")
    user_id = _check_id(data["user_id"], "user_id")
    item_ids = data.get("item_ids")
    if not isinstance(item_ids, list) or not 1 <= len(item_ids) <= MAX_PREDICT_ITEMS:
        raise BadRequest(f"item_ids must be a list of 1..{MAX_PREDICT_ITEMS} item ids")
    for i, item_id in enumerate(item_ids):
        _check_id(item_id, f"item_ids[{i}]")
    kind = data.get("kind")
    if kind is not None and kind not in KINDS:
        raise BadRequest(f"kind must be one of {', '.join(KINDS)}, got {_shown(kind)}")
    return PredictRequest(user_id, item_ids, kind)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _client_left(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def build_app(recommender: Recommender, metrics: ServingMetrics, readiness: Callable[[], tuple[bool, str]],
              before_scrape: Callable[[], None] = lambda: None, body_timeout_s: float = 10.0) -> web.Application:
    """The aiohttp application of one replica.

    ``readiness`` returns (ready, reason); ``before_scrape`` runs before ``/metrics`` renders
    (to refresh statistics computed lazily); a request body must arrive within ``body_timeout_s``.
    """
    # The labelled children, looked up once (``labels()`` costs a lock and a dict lookup per call).
    latency = {route: metrics.request_seconds.labels(route) for route in ROUTES}
    aborts = {route: metrics.client_aborts.labels(route) for route in ROUTES}
    responses: dict[tuple[str, int], object] = {}

    def count(route: str, status: int) -> None:
        child = responses.get((route, status // 100))
        if child is None:
            child = responses[(route, status // 100)] = metrics.requests.labels(route, f"{status // 100}xx")
        child.inc()

    @web.middleware
    async def observe(request: web.Request, handler: Callable) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.name or "unmatched"
        try:
            response = await handler(request)
        except BadRequest as err:
            response = _json({"error": str(err)}, 400)
        except NotReady as err:
            response = _json({"error": str(err)}, 503)
        except web.HTTPNotFound:
            response = _json({"error": f"no such path: {request.path[:100]!r}; the API has {', '.join(PATHS)}"}, 404)
        except web.HTTPMethodNotAllowed as err:
            response = _json({"error": f"{request.method} is not allowed on {request.path}; "
                                       f"use {', '.join(sorted(err.allowed_methods))}"}, 405)
        except web.HTTPException as err:
            response = _json({"error": err.text or err.reason}, err.status)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if not (isinstance(err, ConnectionError) and _client_left(request)):
                log.exception("unexpected failure on %s %s", request.method, request.path)
            response = _json({"error": "internal error (logged on the server)"}, 500)
        if _client_left(request):  # nobody reads the response: aiohttp drops it
            (aborts.get(route) or metrics.client_aborts.labels(route)).inc()
            log.debug("the client of %s %s left before its answer", request.method, request.path[:100])
            return response
        (latency.get(route) or metrics.request_seconds.labels(route)).observe(time.perf_counter() - started)
        count(route, response.status)
        return response

    async def recommendations(request: web.Request) -> web.Response:
        check_query_encoding(request.rel_url.raw_query_string)
        q = parse_recommendation_query(request.query)
        result = await recommender.recommend(q.user_id, q.k, q.policy, q.exclude_seen, q.epsilon, q.temperature)
        if result["fallback"]:
            metrics.fallbacks.inc()
        if "variant" in result:
            metrics.variant_requests.labels(result["variant"]).inc()
        return _json(result)

    async def predict(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(body_timeout_s):
                raw = await request.read()
        except TimeoutError:
            response = _json({"error": f"the body did not arrive within {body_timeout_s:g} s"}, 408)
            response.force_close()
            return response
        body = parse_predict_body(raw)
        return _json(recommender.predict(body.user_id, body.item_ids, body.kind))

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready, reason = readiness()
        model = recommender.live.current
        return _json({"ready": ready, "reason": reason, "model_version": model.version if model else None},
                     200 if ready else 503)

    async def prometheus(request: web.Request) -> web.Response:
        before_scrape()
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[observe])
    app.router.add_get("/recommendations", recommendations, name="recommendations")
    app.router.add_post("/predict", predict, name="predict")
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", prometheus, name="metrics")
    return app
