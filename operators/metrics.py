"""The operator's Prometheus metrics, in the text exposition format, served from a stdlib HTTP thread.

(The operators extra holds kopf and the Kubernetes client only; a handful of counters does not need more.)
"""

from __future__ import annotations

import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubeloop

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_lock = threading.Lock()
_reconciles: dict[tuple[str, str], int] = defaultdict(int)
_children: dict[tuple[str, str], int] = defaultdict(int)
_seconds_sum: dict[str, float] = defaultdict(float)
_seconds_count: dict[str, int] = defaultdict(int)
_seconds_buckets: dict[tuple[str, float], int] = defaultdict(int)


def reconciled(kind: str, result: str, seconds: float) -> None:
    with _lock:
        _reconciles[(kind, result)] += 1
        _seconds_sum[kind] += seconds
        _seconds_count[kind] += 1
        for bound in BUCKETS:
            if seconds <= bound:
                _seconds_buckets[(kind, bound)] += 1


def child(kind: str, action: str) -> None:
    with _lock:
        _children[(kind, action)] += 1


def render() -> str:
    with _lock:
        lines = [
            "# HELP kubeloop_operator_info The kubeloop operator's version.",
            "# TYPE kubeloop_operator_info gauge",
            f'kubeloop_operator_info{{version="{kubeloop.__version__}"}} 1',
            "# HELP kubeloop_operator_reconcile_total Reconciles of kubeloop resources by outcome.",
            "# TYPE kubeloop_operator_reconcile_total counter",
        ]
        lines += [
            f'kubeloop_operator_reconcile_total{{kind="{k}",result="{r}"}} {n}'
            for (k, r), n in sorted(_reconciles.items())
        ]
        lines += [
            "# HELP kubeloop_operator_children_total Children written, by kind and action (created, updated).",
            "# TYPE kubeloop_operator_children_total counter",
        ]
        lines += [
            f'kubeloop_operator_children_total{{kind="{k}",action="{a}"}} {n}'
            for (k, a), n in sorted(_children.items())
        ]
        lines += [
            "# HELP kubeloop_operator_reconcile_seconds Time spent in one reconcile.",
            "# TYPE kubeloop_operator_reconcile_seconds histogram",
        ]
        for kind in sorted(_seconds_count):
            for bound in BUCKETS:
                lines.append(
                    f'kubeloop_operator_reconcile_seconds_bucket{{kind="{kind}",le="{bound}"}} '
                    f"{_seconds_buckets[(kind, bound)]}"
                )
            lines.append(
                f'kubeloop_operator_reconcile_seconds_bucket{{kind="{kind}",le="+Inf"}} {_seconds_count[kind]}'
            )
            lines.append(f'kubeloop_operator_reconcile_seconds_sum{{kind="{kind}"}} {_seconds_sum[kind]:.6f}')
            lines.append(f'kubeloop_operator_reconcile_seconds_count{{kind="{kind}"}} {_seconds_count[kind]}')
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        body = render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # scrapes are not worth a log line
        pass


def serve(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
