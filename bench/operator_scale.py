"""Operator scale benchmark (issue 4): N TrainingJobs at once -> how fast does each get its RayJob?

With the operator running (``python -m operators``, started by tests/support/operatorkit.py's ``OperatorProcess``:
the tests' environment, KUBELOOP_RETRY_DELAY=2, and by default the chart's ServiceAccount, see below; but the
chart's KUBELOOP_WORKERS, operators.settings.Settings.workers, rather than the tests' 4: ``--workers N``), apply 100
and then 1,000 TrainingJobs (``manifests/samples/trainingjob.yaml`` renamed tj-0..N-1, each run in a fresh
namespace) from a thread pool, and report:

- p50 / p99 of (RayJob ADDED on a watch of ``ray.io/v1 rayjobs`` in the namespace - TrainingJob create), where
  "create" is the moment the create request was sent (conservative; the p50 measured from the create *response*
  is printed too),
- total: first create sent -> last RayJob ADDED,
- the operator process's peak memory: RSS sampled every 50 ms (psutil) and the kernel's high-water mark VmHWM
  (/proc/<pid>/status) at the end.

Targets (issue 4): p99 <= 1 s at 100; all 1,000 within 60 s; peak RSS <= 300 MB.

The cluster is the dev control plane (platform/dev-controlplane, ``ControlPlane``: etcd, kube-apiserver,
controller-manager, scheduler, kwok), with the generated CRDs of manifests/crds/ and the upstream KubeRay, KServe and
Gateway API CRDs (platform/dev-controlplane/upstream.py) but not their controllers: only the operator is measured,
nothing acts on the RayJobs.
The chart (helm/kubeloop) is installed with helm, its Deployment scaled to 0, and the operator runs with a token of
its ServiceAccount ``kubeloop-system/kubeloop-operator``: every request is authorized by the chart's RBAC, as in
production. ``--admin`` runs it with the admin kubeconfig instead (no chart; RBAC not measured).

    .venv/bin/python -m bench.operator_scale [--sizes 100,1000] [--threads 16] [--admin] [--workers N]

Everything runs on this machine: the control plane, the operator and this client share its cores, so the load
average is printed beside each figure.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from kubeloop import chart  # noqa: E402
from operators.settings import Settings  # noqa: E402
from tests.support.clusterkit import exists, load_controlplane, load_upstream, service_account_kubeconfig  # noqa: E402
from tests.support.operatorkit import OPERATOR_SA, RELEASE, SYSTEM, OperatorProcess  # noqa: E402  (as the tests run it)

GROUP, VERSION = "kubeloop.dev", "v1alpha1"
TARGETS = {"p99_at_100_s": 1.0, "all_1000_within_s": 60.0, "peak_rss_mb": 300.0}

try:
    import psutil
except ImportError:  # pragma: no cover
    psutil = None


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil
    return ordered[rank - 1]


def vm_field(pid: int, field: str) -> float | None:
    """VmHWM / VmRSS of ``pid`` in MB (from /proc), None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Samples the operator's RSS every ``interval`` seconds; ``peak_mb`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_mb = 0.0
        self.stopped = threading.Event()
        self.proc = psutil.Process(pid) if psutil else None

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                rss = self.proc.memory_info().rss / 2**20 if self.proc else vm_field(self.pid, "VmRSS") or 0.0
            except Exception:
                rss = 0.0
            self.peak_mb = max(self.peak_mb, rss)
            self.stopped.wait(self.interval)


def api_client(kubeconfig: Path, pool: int) -> client.ApiClient:
    """An ApiClient whose urllib3 pool holds ``pool`` connections (the default 4 would serialize the creates)."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = pool
    return client.ApiClient(configuration)


def install_crds(api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    paths = sorted((REPO / "manifests/crds").glob("*.yaml")) + load_upstream().crd_files(load_controlplane().bin_dir())
    names = []
    for path in paths:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            names.append(crd["metadata"]["name"])
            try:
                ext.create_custom_resource_definition(crd)
            except ApiException as error:
                if error.status != 409:
                    raise
    deadline = time.monotonic() + 60
    for name in names:
        while not any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(name).status.conditions or []
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {name} not Established after 60 s")
            time.sleep(0.2)
    print(f"CRDs installed and Established: {', '.join(names)}", flush=True)


def install_chart(kubeconfig: Path, api: client.ApiClient, work: Path) -> Path:
    """helm install of helm/kubeloop (its Deployment then scaled to 0); a kubeconfig of the operator's account."""
    helm = chart.find_helm()
    if helm is None:
        raise RuntimeError("no helm binary (the dev control plane build makes one)")
    args = [helm, "--kubeconfig", str(kubeconfig), "upgrade", "--install", RELEASE, str(REPO / "helm/kubeloop")]
    args += ["--namespace", SYSTEM, "--create-namespace", "--wait", "--timeout", "120s"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"helm install: {done.stderr}")
    client.AppsV1Api(api).patch_namespaced_deployment_scale(f"{RELEASE}-operator", SYSTEM, {"spec": {"replicas": 0}})
    return service_account_kubeconfig(kubeconfig, SYSTEM, OPERATOR_SA, work / "operator.kubeconfig", 7200)


