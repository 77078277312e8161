"""`python -m serving.splitter`: the embedded mode's canary router in front of a stable and a candidate model server,
with an optional shadow that gets copies of live requests and never answers a user.

Every request path is forwarded to one of the two servers; the candidate gets `--percent` of the traffic,
deterministically by request id: the `x-request-id` header when the client sends one (else a new UUID, passed on to
the server), hashed (blake2b) to a bucket 0..99, candidate when the bucket is below the percentage. So a given id
always lands on the same version for a given percentage, and raising the percentage only moves ids from stable to
candidate. Responses carry `x-kubeloop-version`, `x-request-id` and `ce-id`.

Ground truth: each request gets one event id, its `ce-id` (the client's when it sends a usable one, else the request
id), sent to the server it is routed to (and to the shadow), whose payload logger puts it on the request's events.
The splitter remembers which version served the newest `--remember` ids, so `POST /v1/models/NAME:feedback`
(kubeloop/feedback.py) is split by id: each version's server gets the labels of the requests it answered (ids never
seen go to the stable, whose sidecar counts them unknown), the shadow a copy of those it was mirrored. The answer is
202 with the summed counts, or the first refusal of an upstream (its 400 names the field, as the client sent it).

Shadow: `--shadow URL --shadow-version V --shadow-percent P --task T` mirrors the POST inference requests the stable
answers in the top P buckets: after the user's answer is sent, the same request (same ce-id) goes to the shadow in
the background (at most serving.mirror.MAX_IN_FLIGHT at once; more are dropped and counted). Its answers are counted
like any version's and paired with the user's (serving/mirror.py). It also runs without a candidate.

The splitter's own routes: `GET /metrics` (kubeloop_splitter_*, kubeloop_shadow_*), `GET /admin/traffic` and
`POST /admin/traffic` with `{"percent": K}` to change the split at run time (the canary analysis walks its steps
through it), `{"shadowPercent": P}` to change the mirrored share (0: mirror nothing) and `{"promoteShadow": true}`
to make the shadow the candidate (at `percent`, 0 unless given; its mirror stops). It binds 127.0.0.1 by default;
the admin route has no authentication, like the rest of the embedded mode.

For rollback drills, `--candidate-fault-rate R` (`--stable-fault-rate R`, `--shadow-fault-rate R`) answers a random
share R of the POST inference requests routed (or mirrored) to that version with HTTP 500 instead of forwarding
them, counted under the version like any other answer (as a failing pod behind a mesh would be). Off by default.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import logging
import random
import sys
import time
import uuid
from typing import Any, get_args

import orjson
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, exposition

from kubeloop import log as kubeloop_log
from kubeloop.api.modelversion import Task
from kubeloop.asgi import header, lifespan, read_body, respond
from kubeloop.log import event
from serving.metrics import LATENCY_BUCKETS
from serving.mirror import Mirror, ShadowMetrics, check_share
from serving.net import SignalGuard, bind, run, url_of
from serving.payload_logger import event_id
from serving.served_ids import FeedbackPart, ServedIds, split_feedback
from serving.upstream import HOP_BY_HOP, Backend, Pool, UpstreamError

log = logging.getLogger("kubeloop.serving.splitter")

ROUTING = frozenset({b"x-request-id", b"ce-id"})  # set by the splitter, whatever the client or upstream sent
REMEMBER = 500_000  # event ids whose version is kept for feedback routing (~100 bytes each)
JSON = [(b"content-type", b"application/json")]
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body


def bucket(request_id: str) -> int:
    """0..99, stable across processes and runs (unlike Python's salted hash)."""
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100


def is_inference(path: str) -> bool:
    return path.endswith(":predict") or path.endswith("/infer")


def is_feedback(path: str) -> bool:
    return path.startswith("/v1/models/") and path.endswith(":feedback")


class SplitterMetrics:
    def __init__(self, registry: CollectorRegistry | None = REGISTRY):
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.requests = Counter(
            "kubeloop_splitter_requests",
            "Requests routed (and mirrored), by model version and HTTP status.",
            ("version", "code"),
            registry=registry,
        )
        self.latency = Histogram(
            "kubeloop_splitter_request_duration_seconds",
            "Time from request to the upstream's full answer.",
            ("version",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.percent = Gauge(
            "kubeloop_splitter_candidate_percent",
            "Declared share of traffic sent to the candidate.",
            registry=registry,
        )
        self.versions = Gauge(
            "kubeloop_splitter_backend_info",
            "The versions behind the splitter (1 per role).",
            ("role", "version"),
            registry=registry,
        )
        self.feedback = Counter(
            "kubeloop_splitter_feedback_requests",
            "Feedback bodies (or their parts) passed on, by the version that got them and its HTTP status.",
            ("version", "code"),
            registry=registry,
        )
        self.shadow = ShadowMetrics(registry)


class Splitter:
    """A raw ASGI app (no framework on the hot path)."""

    def __init__(
        self,
        stable: Backend,
        candidate: Backend | None,
        percent: int,
        *,
        shadow: Backend | None = None,
        shadow_percent: int = 0,
        task: Task = "binary",
        timeout: float = 30.0,
        max_body_bytes: int = 16 << 20,
        remember: int = REMEMBER,
        metrics: SplitterMetrics | None = None,
    ):
        self.stable, self.candidate = stable, candidate
        self.timeout, self.max_body_bytes = timeout, max_body_bytes
        self.metrics = metrics or SplitterMetrics()
        backends = [b for b in (stable, candidate, shadow) if b is not None]
        if len({b.version for b in backends}) < len(backends):
            raise ValueError("the stable, candidate and shadow versions must differ")
        self.mirror = Mirror(shadow, shadow_percent, task, self.metrics.shadow) if shadow is not None else None
        self.percent = 0
        self.set_percent(percent)
        for role, backend in (("stable", stable), ("candidate", candidate), ("shadow", shadow)):
            if backend is not None:
                self.metrics.versions.labels(role, backend.version).set(1)
        self.served = ServedIds(remember)
        self._backends = {b.version: b for b in backends}
        self._pools = {b.version: Pool(b.url, timeout) for b in backends}
        self._children: dict[tuple[str, int], Any] = {  # the 200s exported from 0: exact increase() from the start
            (b.version, 200): self.metrics.requests.labels(b.version, 200) for b in backends
        }
        self._latency = {b.version: self.metrics.latency.labels(b.version) for b in backends}
        self._faults = random.Random()
        self._background: set[asyncio.Task] = set()  # feedback copies to shadows

    def set_percent(self, percent: Any) -> int:
        percent = check_share("percent", percent)
        if percent and self.candidate is None:
            raise ValueError("percent: no candidate behind this splitter (start it with --candidate)")
        self.percent = percent
        self.metrics.percent.set(percent)
        return percent

    def promote_shadow(self) -> None:
        """The shadow becomes the candidate (at 0% until set_percent); nothing is mirrored any more."""
        if self.mirror is None or self.candidate is not None:
            raise ValueError("promoteShadow: needs a shadow and no candidate behind this splitter")
        shadow = self.mirror.backend
        self.metrics.versions.remove("shadow", shadow.version)
        self.metrics.versions.labels("candidate", shadow.version).set(1)
        self.mirror.set_percent(0)
        self.candidate, self.mirror = shadow, None

    def choose(self, request_id: str) -> Backend:
        if self.candidate is not None and self.percent and bucket(request_id) < self.percent:
            return self.candidate
        return self.stable

    def traffic(self) -> dict:
        out = {"percent": self.percent, "stable": _describe(self.stable)}
        if self.candidate is not None:
            out["candidate"] = _describe(self.candidate)
        if self.mirror is not None:
            out["shadow"] = _describe(self.mirror.backend) | self.mirror.describe()
        return out

    def _injects_fault(self, backend: Backend, method: str, path: str) -> bool:
        return (
            backend.fault_rate > 0
            and method == "POST"
            and is_inference(path)
            and self._faults.random() < backend.fault_rate
        )

    # ---- ASGI
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send, self._close_pools)
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics" and scope["method"] == "GET":
            encoder, content_type = exposition.choose_encoder(header(scope, b"accept"))
            return await respond(send, 200, encoder(self.metrics.registry), content_type.encode())
        if path == "/admin/traffic":
            return await self._admin(scope, receive, send)
        if scope["method"] == "POST" and is_feedback(path):
            return await self._feedback(scope, receive, send)
        await self._forward(scope, receive, send)

    def _close_pools(self) -> None:
        for pool in self._pools.values():
            pool.close()

    async def _admin(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["method"] == "GET":
            return await _json(send, 200, self.traffic())
        if scope["method"] != "POST":
            return await _json(send, 405, {"error": "admin/traffic: use GET or POST"})
        body = await read_body(receive, 4096)
        keys = {"percent", "shadowPercent", "promoteShadow"}
        try:
            request = json.loads(body or b"null")
            if not isinstance(request, dict) or not request or not set(request) <= keys:
                raise ValueError('body: expected {"percent": K}, {"shadowPercent": P} or {"promoteShadow": true}')
            before = self.traffic()
            self._change(request)
        except (ValueError, UnicodeDecodeError) as error:
            return await _json(send, 400, {"error": str(error)})
        event(log, "traffic.changed", before=before, after=self.traffic())
        await _json(send, 200, self.traffic())

    def _change(self, request: dict) -> None:
        """Apply an admin change, all of it or (ValueError) none of it."""
        promote = request.get("promoteShadow")
        if "promoteShadow" in request and promote is not True:
            raise ValueError("promoteShadow: expected true")
        if "shadowPercent" in request and (self.mirror is None or promote):
            raise ValueError("shadowPercent: no shadow behind this splitter (start it with --shadow)")
        shadow_percent = check_share("shadowPercent", request["shadowPercent"]) if "shadowPercent" in request else None
        percent = check_share("percent", request.get("percent", self.percent))
        if promote:
            self.promote_shadow()  # or raises, changing nothing
        self.set_percent(percent)  # raises only without a candidate, before anything changed
        if shadow_percent is not None and self.mirror is not None:
            self.mirror.set_percent(shadow_percent)

    async def _forward(self, scope: dict, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        request_id = header(scope, b"x-request-id") or str(uuid.uuid4())
        ce_id = event_id(header(scope, b"ce-id") or request_id)
        backend = self.choose(request_id)
        method, path = scope["method"], scope["path"]
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP and k not in ROUTING]
        headers += [(b"x-request-id", request_id.encode("latin-1")), (b"ce-id", ce_id.encode())]
        routing = [
            (b"x-kubeloop-version", backend.version.encode()),
            (b"x-request-id", request_id.encode("latin-1")),
            (b"ce-id", ce_id.encode()),
        ]
        body = await read_body(receive, self.max_body_bytes)
        if body is None:
            message = b'{"error": "body: too large for the splitter"}'
            return await self._answer(send, backend, started, (413, JSON, message), routing)
        inference = method == "POST" and is_inference(path)
        mirror = self.mirror if inference and backend is self.stable else None
        if mirror is not None and not mirror.mirrors(bucket(request_id)):
            mirror = None
        if inference:
            self.served.remember(ce_id, backend.version, mirror.version if mirror is not None else None)
        target = _target(scope)
        answer = await self._call(backend, method, target, headers, body)
        await self._answer(send, backend, started, answer, routing)
        if mirror is not None:
            copy = mirror  # the splitter's mirror may change while the copy waits
            copy.submit(lambda: self._mirrored(copy, method, target, headers, body, answer))

    async def _mirrored(
        self, mirror: Mirror, method: str, target: str, headers: list, body: bytes, user: Answer
    ) -> None:
        started = time.perf_counter()
        status, _, answer = await self._call(mirror.backend, method, target, headers, body)
        self._count(mirror.backend, status, started)
        mirror.pair(user[0], user[2], status, answer)

    async def _call(self, backend: Backend, method: str, target: str, headers: list, body: bytes) -> Answer:
        """The upstream's answer, or the splitter's own: 500 for an injected fault, 504 on timeout, 502 when down."""
        if self._injects_fault(backend, method, target.partition("?")[0]):
            message = f"injected fault: the splitter fails {backend.fault_rate:g} of v{backend.version}'s requests"
            return 500, JSON, _error(message)
        try:
            status, upstream_headers, answer = await self._pools[backend.version].send(method, target, headers, body)
        except TimeoutError:
            return 504, JSON, _error(f"upstream v{backend.version}: no answer within {self.timeout:g}s")
        except (OSError, ConnectionError, UpstreamError) as error:
            return 502, JSON, _error(f"upstream v{backend.version} ({backend.url}): {error}")
        kept = [(k, v) for k, v in upstream_headers if k.lower() not in HOP_BY_HOP and k.lower() not in ROUTING]
        return status, kept, answer

    async def _answer(self, send: Any, backend: Backend, started: float, answer: Answer, routing: list) -> None:
        status, headers, body = answer
        headers = [*headers, *routing, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._count(backend, status, started)

    def _count(self, backend: Backend, status: int, started: float) -> None:
        child = self._children.get((backend.version, status))
        if child is None:
            child = self._children[(backend.version, status)] = self.metrics.requests.labels(backend.version, status)
        child.inc()
        self._latency[backend.version].observe(time.perf_counter() - started)

    # ---- feedback
    async def _feedback(self, scope: dict, receive: Any, send: Any) -> None:
        body = await read_body(receive, self.max_body_bytes)
        if body is None:
            return await _json(
                send, 413, {"error": f"body: over {self.max_body_bytes} bytes: send fewer labels a body"}
            )
        target = _target(scope)
        parts = split_feedback(body, self.served, self.stable.version)
        if parts is None:  # not entries with ids: the stable's server says what is wrong
            status, headers, answer = await self._pass_feedback(self.stable, target, body)
            return await respond(send, status, answer, dict(headers).get(b"content-type", b"application/json"))
        by_version, by_shadow = parts
        for version, part in by_shadow.items():
            if version in self._backends:
                task = asyncio.get_running_loop().create_task(
                    self._shadow_feedback(self._backends[version], target, part)
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        versions = list(by_version)
        answers = await asyncio.gather(
            *(self._pass_feedback(self._backends.get(v, self.stable), target, by_version[v].body()) for v in versions)
        )
        accepted = labels = 0
        for version, (status, _, answer) in zip(versions, answers, strict=True):
            if not 200 <= status < 300:
                return await _json(send, status, _refusal(answer, by_version[version]))
            counts = orjson.loads(answer)
            accepted, labels = accepted + counts.get("accepted", 0), labels + counts.get("labels", 0)
        await _json(send, 202, {"accepted": accepted, "labels": labels})

    async def _pass_feedback(self, backend: Backend, target: str, body: bytes) -> Answer:
        answer = await self._call(backend, "POST", target, JSON, body)
        self.metrics.feedback.labels(backend.version, answer[0]).inc()
        return answer

    async def _shadow_feedback(self, backend: Backend, target: str, part: FeedbackPart) -> None:
        status, _, answer = await self._pass_feedback(backend, target, part.body())
        if not 200 <= status < 300:
            message = answer.decode(errors="replace")[:300]
            event(log, "feedback.shadow_refused", level=logging.WARNING, version=backend.version, error=message)


def _refusal(answer: bytes, part: FeedbackPart) -> dict:
    """An upstream's refusal of a feedback part, its field named as in the client's body."""
    try:
        message = str(orjson.loads(answer).get("error", ""))
    except (orjson.JSONDecodeError, AttributeError):
        message = answer.decode(errors="replace")
    return {"error": part.in_client_terms(message)}


def _target(scope: dict) -> str:
    target = scope["raw_path"].decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    return target


def _describe(backend: Backend) -> dict:
    out: dict = {"version": backend.version, "url": backend.url}
    if backend.fault_rate:
        out["faultRate"] = backend.fault_rate
    return out


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def _json(send: Any, status: int, payload: Any) -> None:
    await respond(send, status, json.dumps(payload).encode(), b"application/json")


def _backend(url: str, version: str, fault_rate: float) -> Backend:
    return Backend(str(version).removeprefix("v"), url.rstrip("/"), fault_rate)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.splitter", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--stable", required=True, metavar="URL", help="the stable model server, e.g. http://127.0.0.1:8081")
    p.add_argument("--stable-version", required=True, help="its model version (the x-kubeloop-version it gets)")
    p.add_argument("--candidate", metavar="URL", help="the candidate model server")
    p.add_argument("--candidate-version", help="its model version")
    p.add_argument("--percent", type=int, default=0, help="share of traffic for the candidate, 0..100")
    p.add_argument("--shadow", metavar="URL", help="the shadow model server: gets copies, never answers a user")
    p.add_argument("--shadow-version", help="its model version")
    p.add_argument("--shadow-percent", type=int, default=100, help="share of requests mirrored to it (default 100)")
    p.add_argument("--task", choices=get_args(Task), help="the model's task, to pair answers (with --shadow)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an upstream answer")
    p.add_argument("--remember", type=int, default=REMEMBER, help=f"event ids kept for feedback (default {REMEMBER})")
    for role in ("stable", "candidate", "shadow"):
        p.add_argument(
            f"--{role}-fault-rate",
            type=float,
            default=0.0,
            metavar="R",
            help=f"answer this share (0..1) of the POST inference requests sent to the {role} with HTTP 500",
        )
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parser().parse_args(argv)
    kubeloop_log.setup(args.verbose)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = logging.getLogger("kubeloop").handlers
        logging.getLogger(name).propagate = False
    for role in ("candidate", "shadow"):
        if bool(getattr(args, role)) != bool(getattr(args, f"{role}_version")):
            print(f"error: --{role} and --{role}-version go together", file=sys.stderr)
            return 2
        if getattr(args, f"{role}_fault_rate") and not getattr(args, role):
            print(f"error: --{role}-fault-rate needs --{role}", file=sys.stderr)
            return 2
    if args.shadow and not args.task:
        print("error: --shadow needs --task (binary, multiclass or regression): how to pair answers", file=sys.stderr)
        return 2
    try:
        stable = _backend(args.stable, args.stable_version, args.stable_fault_rate)
        candidate = (
            _backend(args.candidate, args.candidate_version, args.candidate_fault_rate) if args.candidate else None
        )
        shadow = _backend(args.shadow, args.shadow_version, args.shadow_fault_rate) if args.shadow else None
        splitter = Splitter(
            stable,
            candidate,
            args.percent,
            shadow=shadow,
            shadow_percent=args.shadow_percent if shadow else 0,
            task=args.task or "binary",
            timeout=args.timeout,
            remember=args.remember,
        )
        sock = bind(args.host, args.port)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    url = url_of(args.host, sock)
    config = uvicorn.Config(splitter, log_config=None, access_log=False, server_header=False, lifespan="on")
    server = uvicorn.Server(config)
    guard = SignalGuard()
    gc.collect()
    gc.freeze()  # start-up objects out of the collector's reach: no long pauses in full collections

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            guard.serving = True
            shares = f"v{stable.version} {100 - splitter.percent}%"
            if candidate is not None:
                shares += f", v{candidate.version} {splitter.percent}%"
            if shadow is not None:
                shares += f"; v{shadow.version} mirrors {args.shadow_percent}%"
            event(log, "splitter.ready", url=url, percent=splitter.percent)
            print(f"splitting on {url} ({shares})", flush=True)
        await task

    run(serve)
    event(log, "splitter.stopped", url=url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
