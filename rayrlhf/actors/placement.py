"""Where actors go: one placement group holding a bundle per actor, checked against the cluster first,
and groups of ranks that form one torch.distributed group."""
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Dict, Generic, List, Optional, TypeVar

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrlhf.config import ResourcesConfig, RunConfig
from rayrlhf.errors import ConfigError

READY_TIMEOUT_S = 120
ActorT = TypeVar("ActorT")


def connect_ray():
    """Join RAY_ADDRESS's cluster (as under `ray job submit`), else start a local instance without a dashboard.

    The local instance is always a new one (address="local"): a bare ray.init() would join a cluster that
    `ray start` left running on the machine, someone else's included.
    """
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING)
        else:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    return ray


def disconnect_ray() -> None:
    """Stop the Ray that connect_ray() started (or, under `ray job submit`, leave the cluster it joined).

    A command calls this itself, in a `finally`, rather than leaving it to exit handlers: Ray's process reaper,
    finding its parent gone, signals the whole process group, which includes whatever started the command (a CI
    run saw pytest receive that SIGTERM). launch() does not call it: Tune trials share one Ray.
    """
    if ray.is_initialized():
        ray.shutdown()


def actor_count(resources: ResourcesConfig) -> int:
    return resources.rollout_workers + resources.reward_learner_ranks + resources.ppo_ranks


ROLES = ("rollout", "reward", "ppo")  # in bundle order: rollout workers, reward-learner ranks, PPO ranks
NODE_RESOURCE_SHARE = 0.001  # of a role's custom resource, per actor: only where it lives matters


def role_counts(resources: ResourcesConfig) -> dict:
    return {"rollout": resources.rollout_workers, "reward": resources.reward_learner_ranks, "ppo": resources.ppo_ranks}


def bundle(resources: ResourcesConfig, role: str = "") -> dict:
    """What one actor of `role` reserves."""
    gpus = resources.gpus_per_actor if resources.device == "cuda" else 0
    node = resources.node_resources.get(role)
    return {"CPU": resources.cpus_per_actor, **({"GPU": gpus} if gpus else {}), **({node: NODE_RESOURCE_SHARE} if node else {})}


def bundles(resources: ResourcesConfig) -> List[dict]:
    """One bundle per actor, in the order start_actors fills them."""
    return [bundle(resources, role) for role in ROLES for _ in range(role_counts(resources)[role])]


def check_resources(resources: ResourcesConfig, cluster: dict) -> None:
    """ConfigError if the actors' bundles cannot fit the cluster's totals (before any actor starts)."""
    count = actor_count(resources)
    for name, each in bundle(resources).items():
        needed, available = each * count, cluster.get(name, 0)
        if needed > available + 1e-9:
            raise ConfigError(
                f"resources ask for {needed:g} {name} ({count} actors × {each:g}: {resources.rollout_workers} rollout "
                f"workers, {resources.reward_learner_ranks} reward-learner ranks, {resources.ppo_ranks} PPO ranks) but the "
                f"Ray cluster has {available:g}; lower resources.cpus_per_actor / gpus_per_actor or the counts"
            )
    for role, name in resources.node_resources.items():
        if cluster.get(name, 0) < NODE_RESOURCE_SHARE * role_counts(resources)[role]:
            raise ConfigError(
                f"resources.node_resources.{role}={name!r} but no node of the Ray cluster offers the resource "
                f"{name!r}; start the nodes for that role with `ray start --address HEAD --resources '{{\"{name}\": 1}}'`"
            )
    if resources.device == "cuda" and resources.gpus_per_actor == 0:
        raise ConfigError("resources.device='cuda' needs resources.gpus_per_actor > 0")