def new_namespace(core: client.CoreV1Api, name: str) -> None:
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    deadline = time.monotonic() + 60
    while not exists(lambda: core.read_namespaced_service_account("default", name)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no default ServiceAccount in {name}")
        time.sleep(0.2)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (/proc/<pid>/stat, in clock ticks)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def run_once(
    kubeconfig: Path, namespace: str, n: int, threads: int, timeout: float, pid: int, cpu_pids: dict[str, int]
) -> dict[str, Any]:
    api = api_client(kubeconfig, threads + 4)
    custom = client.CustomObjectsApi(api)
    new_namespace(client.CoreV1Api(api), namespace)
    template = yaml.safe_load((REPO / "manifests/samples/trainingjob.yaml").read_text())

    # the watch, established before the first create (list -> resourceVersion -> watch from there)
    added: dict[str, float] = {}
    all_seen = threading.Event()
    watch_errors: list[str] = []
    listed = custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs")
    rv = listed["metadata"]["resourceVersion"]

    def watcher() -> None:
        nonlocal rv
        w = watch.Watch()
        watch_api = client.CustomObjectsApi(api_client(kubeconfig, 2))
        while not all_seen.is_set():
            try:
                for event in w.stream(
                    watch_api.list_namespaced_custom_object, "ray.io", "v1", namespace, "rayjobs",
                    resource_version=rv, timeout_seconds=int(timeout) + 30, allow_watch_bookmarks=False,
                ):  # fmt: skip
                    now = time.monotonic()
                    obj = event["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] == "ADDED":
                        added.setdefault(obj["metadata"]["name"], now)
                        if len(added) >= n:
                            all_seen.set()
                            w.stop()
                            return
                    if all_seen.is_set():
                        return
            except Exception as error:
                watch_errors.append(repr(error))
                time.sleep(0.5)

    watch_thread = threading.Thread(target=watcher, daemon=True)
    watch_thread.start()

    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    create_errors: list[str] = []

    def create(i: int) -> None:
        doc = copy.deepcopy(template)
        name = f"tj-{i}"
        doc["metadata"] = {"name": name, "namespace": namespace}
        sent[name] = time.monotonic()
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", doc)
        except ApiException as error:
            create_errors.append(f"{name}: {error.status} {error.reason}")
            return
        answered[name] = time.monotonic()

    sampler = RssSampler(pid)
    sampler.start()
    load_before = loadavg()
    cpu_before = cpu_seconds(cpu_pids)
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, range(n)))
    creates_done = time.monotonic() - t0
    all_seen.wait(timeout)
    cpu_after = cpu_seconds(cpu_pids)
    sampler.stopped.set()
    sampler.join()
    load_after = loadavg()

    names = [f"tj-{i}" for i in range(n)]
    latencies = [added[x] - sent[x] for x in names if x in added and x in answered]
    from_response = [added[x] - answered[x] for x in names if x in added and x in answered]
    last = max(added.values()) if added else float("nan")

    # how long until every TrainingJob also carries a status.phase (the operator mirrored the RayJob back)
    phased_at = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs")["items"]
        if sum(1 for it in items if (it.get("status") or {}).get("phase")) >= n:
            phased_at = time.monotonic() - t0
            break
        time.sleep(0.5)
    return {
        "n": n,
        "created": len(answered),
        "rayjobs": len(added),
        "creates_s": creates_done,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": percentile(latencies, 99) if latencies else float("nan"),
        "max": max(latencies) if latencies else float("nan"),
        "p50_from_response": statistics.median(from_response) if from_response else float("nan"),
        "total": last - t0,
        "all_phased": phased_at,
        "peak_rss_sampled": sampler.peak_mb,
        "vmhwm": vm_field(pid, "VmHWM"),
        "load_before": load_before,
        "load_after": load_after,
        # CPU seconds each process spent from the first create to the last RayJob seen: on this machine's cores
        # their sum bounds how fast the burst can be done at all, whatever the operator does
        "cpu_s": {k: round(cpu_after[k] - cpu_before[k], 2) for k in cpu_after if k in cpu_before},
        "create_errors": create_errors,
        "watch_errors": watch_errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for all RayJobs of a run")
    parser.add_argument("--admin", action="store_true", help="run the operator as admin, not the chart's account")
    parser.add_argument("--workers", type=int, default=Settings().workers, help="KUBELOOP_WORKERS (the chart's)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"cores: {os.cpu_count()}  load average (1/5/15 min) at start: {loadavg()}", flush=True)
    controlplane = load_controlplane()
    if not controlplane.is_built():
        print("the dev control plane is not built (platform/dev-controlplane/build.sh)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kubeloop-operator-scale-"))
    plane = controlplane.ControlPlane(die_with_parent=True)
    plane.start()
    print(f"control plane {plane.k8s_version} up in {plane.startup_seconds:.1f}s ({plane.server})", flush=True)
    operator = None
    results = []
    try:
        admin = api_client(plane.kubeconfig, 4)
        install_crds(admin)
        if args.admin:
            identity, operator_kubeconfig = "admin kubeconfig", plane.kubeconfig
        else:
            identity = f"ServiceAccount {SYSTEM}/{OPERATOR_SA}"
            operator_kubeconfig = install_chart(plane.kubeconfig, admin, work)
        operator = OperatorProcess(
            operator_kubeconfig, work / "operator.log", extra_env={"KUBELOOP_WORKERS": str(args.workers)}
        )
        started = time.monotonic()
        operator.start()
        operator.wait_healthy()
        pid = operator.proc.pid
        print(
            f"operator pid {pid} healthy in {time.monotonic() - started:.1f}s ({identity}; "
            f"KUBELOOP_WORKERS={args.workers}; log {operator.log_path}); RSS idle: {vm_field(pid, 'VmRSS'):.0f} MB",
            flush=True,
        )
        cpu_pids = {**{name: proc.pid for name, proc in plane.procs.items()}, "operator": pid, "bench": os.getpid()}
        warm = run_once(plane.kubeconfig, "bench-warmup", 1, 1, 60, pid, cpu_pids)
        print(f"warm-up (1 TrainingJob): RayJob after {warm['p50']:.3f}s", flush=True)
        for n in sizes:
            print(f"\n--- {n} TrainingJobs (namespace bench-{n}, {args.threads} client threads) ...", flush=True)
            result = run_once(plane.kubeconfig, f"bench-{n}", n, args.threads, args.timeout, pid, cpu_pids)
            results.append(result)
            for key, value in result.items():
                if key not in ("create_errors", "watch_errors"):
                    print(f"  {key}: {value}", flush=True)
            for key in ("create_errors", "watch_errors"):
                if result[key]:
                    print(f"  {key} ({len(result[key])}): {result[key][:5]}", flush=True)
            if operator.proc.poll() is not None:
                print(f"the operator exited (rc {operator.proc.returncode}):\n{operator.tail()}", flush=True)
                break
    finally:
        if operator is not None:
            operator.stop()
        plane.stop()

    log = (work / "operator.log").read_text(errors="replace") if (work / "operator.log").exists() else ""
    tracebacks = log.count("Traceback")
    errors = sum(1 for line in log.splitlines() if " ERROR " in line or "[ERROR" in line)
    print(f"\noperator log: {work / 'operator.log'} ({len(log.splitlines())} lines, {tracebacks} tracebacks, "
          f"{errors} ERROR lines)")  # fmt: skip

    fmt = "{:>6} {:>9} {:>8} {:>8} {:>8} {:>10} {:>11} {:>10} {:>10} {:>10}  {}"
    print("\n" + fmt.format("N", "RayJobs", "p50 s", "p99 s", "max s", "total s", "all phase s",
                            "RSS pk MB", "VmHWM MB", "creates s", "load avg before -> after"))  # fmt: skip
    for r in results:
        phased = f"{r['all_phased']:.2f}" if r["all_phased"] is not None else "timeout"
        print(fmt.format(
            r["n"], f"{r['rayjobs']}/{r['n']}", f"{r['p50']:.3f}", f"{r['p99']:.3f}", f"{r['max']:.3f}",
            f"{r['total']:.2f}", phased, f"{r['peak_rss_sampled']:.0f}", f"{r['vmhwm'] or 0:.0f}",
            f"{r['creates_s']:.2f}", f"{r['load_before']} -> {r['load_after']}",
        ))  # fmt: skip
    print(f"\nCPU seconds from the first create to the last RayJob (this machine: {os.cpu_count()} cores)")
    for r in results:
        total = sum(r["cpu_s"].values())
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cpu_s"].items(), key=lambda kv: -kv[1]))
        print(f"  N={r['n']}: {total:.2f} CPU-s = {1000 * total / r['n']:.0f} ms per TrainingJob ({parts}); "
              f"the cores cannot finish that work in less than {total / (os.cpu_count() or 1):.2f}s")  # fmt: skip
    print("\ntargets (issue 4): p99 <= 1 s at 100 | all 1,000 within 60 s | peak RSS <= 300 MB")
    for r in results:
        verdicts = []
        if r["n"] == 100:
            verdicts.append(f"p99 {r['p99']:.3f}s {'PASS' if r['p99'] <= TARGETS['p99_at_100_s'] else 'FAIL'}")
        if r["n"] == 1000:
            ok = r["rayjobs"] == 1000 and r["total"] <= TARGETS["all_1000_within_s"]
            verdicts.append(f"all in {r['total']:.2f}s {'PASS' if ok else 'FAIL'}")
        peak = max(r["peak_rss_sampled"], r["vmhwm"] or 0)
        verdicts.append(f"peak RSS {peak:.0f} MB {'PASS' if peak <= TARGETS['peak_rss_mb'] else 'FAIL'}")
        print(f"  N={r['n']}: " + "; ".join(verdicts))
    print("p50/p99/max: RayJob ADDED (watch) - TrainingJob create request sent; total: first create sent -> last "
          "RayJob ADDED; all phase: first create -> every TrainingJob has status.phase; VmHWM: the operator's "
          "RSS high-water mark since it started (cumulative over runs).")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
