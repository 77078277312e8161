"""A ModelDeployment on this machine: the same processes a cluster runs, on loopback.

Per version a KServe model server (`serving.server`), one drift sidecar (`monitoring.sidecar`) fed by their
payload loggers, and with a canary or a shadow the traffic splitter (`serving.splitter`) in front. The cluster runs
the same modules in the InferenceService's predictor pod (server + sidecar) and splits with KServe/Gateway API.
`add_canary` rolls a canary out on a running deployment (the closed loop, `kubeloop.loop`): the candidate's server
with a drift sidecar of its own, and the splitter; `set_canary_percent` moves the split. A shadow (spec.shadow, or
`add_shadow` on a running deployment) is a server with a drift sidecar of its own that the splitter mirrors live
requests to; `promote_shadow` makes it the canary, `remove_shadow` sends it nothing more. The splitter is changed
at run time (its /admin/traffic) and its command line with it, so a restart comes back as it was.
Like the kubelet with a pod's containers, a process that exits is restarted (with back-off, on the same port,
see kubeloop.processes) while the others keep serving; the state file counts the restarts for `kubeloop status`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from kubeloop.api import ModelDeployment
from kubeloop.api.modeldeployment import Canary, Shadow, rejected_versions, version_refusal
from kubeloop.errors import SpecError
from kubeloop.launch import Launch, drift_sidecar, model_server, traffic_splitter
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
    canary_sidecar: str | None = None  # the drift sidecar of a canary added to a running deployment (add_canary)
    shadow_sidecar: str | None = None  # the shadow's drift sidecar (spec.shadow, add_shadow)


class LocalDeployment:
    def __init__(
        self, deployment: ModelDeployment, registry: Registry | None = None, restart: RestartPolicy | None = ALWAYS
    ) -> None:
        self.deployment = deployment
        self.registry = registry or Registry()
        self.processes = ProcessGroup(restart, on_restart=self._restarted)
        self.endpoints: Endpoints | None = None  # once started
        self.state_file: Path | None = None  # $KUBELOOP_HOME/deployments/<name>.json while it runs (kubeloop status)
        self._state_lock = threading.Lock()  # restarts (from the watching threads) and start/stop write the file
        self._splitter_port: int | None = None  # once the splitter runs
        self._fault_rates = {"candidate": 0.0, "shadow": 0.0}  # the splitter's injected faults (rollback drills)

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
        sidecar = self._start_sidecar("drift-sidecar", list(records.values()), spec.version)
        servers = {
            version: self._start_server(version, endpoint, records[version], sidecar)
            for version, endpoint in self.versions()
        }
        shadow_sidecar = None
        if spec.shadow is not None:
            record = self.registry.record_path(spec.model, spec.shadow.version)
            shadow_sidecar, servers[spec.shadow.version] = self._start_shadow(spec.shadow, record)
        splitter = self._start_splitter(servers) if spec.canary is not None or spec.shadow is not None else None
        endpoints = Endpoints(
            url=splitter or servers[spec.version],
            servers=servers,
            sidecar=sidecar,
            splitter=splitter,
            shadow_sidecar=shadow_sidecar,
        )
        self._record(endpoints)
        event(log, "deployment.ready", name=name, model=spec.model, url=endpoints.url, sidecar=sidecar or "off")
        return endpoints

    def add_canary(self, canary: Canary, record: Path | None = None, fault_rate: float = 0.0) -> Endpoints:
        """Roll a canary out on a started deployment that has none: the candidate's model server with a drift
        sidecar of its own (the running one holds only the stable version's reference), and the splitter in front
        sending canary.trafficPercent to it. `record` serves another ModelVersion record of that version than the
        registry's; `fault_rate` makes the splitter fail that share of the candidate's requests (rollback drills)."""
        name, spec = self.deployment.metadata.name, self.deployment.spec
        if self.endpoints is None or self.endpoints.splitter is not None:
            raise SpecError(
                f"ModelDeployment {name}: add_canary needs a started deployment without a canary or a shadow "
                "(start() it first, with spec.canary and spec.shadow unset; a shadow becomes the canary with "
                "promote_shadow)"
            )
        spec.canary = canary
        self.admit()
        record = record or self.registry.record_path(spec.model, canary.version)
        sidecar = self._start_sidecar("drift-sidecar-canary", [record], canary.version)
        servers = self.endpoints.servers | {
            canary.version: self._start_server(canary.version, "canary", record, sidecar)
        }
        self._fault_rates["candidate"] = fault_rate
        splitter = self._start_splitter(servers)
        endpoints = replace(self.endpoints, url=splitter, servers=servers, splitter=splitter, canary_sidecar=sidecar)
        self._record(endpoints)
        event(log, "deployment.canary", name=name, version=canary.version, url=splitter, fault_rate=fault_rate)
        return endpoints

    def set_canary_percent(self, percent: int) -> None:
        """Move the split of a running canary (the splitter's /admin/traffic)."""
        canary, endpoints = self.deployment.spec.canary, self.endpoints
        if canary is None or endpoints is None or endpoints.splitter is None:
            raise SpecError(f"ModelDeployment {self.deployment.metadata.name}: no canary is running")
        self._post_traffic({"percent": percent})
        canary.traffic_percent = percent
        self._rewrite_splitter_command()

    def add_shadow(self, shadow: Shadow, record: Path | None = None, fault_rate: float = 0.0) -> Endpoints:
        """Mirror live traffic to a shadow on a started deployment that has no splitter yet: the shadow's model
        server with a drift sidecar of its own, and the splitter in front mirroring shadow.percent of the stable's
        requests to it. `record` serves another ModelVersion record of that version than the registry's;
        `fault_rate` makes the splitter fail that share of the shadow's requests (drills)."""
        name, spec = self.deployment.metadata.name, self.deployment.spec
        if self.endpoints is None or self.endpoints.splitter is not None:
            raise SpecError(
                f"ModelDeployment {name}: add_shadow needs a started deployment without a canary or a shadow "
                "(start() it first, with spec.canary and spec.shadow unset)"
            )
        spec.shadow = shadow
        record = record or self.registry.record_path(spec.model, shadow.version)
        sidecar, server = self._start_shadow(shadow, record)
        servers = self.endpoints.servers | {shadow.version: server}
        self._fault_rates["shadow"] = fault_rate
        splitter = self._start_splitter(servers)
        endpoints = replace(self.endpoints, url=splitter, servers=servers, splitter=splitter, shadow_sidecar=sidecar)
        self._record(endpoints)
        event(log, "deployment.shadow", name=name, version=shadow.version, percent=shadow.percent, url=splitter)
        return endpoints

    def promote_shadow(self, canary: Canary) -> Endpoints:
        """The shadow becomes the canary (canary.version is the shadow's) at canary.trafficPercent: the splitter
        stops mirroring and routes that share to the shadow's server; its drift sidecar becomes the canary's."""
        spec, endpoints = self.deployment.spec, self.endpoints
        if spec.shadow is None or endpoints is None or spec.canary is not None or canary.version != spec.shadow.version:
            raise SpecError(
                f"ModelDeployment {self.deployment.metadata.name}: promote_shadow needs a running shadow, no canary, "
                f"and the canary's version to be the shadow's (got v{canary.version})"
            )
        self._fault_rates["candidate"], self._fault_rates["shadow"] = self._fault_rates["shadow"], 0.0
        self._post_traffic({"promoteShadow": True, "percent": canary.traffic_percent})
        spec.canary, spec.shadow = canary, None
        self._rewrite_splitter_command()
        endpoints = replace(endpoints, canary_sidecar=endpoints.shadow_sidecar, shadow_sidecar=None)
        self._record(endpoints)
        event(log, "deployment.shadow_promoted", name=self.deployment.metadata.name, version=canary.version)
        return endpoints

    def remove_shadow(self) -> Endpoints:
        """Mirror nothing more to the shadow (a rejected one): spec.shadow unset; its server and drift sidecar idle
        until the deployment stops."""
        shadow, endpoints = self.deployment.spec.shadow, self.endpoints
        if shadow is None or endpoints is None:
            raise SpecError(f"ModelDeployment {self.deployment.metadata.name}: no shadow is running")
        self._fault_rates["shadow"] = 0.0
        self._post_traffic({"shadowPercent": 0})
        self.deployment.spec.shadow = None
        self._rewrite_splitter_command()
        endpoints = replace(endpoints, shadow_sidecar=None)
        self._record(endpoints)
        event(log, "deployment.shadow_removed", name=self.deployment.metadata.name, version=shadow.version)
        return endpoints

    def _post_traffic(self, change: dict) -> None:
        """Change the running splitter (its /admin/traffic)."""
        endpoints = self.endpoints
        if endpoints is None or endpoints.splitter is None:
            raise SpecError(f"ModelDeployment {self.deployment.metadata.name}: no splitter is running")
        httpx.post(f"{endpoints.splitter}/admin/traffic", json=change, timeout=10).raise_for_status()

    def _rewrite_splitter_command(self) -> None:
        """The splitter's command line as the spec is now: a restarted splitter comes back as changed."""
        assert self.endpoints is not None
        launch = self._splitter_launch(self.endpoints.servers)
        self.processes.set_command("splitter", launch.module, launch.args)

    def _start_sidecar(self, name: str, records: list[Path], default_version: int) -> str | None:
        """A drift sidecar watching these records (spec.drift), or None when drift monitoring is off."""
        drift = self.deployment.spec.drift
        if not drift.enabled:
            return None
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        paths = [str(path) for path in records]
        launch = drift_sidecar(paths, default_version=default_version, drift=drift, host="127.0.0.1", port=port)
        self.processes.start(name, launch.module, launch.args, url + launch.ready_path)
        return url

    def _start_server(self, version: int, endpoint: str, record: Path, sidecar: str | None) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        launch = model_server(
            str(record),
            host="127.0.0.1",
            port=port,
            endpoint=endpoint,
            inputs=self.deployment.spec.inputs,
            inference_service=self.deployment.metadata.name,
            namespace=self.deployment.metadata.namespace,
            logger_url=f"{sidecar}/" if sidecar else None,
        )
        self.processes.start(f"server-v{version}", launch.module, launch.args, url + launch.ready_path)
        return url

    def _start_shadow(self, shadow: Shadow, record: Path) -> tuple[str | None, str]:
        """The shadow's drift sidecar (None when drift monitoring is off) and model server."""
        sidecar = self._start_sidecar("drift-sidecar-shadow", [record], shadow.version)
        return sidecar, self._start_server(shadow.version, "canary", record, sidecar)

    def _start_splitter(self, servers: dict[int, str]) -> str:
        self._splitter_port = free_port()
        url = f"http://127.0.0.1:{self._splitter_port}"
        launch = self._splitter_launch(servers)
        self.processes.start("splitter", launch.module, launch.args, url + launch.ready_path)
        return url

    def _splitter_launch(self, servers: dict[int, str]) -> Launch:
        """The splitter's command line for the spec as it is now (canary, shadow) on its port."""
        spec = self.deployment.spec
        assert self._splitter_port is not None
        canary, shadow = spec.canary, spec.shadow
        return traffic_splitter(
            host="127.0.0.1",
            port=self._splitter_port,
            percent=canary.traffic_percent if canary is not None else 0,
            stable=(spec.version, servers[spec.version]),
            candidate=(canary.version, servers[canary.version]) if canary is not None else None,
            candidate_fault_rate=self._fault_rates["candidate"] if canary is not None else 0.0,
            shadow=(shadow.version, servers[shadow.version]) if shadow is not None else None,
            shadow_percent=shadow.percent if shadow is not None else 0,
            shadow_fault_rate=self._fault_rates["shadow"] if shadow is not None else 0.0,
            task=self.registry.get(spec.model, spec.version).spec.signature.task,
        )

    def _record(self, endpoints: Endpoints) -> None:
        """Keep the endpoints and write them to the state file (`kubeloop status`)."""
        from kubeloop.status_view import record_deployment

        self.endpoints = endpoints
        with self._state_lock:  # a restart during start is in the file from the start
            self.state_file = record_deployment(self.deployment, endpoints, self.processes.children)

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
