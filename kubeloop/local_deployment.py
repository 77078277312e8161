"""A ModelDeployment on this machine: the same processes a cluster runs, on loopback.

Per version a KServe model server (`serving.server`), one drift sidecar (`monitoring.sidecar`) fed by their
payload loggers, and with a canary the traffic splitter (`serving.splitter`) in front. The cluster runs the
same modules in the InferenceService's predictor pod (server + sidecar) and splits with KServe/Gateway API.
Like the kubelet with a pod's containers, a process that exits is restarted (with back-off, on the same port,
see kubeloop.processes) while the others keep serving; the state file counts the restarts for `kubeloop status`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from kubeloop.api import ModelDeployment
from kubeloop.api.modeldeployment import rejected_versions, version_refusal
from kubeloop.errors import SpecError
from kubeloop.launch import drift_sidecar, model_server, traffic_splitter
from kubeloop.log import event
from kubeloop.processes import ALWAYS, Child, ProcessGroup, RestartPolicy, free_port
from kubeloop.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class Endpoints:
    url: str
    servers: dict[int, str]
    sidecar: str | None
    splitter: str | None


class LocalDeployment:
    def __init__(
        self, deployment: ModelDeployment, registry: Registry | None = None, restart: RestartPolicy | None = ALWAYS
    ) -> None:
        self.deployment = deployment
        self.registry = registry or Registry()
        self.processes = ProcessGroup(restart, on_restart=self._restarted)
        self.state_file: Path | None = None  # $KUBELOOP_HOME/deployments/<name>.json while it runs (kubeloop status)
        self._state_lock = threading.Lock()  # restarts (from the watching threads) and start/stop write the file

    def versions(self) -> list[tuple[int, str]]:
        spec = self.deployment.spec
        pairs = [(spec.version, "default")]
        if spec.canary is not None:
            pairs.append((spec.canary.version, "canary"))
        return pairs

    def admit(self) -> None:
        """Refuse a Rejected version the spec names (SpecError) unless spec.allowRejected, which is warned about."""
        spec, name = self.deployment.spec, self.deployment.metadata.name
        versions = {version: self.registry.get(spec.model, version) for version, _ in self.versions()}
        refusal = version_refusal(spec, versions)
        if refusal is not None:
            raise SpecError(f"ModelDeployment {name}: {refusal}")
        for rejected in rejected_versions(spec, versions):
            event(
                log,
                "deployment.rejected_served",
                level=logging.WARNING,
                name=name,
                field=rejected.field,
                version=rejected.ref,
                reason=rejected.reason,
                because="spec.allowRejected",
            )

    def start(self) -> Endpoints:
        self.admit()
        spec, name = self.deployment.spec, self.deployment.metadata.name
        records = {version: self.registry.record_path(spec.model, version) for version, _ in self.versions()}
        sidecar = None
        if spec.drift.enabled:
            port = free_port()
            sidecar = f"http://127.0.0.1:{port}"
            launch = drift_sidecar(
                [str(path) for path in records.values()],
                default_version=spec.version,
                drift=spec.drift,
                host="127.0.0.1",
                port=port,
            )
            self.processes.start("drift-sidecar", launch.module, launch.args, sidecar + launch.ready_path)
        servers: dict[int, str] = {}
        for version, endpoint in self.versions():
            port = free_port()
            servers[version] = f"http://127.0.0.1:{port}"
            launch = model_server(
                str(records[version]),
                host="127.0.0.1",
                port=port,
                endpoint=endpoint,
                inputs=spec.inputs,
                inference_service=name,
                namespace=self.deployment.metadata.namespace,
                logger_url=f"{sidecar}/" if sidecar else None,
            )
            self.processes.start(f"server-v{version}", launch.module, launch.args, servers[version] + launch.ready_path)
        splitter = None
        if spec.canary is not None:
            port = free_port()
            splitter = f"http://127.0.0.1:{port}"
            launch = traffic_splitter(
                host="127.0.0.1",
                port=port,
                percent=spec.canary.traffic_percent,
                stable=(spec.version, servers[spec.version]),
                candidate=(spec.canary.version, servers[spec.canary.version]),
            )
            self.processes.start("splitter", launch.module, launch.args, splitter + launch.ready_path)
        endpoints = Endpoints(
            url=splitter or servers[spec.version], servers=servers, sidecar=sidecar, splitter=splitter
        )
        from kubeloop.status_view import record_deployment

        with self._state_lock:  # a restart during start is in the file from the start
            self.state_file = record_deployment(self.deployment, endpoints, self.processes.children)
        event(log, "deployment.ready", name=name, model=spec.model, url=endpoints.url, sidecar=sidecar or "off")
        return endpoints

    def _restarted(self, child: Child) -> None:
        from kubeloop.status_view import record_processes

        with self._state_lock:
            if self.state_file is not None:
                record_processes(self.state_file, self.processes.children)

    def stop(self) -> None:
        try:
            with self._state_lock:
                if self.state_file is not None:
                    self.state_file.unlink(missing_ok=True)
                    self.state_file = None
        finally:
            self.processes.stop()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
