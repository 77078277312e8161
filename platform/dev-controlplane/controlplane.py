"""A real Kubernetes control plane on 127.0.0.1, from binaries that build.sh compiled from Go modules.

etcd + kube-apiserver (RBAC, token auth, service-account tokens) + kube-controller-manager (Deployments ->
ReplicaSets -> Pods, garbage collection, service accounts) + kube-scheduler + kwok (fake nodes whose pods
"run": Pending -> Running, Job pods -> Succeeded, graceful deletes complete). Nothing runs in containers.

    python platform/dev-controlplane/controlplane.py up      # start in the background, print the kubeconfig
    python platform/dev-controlplane/controlplane.py env     # `export KUBECONFIG=...` for a shell
    python platform/dev-controlplane/controlplane.py down    # stop it and remove its directory

From Python (stdlib only; the tests import this file by path)::

    with ControlPlane() as cp:          # builds nothing: call build() first, or run build.sh
        print(cp.kubeconfig)

`up` keeps its state in ${KUBELOOP_CACHE:-~/.cache/kubeloop}/dev-controlplane/ (or --dir).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "helm")
ADMIN_USER = "kubeloop-admin"


def _beside(stem: str) -> ModuleType:
    """A module of this folder, loaded by path: platform/ is no package (it would shadow the stdlib's `platform`)."""
    spec = importlib.util.spec_from_file_location(f"kubeloop_dev_{stem}", HERE / f"{stem}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


components = _beside("components")  # each component's flags and the fake nodes


def versions() -> dict[str, str]:
    """The pinned versions (versions.env), each overridable from the environment like build.sh does."""
    pinned: dict[str, str] = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pinned[key] = os.environ.get(key) or value
    return pinned


def cache_dir() -> Path:
    return Path(os.environ.get("KUBELOOP_CACHE") or Path.home() / ".cache" / "kubeloop")


def bin_dir() -> Path:
    return cache_dir() / f"controlplane-{versions()['K8S_VERSION']}" / "bin"


def is_built(directory: Path | None = None) -> bool:
    directory = directory or bin_dir()
    return all(os.access(directory / name, os.X_OK) for name in BINARIES)


def build(stdout: Any = None) -> Path:
    """Run build.sh (a no-op when everything is cached) and return the bin directory."""
    subprocess.run(["bash", str(HERE / "build.sh")], check=True, stdout=stdout, stderr=subprocess.STDOUT)
    return bin_dir()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class ControlPlaneError(RuntimeError):
    pass


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok as one process group.

    ``workdir`` holds everything (etcd data, certs, keys, token file, logs, kubeconfig); by default a new temp
    dir that stop() removes. ``die_with_parent`` makes the components exit when this Python process dies
    (what a test session wants; the CLI `up` turns it off so the cluster outlives the command).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        binaries: Path | None = None,
        nodes: int = 2,
        die_with_parent: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.binaries = binaries or bin_dir()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kubeloop-controlplane-"))
        self.nodes = nodes
        self.die_with_parent = die_with_parent
        self.log = log or (lambda message: None)
        self.k8s_version = versions()["K8S_VERSION"]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pgid: int | None = None
        self.ports: dict[str, int] = {}
        self.admin_token = ""
        self.kubeconfig = self.workdir / "kubeconfig"
        self.startup_seconds = 0.0

    # --- public ------------------------------------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> ControlPlane:
        if not is_built(self.binaries):
            raise ControlPlaneError(f"control plane binaries missing in {self.binaries}: run {HERE / 'build.sh'}")
        began = time.monotonic()
        deadline = began + timeout
        try:
            self._prepare()
            self._start_etcd(deadline)
            self._start_apiserver(deadline)
            self._write_kubeconfigs()
            pki, kubeconfig = self.workdir / "pki", self.kubeconfig
            self._start(
                "kube-controller-manager", components.controller_manager_args(pki, kubeconfig, self.ports["kcm"])
            )
            self._start("kube-scheduler", components.scheduler_args(pki, kubeconfig, self.ports["scheduler"]))
            self._start("kwok", components.kwok_args(self.workdir, kubeconfig, self.ports["kwok"]))
            self._create_nodes()
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        self.log(f"control plane {self.k8s_version} ready in {self.startup_seconds:.1f}s: {self.server}")
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Stop the components clients-first (kwok, scheduler, controller-manager, apiserver, etcd last, so none
        waits on a store that is gone), SIGKILL whatever outlives ``grace`` seconds, then the whole process group;
        remove a temp workdir."""
        if self.pgid is not None:
            order = [(proc.pid, proc.poll) for proc in reversed(self.procs.values())]
            _stop_in_order(self.pgid, order, grace)
            self.pgid = None
        self.procs.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        """A minimal authenticated API call (stdlib only): returns (HTTP status, decoded JSON or text)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {token or self.admin_token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, context=self._ssl_context(), timeout=10) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def state(self) -> dict[str, Any]:
        return {
            "pgid": self.pgid,
            "pids": {name: proc.pid for name, proc in self.procs.items()},
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "version": self.k8s_version,
        }

    def logs(self, name: str, lines: int = 30) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # --- setup -------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        for sub in ("logs", "pki", "etcd"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "etcd").chmod(0o700)
        self.ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok")}
        self.admin_token = secrets.token_hex(24)
        pki = self.workdir / "pki"
        components.generate_rsa_key_pair(pki / "sa.key", pki / "sa.pub")
        # static tokens: token,user,uid,"group1,group2"
        (pki / "tokens.csv").write_text(f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        (pki / "tokens.csv").chmod(0o600)
        shutil.copyfile(HERE / "kwok-stages.yaml", self.workdir / "kwok.yaml")

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start binary ``name`` of the bin directory in this plane's process group (upstream.py's controllers
        join it too, so stop() stops them first), logging to logs/<name>.log; ``env`` adds variables."""
        log = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        child_env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "ETCDCTL_API")}
        child_env["HOME"] = str(self.workdir)  # kwok and friends keep their dotfiles here, not in the user's home
        child_env.update(env or {})
        proc = subprocess.Popen(
            [str(self.binaries / name), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=child_env,
            process_group=self.pgid or 0,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        log.close()
        if self.pgid is None:
            self.pgid = proc.pid
        self.procs[name] = proc
        self.log(f"started {name} (pid {proc.pid})")
        return proc

    def _start_etcd(self, deadline: float) -> None:
        client, peer = f"http://127.0.0.1:{self.ports['etcd']}", f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._start("etcd", components.etcd_args(self.workdir, client, peer))
        self._wait(deadline, "etcd /health", lambda: _http_ok(f"{client}/health", expect='"health":"true"'))

    def _start_apiserver(self, deadline: float) -> None:
        pki = self.workdir / "pki"
        self._start("kube-apiserver", components.apiserver_args(pki, self.ports["etcd"], self.ports["apiserver"]))
        self._wait(
            deadline,
            "kube-apiserver serving certificate",
            lambda: components.split_ca(pki / "apiserver.crt", pki / "ca.crt"),
        )
        self._wait(deadline, "kube-apiserver /readyz", lambda: self.api("GET", "/readyz")[0] == 200)

    def _write_kubeconfigs(self) -> None:
        ca = base64.b64encode((self.workdir / "pki" / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "kubeloop-dev", "cluster": {"server": self.server, "certificate-authority-data": ca}}
            ],
            "users": [{"name": ADMIN_USER, "user": {"token": self.admin_token}}],
            "contexts": [{"name": "kubeloop-dev", "context": {"cluster": "kubeloop-dev", "user": ADMIN_USER}}],
            "current-context": "kubeloop-dev",
        }
        # JSON is YAML: every kubeconfig reader (kubectl, client-go, the Python client) accepts it.
        self.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.kubeconfig.chmod(0o600)

    def _create_nodes(self) -> None:
        for index in range(self.nodes):
            node = components.kwok_node(index)
            status, body = self.api("POST", "/api/v1/nodes", node)
            if status not in (201, 409):
                raise ControlPlaneError(f"creating node {node['metadata']['name']}: HTTP {status}: {body}")

    def _wait_ready(self, deadline: float) -> None:
        def nodes_ready() -> bool:
            status, body = self.api("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")
            if status != 200:
                return False
            ready = [
                node
                for node in body.get("items", [])
                for condition in node.get("status", {}).get("conditions", [])
                if condition["type"] == "Ready" and condition["status"] == "True"
            ]
            return len(ready) == self.nodes

        self._wait(deadline, "kube-controller-manager /healthz", lambda: _https_ok(self.ports["kcm"]))
        self._wait(deadline, "kube-scheduler /healthz", lambda: _https_ok(self.ports["scheduler"]))
        self._wait(deadline, f"{self.nodes} Ready kwok nodes", nodes_ready)
        # pods can only be admitted once the service-account controller made the namespace's "default" SA
        self._wait(
            deadline,
            "default ServiceAccount",
            lambda: self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
        )

    # --- helpers -----------------------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.workdir / "pki" / "ca.crt"))

    def _wait(self, deadline: float, what: str, check: Callable[[], bool]) -> None:
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with {proc.returncode} while waiting for {what}; its log:\n{self.logs(name)}"
                    )
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                if check():
                    return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {name}\n{self.logs(name, 15)}" for name in self.procs)
                raise ControlPlaneError(f"timed out waiting for {what}\n{tails}")
            time.sleep(0.2)


def _http_ok(url: str, expect: str = "") -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200 and expect in response.read().decode()


def _https_ok(port: int) -> bool:
    """/healthz of a component serving a self-signed certificate (no client auth needed for /healthz)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=2) as response:
        return response.status == 200


def _stop_in_order(pgid: int, procs: list[tuple[int, Callable[[], int | None]]], grace: float) -> None:
    """SIGTERM each (pid, poll) in turn and wait for it (all within ``grace`` seconds), then SIGKILL the group."""
    end = time.monotonic() + grace
    for pid, poll in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        while poll() is None and time.monotonic() < end:
            time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    for _pid, poll in procs:
        while poll() is None and time.monotonic() < end + 5:
            time.sleep(0.05)


# --- CLI ---------------------------------------------------------------------------------------------------
def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "env", "build"))
    parser.add_argument("--dir", type=Path, default=cache_dir() / "dev-controlplane", help="state directory")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    state_file = args.dir / "state.json"

    if args.command == "build":
        build()
        return 0
    if args.command == "env":
        if not state_file.exists():
            print("# no dev control plane is up; run: controlplane.py up", file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={json.loads(state_file.read_text())['kubeconfig']}")
        return 0
    if args.command == "down":
        if state_file.exists():
            state = json.loads(state_file.read_text())
            # not our children (their `up` exited): signal only pids still running in that workdir (no reuse)
            pids = [pid for pid in reversed(list(state["pids"].values())) if _ours(pid, args.dir)]
            order = [(pid, lambda pid=pid: None if _alive(pid) else 0) for pid in pids]
            if order:
                _stop_in_order(int(state["pgid"]), order, grace=15)
            print(f"stopped the control plane (process group {state['pgid']})")
        shutil.rmtree(args.dir, ignore_errors=True)
        return 0

    # up
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if _ours(int(state["pids"]["kube-apiserver"]), args.dir):
            print(f"already up: export KUBECONFIG={state['kubeconfig']}")
            return 0
    shutil.rmtree(args.dir, ignore_errors=True)  # a stale or half-started run: start from a clean folder
    if not is_built():
        print(f"building the control plane into {bin_dir()} (first time only) ...", file=sys.stderr)
        build()
    args.dir.mkdir(parents=True, exist_ok=True)
    cp = ControlPlane(
        workdir=args.dir, nodes=args.nodes, die_with_parent=False, log=lambda m: print(m, file=sys.stderr)
    )
    cp.start()
    state_file.write_text(json.dumps(cp.state(), indent=2) + "\n")
    print(f"export KUBECONFIG={cp.kubeconfig}")
    return 0


def _ours(pid: int, workdir: Path) -> bool:
    """A component `up` started: alive and running in its workdir (a reused pid is someone else's)."""
    try:
        return Path(f"/proc/{pid}/cwd").resolve() == workdir.resolve()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Running (a zombie that no parent reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


if __name__ == "__main__":
    sys.exit(_main())
