"""Start and stop the service: a local Ray instance (or a cluster's address), then the application."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RestuningError
from ..train.finished import open_run
from .config import ServeConfig

APP_NAME = "restuning"
DEMO_RUNS = Path("runs/demo")
_ON_CLUSTER = False  # whether start() joined a Ray cluster (stop() then leaves its other applications alone)


def demo_runs(root: Path = DEMO_RUNS) -> list[str]:
    """The finished runs `restuning demo` left under `root` (those of `--quick` when there are no others)."""
    for folder in (root, root / "quick"):
        found = sorted(str(p.parent.parent) for p in folder.glob("*/final/classes.json"))
        if found:
            return found
    return []


def plan(config: ServeConfig) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """`({backbone: {task: absolute run folder}}, {task: why it is refused})` for the config's runs."""
    groups: dict[str, dict[str, str]] = {}
    refused = {}
    for name, folder in config.named_runs().items():
        try:
            run = open_run(folder)
        except RestuningError as err:
            refused[name] = str(err)
            continue
        groups.setdefault(run.config.backbone, {})[name] = str(Path(folder).resolve())
    return groups, refused


def build(config: ServeConfig, groups: dict[str, dict[str, str]], refused: dict[str, str] | None = None):
    """The Ray Serve application (not started): a gateway over one deployment per backbone."""
    from .app import BackboneServer, Gateway, MetricsStore

    settings = dataclasses.asdict(config)
    metrics = MetricsStore.bind()
    handles = {}
    for i, (backbone, tasks) in enumerate(sorted(groups.items())):
        deployment = BackboneServer.options(name=f"backbone-{i}", num_replicas=config.replicas,
                                            ray_actor_options={"num_cpus": config.replica_cpus},
                                            max_ongoing_requests=4 * config.max_batch_size)
        handles[backbone] = deployment.bind(backbone, tasks, settings, metrics)
    return Gateway.options(max_ongoing_requests=16 * config.max_batch_size).bind(handles, settings, metrics,
                                                                                 refused or {})


def start(config: ServeConfig, route_prefix: str = "/", name: str = APP_NAME) -> dict[str, Any]:
    """Start Ray (a local instance unless `config.address`) and the service, and return what it serves
    (`url`, `backbones`: {backbone: {task: run folder}}, `refused`: {task: why}); it serves until `stop()`."""
    import ray
    from ray import serve

    if not config.runs:
        config = dataclasses.replace(config, runs=demo_runs())
        if not config.runs:
            raise ConfigError(f"serve: no runs given and no finished demo runs in {DEMO_RUNS}; name runs with "
                              "--runs DIR [DIR ...] (or runs: in the YAML), or run `restuning demo` first")
    config = dataclasses.replace(config, task_root=str(config.root))  # the replicas' folder may differ
    groups, refused = plan(config)
    if not groups:
        raise ConfigError("serve: no finished run to serve" + (f"; refused: {refused}" if refused else
                                                                 " (name runs with --runs or runs: in the YAML)"))
    if not ray.is_initialized():
        # Requests and answers are small: a local instance needs little of Ray's shared-memory object store.
        local = {"object_store_memory": 256 * 2**20} if config.address is None else {}
        ray.init(address=config.address, include_dashboard=False, log_to_driver=config.verbose,
                 configure_logging=config.verbose, namespace="restuning", **local)
    serve.start(http_options={"host": config.host, "port": config.port})
    global _ON_CLUSTER
    _ON_CLUSTER = config.address is not None
    gateway = serve.run(build(config, groups, refused), name=name, route_prefix=route_prefix, blocking=False)
    state = gateway.state.remote().result()  # the runs whose checkpoints did not load are refused there
    served = {b: {t: run for t, run in tasks.items() if t in state["tasks"]} for b, tasks in groups.items()}
    return {"url": f"http://{config.host}:{config.port}{route_prefix.rstrip('/')}", "backbones": served,
            "refused": state["refused"]}


def stop() -> None:
    """Shut the service down: on a local Ray instance, Serve and Ray; on a cluster, only this application
    (others may be serving there), then disconnect."""
    import ray
    from ray import serve

    if _ON_CLUSTER:
        serve.delete(APP_NAME)
    else:
        serve.shutdown()
    ray.shutdown()
