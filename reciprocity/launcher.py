"""All Ray plumbing in one place: ray.init, placement groups, actor options.

Rollout workers go in a SPREAD placement group (one bundle per worker: its engine's CPUs/GPU), so
adding nodes adds capacity without code changes; learner ranks go in a PACK group (one bundle per
DeepSpeed rank) so that they sit together on GPU nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import allocator, device
from reciprocity import quiet
from reciprocity.config import Config

WORKER_MAX_RESTARTS = 3
PROGRESS_GROUP = "progress"  # learner ranks: a concurrency group for the driver's progress polls
PLACEMENT_TIMEOUT_S = 120.0

# Environment every actor needs (MLflow URI, vLLM's CPU KV cache, no Ray usage stats); and MKL's
# reproducible mode (`actors.device.reproducible_blas`), which a cluster node's own environment lacks.
PASSED_ENV = ("MLFLOW_TRACKING_URI", "VLLM_CPU_KVCACHE_SPACE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
              "RAY_AUTH_MODE", "VLLM_LOGGING_LEVEL", quiet.LOG_ENV)


def init_ray(address: str | None) -> None:
    """Join a cluster (`address` given, `auto`, or `$RAY_ADDRESS` set as inside `ray job submit`),
    else start a local Ray (the embedded default): no dashboard, and every Ray server (GCS, raylet,
    object manager, workers, agents) listening on 127.0.0.1 only (see `_loopback_only`). The local Ray
    is always a new one (`address="local"`): a bare `ray.init()` joins whatever cluster `ray start`
    left on the machine (/tmp/ray/ray_current_cluster), someone else's included. Inside
    `quiet.library_logs_to` the workers write their logs to the command's log file, not the console."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ} | device.reproducible_blas()
    runtime_env: dict[str, Any] = {"env_vars": env}
    quiet_logs = quiet.log_file() is not None  # the workers' logs go to the command's log file
    if quiet_logs:
        runtime_env["worker_process_setup_hook"] = quiet.SETUP_HOOK
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=not quiet_logs)
    else:
        _loopback_only()
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=not quiet_logs)


def _loopback_only() -> None:
    """Make a local Ray advertise and bind 127.0.0.1. Ray 2.60 gives a local instance the machine's
    network address, and its gRPC servers then listen on every interface (0.0.0.0 / ::): with token
    auth disabled (RAY_AUTH_MODE=disabled, as the Makefile sets) anyone on the network could submit
    code. With a loopback node address they listen on 127.0.0.1 only (tests/test_security.py lists
    the sockets). Ray's switch for that is `ENABLE_RAY_CLUSTER` (env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER,
    read when ray is imported, meant for laptops): set the environment for the processes Ray starts
    and the constant for this one."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _ready(pg: PlacementGroup, what: str) -> PlacementGroup:
    if not pg.wait(PLACEMENT_TIMEOUT_S):
        raise RuntimeError(f"could not place {what} within {PLACEMENT_TIMEOUT_S:.0f}s: "
                           f"cluster resources {ray.cluster_resources()}")
    return pg


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    b = {"CPU": cpus}
    if gpus:
        b["GPU"] = gpus
    return b


@dataclass
class Placement:
    worker_pg: PlacementGroup
    learner_pg: PlacementGroup
    worker_malloc: allocator.Allocator  # resolved once, here: the actors start on it, the report checks it
    learner_malloc: allocator.Allocator

    def remove(self) -> None:
        for pg in (self.worker_pg, self.learner_pg):
            remove_placement_group(pg)

    def worker_options(self, index: int, cfg: Config) -> dict[str, Any]:
        return {
            "num_cpus": cfg.rollout.cpus_per_worker,
            "num_gpus": cfg.rollout.gpus_per_worker,
            "max_restarts": WORKER_MAX_RESTARTS,
            "max_task_retries": 0,  # a lost `run` is re-planned by the driver (game ids stay exact)
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.worker_pg, index),
            **_process_options(self.worker_malloc),
        }

    def learner_options(self, rank: int, cfg: Config) -> dict[str, Any]:
        return {
            "num_cpus": cfg.learner.cpus_per_rank,
            "num_gpus": cfg.learner.gpus_per_rank,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.learner_pg, rank),
            **_process_options(self.learner_malloc),
        }


def _process_options(malloc: allocator.Allocator) -> dict[str, Any]:
    """An actor's options that start its process on `malloc` and with MKL's reproducible mode,
    whoever started Ray (its runtime_env's environment, merged by Ray with the job's: PASSED_ENV
    and the log hook stay)."""
    return {"runtime_env": {"env_vars": allocator.preload_env(malloc) | device.reproducible_blas()}}


def place(cfg: Config) -> Placement:
    workers = placement_group([_bundle(cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker)]
                              * cfg.rollout.workers, strategy="SPREAD", name=f"{cfg.run_name}-rollout")
    learners = placement_group([_bundle(cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank)]
                               * cfg.learner.ranks, strategy="PACK", name=f"{cfg.run_name}-learner")
    return Placement(_ready(workers, "rollout workers"), _ready(learners, "learner ranks"),
                     allocator.resolve(cfg.rollout.allocator, cfg.rollout.gpus_per_worker),
                     allocator.resolve(cfg.learner.allocator, cfg.learner.gpus_per_rank))


class Located:
    """Mixed into actor classes by `actor_class`: where does this actor run?"""

    def node(self) -> dict[str, str]:
        ctx = ray.get_runtime_context()
        return {"ip": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(), "pid": str(os.getpid()),
                "allocator": allocator.loaded(), "mkl_cbwr": os.environ.get("MKL_CBWR", "")}


def actor_class(cls: type, **options: Any) -> Any:
    """`cls` as a Ray actor class that can also tell where it runs (`node()`); `options` are
    `ray.remote`'s (those `.options()` refuses, as concurrency_groups)."""
    return ray.remote(**options)(type(cls.__name__, (cls, Located), {})) if options else ray.remote(
        type(cls.__name__, (cls, Located), {}))


def learner_class(cls: type) -> Any:
    """The learner rank's actor class: its `progress` calls run in their own concurrency group, so
    they answer while `train_step` runs; every other method keeps one thread, in order."""
    return actor_class(cls, concurrency_groups={PROGRESS_GROUP: 1})


def node_of(actor: Any) -> dict[str, str]:
    return ray.get(actor.node.remote())