def reserve(resources: ResourcesConfig) -> PlacementGroup:
    """A placement group (resources.strategy) with one bundle per actor, ready (or a ConfigError naming the wait)."""
    group = placement_group(bundles(resources), strategy=resources.strategy)
    try:
        ray.get(group.ready(), timeout=READY_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise ConfigError(f"the cluster could not place {actor_count(resources)} actors ({bundles(resources)}, "
                          f"strategy {resources.strategy}) within {READY_TIMEOUT_S} s (resources are busy, fragmented "
                          "across nodes, or a role's nodes are too small)") from None
    return group


def where_actors_run(group: PlacementGroup, resources: ResourcesConfig) -> List[dict]:
    """Each actor's role, index and node (Ray's record of where each bundle, so each actor, was placed)."""
    nodes = {node["NodeID"]: node for node in ray.nodes()}
    placed = ray.util.placement_group_table(group)["bundles_to_node_id"]
    roles = [(role, index) for role in ROLES for index in range(role_counts(resources)[role])]
    return [{"role": role, "index": index, "node_id": placed[slot],
             "node_resources": sorted(name for name in nodes[placed[slot]]["Resources"]
                                      if name not in ("CPU", "GPU", "memory", "object_store_memory")
                                      and not name.startswith("node:"))}
            for slot, (role, index) in enumerate(roles)]


def start_actor(actor_class, group: PlacementGroup, bundle_index: int, resources: ResourcesConfig, *args,
                max_restarts: int = 0, environment: Optional[Dict[str, str]] = None) -> Any:
    """Start `actor_class` (a plain class) as a Ray actor in bundle `bundle_index` of `group`, its process given
    `environment`; Ray restarts it in the same bundle up to `max_restarts` times if its process dies."""
    remote = ray.remote(actor_class).options(
        max_restarts=max_restarts,
        runtime_env={"env_vars": environment or {}},
        num_cpus=resources.cpus_per_actor,
        num_gpus=bundle(resources).get("GPU", 0),
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle_index),
    )
    return remote.remote(*args)


def prepare_actor_process(config: RunConfig, name: str) -> None:
    """Per actor process: torch threads (resources.torch_threads, else every core this process may use: the
    phases of a round run one at a time), and logs: the console gets what config.log_level lets through, the
    file run_dir/logs/NAME.log the rest (rayrlhf/logs.py)."""
    import torch

    from rayrlhf.logs import configure_logging

    resources = config.resources
    if resources.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed then skips probing for a GPU (and warning)
    torch.set_num_threads(resources.torch_threads or len(os.sched_getaffinity(0)))
    configure_logging(Path(config.run_dir) / "logs" / f"{name}.log", config.log_level)


class MemoryReporting:
    """Base for every actor: its process's peak memory (rayrlhf/memory.py)."""

    def peak_memory_gb(self) -> float:
        from rayrlhf.memory import peak_memory_gb

        return peak_memory_gb(self.config.resources.device)


class RankActor(MemoryReporting):
    """Base for actors that are one rank of a process group: says where its rank 0 can be reached."""

    def rendezvous_address(self):
        """(ip, free port) on this actor's node; asked of rank 0 only."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port


class RankGroup(Generic[ActorT]):
    """Actors that are ranks 0..N-1 of one group. Subclasses (RewardLearnerGroup, PPOTrainerGroup) give each of the
    actor's methods a typed driver-side twin that runs it on every rank at once: the ranks meet in collectives."""

    def __init__(self, actors: List[ActorT]):
        self.actors = actors  # Ray handles of ActorT actors

    def on_every_rank(self, start: Callable[[ActorT], ray.ObjectRef]) -> List[Any]:
        """Every rank's answer to the remote call `start(rank)` makes. Fails as soon as one rank fails: the others
        may be waiting in a collective for the failed one, and would hang until its timeout."""
        references = [start(actor) for actor in self.actors]
        pending = list(references)
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            ray.get(finished)  # raises now if that rank failed
        return ray.get(references)

    def form_process_group(self) -> None:
        address, port = ray.get(self.actors[0].rendezvous_address.remote())
        self.on_every_rank(lambda rank: rank.join_process_group.remote(address, port))
