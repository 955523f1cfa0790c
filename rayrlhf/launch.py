"""Launching a run (below the command lines: rayrlhf/run.py and the Tune trials call it): check everything that
can be checked before any actor starts (run dir, data, model sources, rollout engine, resources, memory), start
the actors, run the rounds (rayrlhf/pipeline.py), and restart every actor from the last checkpoint when one dies.
"""
import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from rayrlhf.checkpoints import latest_checkpoint, latest_intact_checkpoint
from rayrlhf.config import RunConfig, save_config
from rayrlhf.errors import ConfigError, ModelSourceError, RayRLHFError, RunDirWriteError
from rayrlhf.logs import configure_logging
from rayrlhf.engines.vllm_engine import choose_engine
from rayrlhf.plots import plot_rounds
from rayrlhf.run_dir import RunDirLock, check_run_dir_writable


def check_models(config: RunConfig) -> Dict[str, Any]:
    """Model sources resolve, local weights are there and whole, and, when the critic starts from the RM, policy
    and RM share a tokenizer. Returns each role's tokenizer."""
    from rayrlhf.data.reward_data import task_tokenizer
    from rayrlhf.models.build import check_weights, load_tokenizer

    tokenizers = {}
    for role in ("policy", "reward_model"):
        try:
            tokenizers[role] = load_tokenizer(getattr(config, role), task_tokenizer(config.data, config.seed))
            check_weights(getattr(config, role))
        except ModelSourceError as error:
            raise ModelSourceError(f"{role}: {error}") from None
    if config.ppo.critic_from_reward_model and tokenizers["policy"].get_vocab() != tokenizers["reward_model"].get_vocab():
        raise ConfigError("ppo.critic_from_reward_model=true needs the policy and the reward model to share a tokenizer "
                          "(the critic reads the policy's tokens); set it false or give both the same tokenizer")
    return tokenizers


def model_shapes(config: RunConfig, tokenizers: Dict) -> Dict[str, Any]:
    """The shapes (sizes, positions) of the policy, the RM and the critic, read from their configs."""
    from rayrlhf.models.build import model_shape

    critic = config.reward_model if config.ppo.critic_from_reward_model else config.policy
    return {"policy": model_shape(config.policy, tokenizers["policy"], causal=True),
            "reward_model": model_shape(config.reward_model, tokenizers["reward_model"], causal=False),
            "critic": model_shape(critic, tokenizers["policy"], causal=False)}


def check_sequence_lengths(config: RunConfig, shapes: Dict[str, Any]) -> None:
    """The longest prompt + response each model reads fits its positions (past them a model fails, or, with
    rotary positions, runs on silently where it was never trained)."""
    data, new_tokens = config.data, config.rollout.max_new_tokens
    longest = data.max_prompt_tokens + max(new_tokens, data.max_response_tokens)
    needs = {"policy": (data.max_prompt_tokens + new_tokens, "data.max_prompt_tokens + rollout.max_new_tokens"),
             "reward_model": (longest, "data.max_prompt_tokens + the longer of rollout.max_new_tokens and "
                                       "data.max_response_tokens"),
             "critic": (data.max_prompt_tokens + new_tokens, "data.max_prompt_tokens + rollout.max_new_tokens")}
    for role, (tokens, what) in needs.items():
        positions = shapes[role].max_positions
        if positions is not None and tokens > positions:
            raise ConfigError(f"{what} = {tokens} tokens, but the {role.replace('_', ' ')} covers {positions} positions "
                              f"(its max_position_embeddings); lower the token limits or use a model with more positions")


def estimate_memory(config: RunConfig, shapes: Dict[str, Any], ray) -> Dict:
    """Each actor's estimated memory (rayrlhf/memory_plan.py), as JSON-able numbers; on CPU (unless
    resources.check_memory is off) a ConfigError when the node peak cannot fit the memory the cluster has."""
    from rayrlhf.memory_plan import check_memory, estimate_actors, node_peak_gb

    estimates = estimate_actors(config, shapes, choose_engine(config.rollout.engine))
    available = available_memory_gb(ray)
    if config.resources.device == "cpu" and config.resources.check_memory:
        check_memory(estimates, available)
    roles = {e.role: {"resident_gb": e.resident, "working_gb": e.working, "peak_gb": e.peak_gb} for e in estimates}
    return {"node_peak_gb": node_peak_gb(estimates), "available_gb": available, "actors": roles}


def available_memory_gb(ray) -> float:
    """This machine's available memory (with Ray already started) for a local instance; on a cluster, what
    Ray found on its nodes (their `memory` and `object_store_memory` resources)."""
    import os

    if not os.environ.get("RAY_ADDRESS"):
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(meminfo["MemAvailable"].split()[0]) / 2**20
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return sum(node.get("memory", 0) + node.get("object_store_memory", 0) for node in nodes) / 2**30


def check_run_dir(config: RunConfig) -> None:
    """Never overwrite a run: an existing checkpoint needs resume=true (or another run_dir); resume needs an
    intact one."""
    run_dir = Path(config.run_dir)
    if config.resume:
        intact, damaged = latest_intact_checkpoint(run_dir)
        if intact is None:
            found = f" ({'; '.join(damaged)})" if damaged else ""
            raise ConfigError(f"resume=true but {run_dir} holds no complete, intact checkpoint{found}")
    elif latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"run_dir {str(run_dir)!r} already holds a run; continue it with resume=true or choose another run_dir")


def start_ray(config: RunConfig):
    """Join RAY_ADDRESS's cluster, else start a local instance; then check the resources against it."""
    from rayrlhf.actors.placement import check_resources, connect_ray

    ray = connect_ray()
    check_resources(config.resources, ray.cluster_resources())
    return ray


def check_reward_method(config: RunConfig) -> None:
    """reward.method bilevel is meta-training of a reward model alone; the Ray loop does not run it (yet)."""
    if config.reward.method == "bilevel":
        raise ConfigError("reward.method='bilevel' (meta-training across domains) runs in `python -m rayrlhf.train_rm` "
                          "and in Tune's reward_model trainable, not in the round loop; meta-test its reward model with "
                          "the loop, frozen: reward_model.source=<its "
                          "reward_model folder> reward.method=vanilla reward.initial_epochs=0 reward.train_each_round=false")


def launch(config: RunConfig, on_round: Optional[Callable[[Dict[str, float]], None]] = None,
        placement=None, first_bundle: int = 0) -> List[Dict[str, float]]:
    """Validate, start the actors, run the rounds; returns the per-round summaries. A Tune trial passes its
    own placement group (the actors take its bundles from first_bundle on) and a per-round callback. The run
    holds run_dir's lock throughout (rayrlhf/run_dir.py): a second run into the same folder is refused."""
    from rayrlhf.pipeline import load_prompt_sets

    check_reward_method(config)
    choose_engine(config.rollout.engine)  # an absent vLLM asked for by name is an error here
    run_dir = Path(config.run_dir)
    check_run_dir_writable(run_dir)
    with RunDirLock(run_dir) as lock:  # held at once where run_dir exists: a run writing it is refused here
        check_run_dir(config)
        prompts = load_prompt_sets(config)
        shapes = model_shapes(config, check_models(config))
        check_sequence_lengths(config, shapes)
        ray = start_ray(config)
        memory = estimate_memory(config, shapes, ray)
        if lock.acquire():  # a new run_dir, made now (nothing is written for a run refused above)
            check_run_dir(config)  # a run that started into it meanwhile may have written a checkpoint
        configure_logging(run_dir / "logs" / "driver.log", config.log_level)
        save_config(config, run_dir / "config.yaml")
        # what the actors were expected to need, beside what they used (metrics: peak_memory_gb_*)
        (run_dir / "memory_estimate.json").write_text(json.dumps(memory, indent=1))
        history = run_with_restarts(config, prompts, ray, on_round, placement, first_bundle)
        write_rounds(history, run_dir / "rounds.csv")
        plot_rounds(history, run_dir / "rounds.png")
    return history


def run_with_restarts(config: RunConfig, prompts, ray, on_round, placement, first_bundle: int) -> List[Dict[str, float]]:
    """Start the actors and run the rounds; when an actor's process dies, start them all again from the last
    checkpoint (up to config.restarts_from_checkpoint times)."""
    from rayrlhf.actors.placement import where_actors_run
    from rayrlhf.pipeline import Pipeline, start_actors

    restarts = 0
    while True:
        actors = start_actors(config, placement, first_bundle)
        (Path(config.run_dir) / "placement.json").write_text(json.dumps(where_actors_run(actors.placement, config.resources), indent=1))
        pipeline = Pipeline(config, actors, prompts)
        try:
            return pipeline.run(on_round)
        except (KeyboardInterrupt, RayRLHFError, OSError, ray.exceptions.RayError) as error:
            where = pipeline.last_checkpoint
            if worth_a_restart(error, where, restarts, config.restarts_from_checkpoint):
                restarts += 1
                print(f"\nan actor died ({type(error).__name__}); restarting every actor from {where} "
                      f"(restart {restarts} of {config.restarts_from_checkpoint})", file=sys.stderr)
                config = config.model_copy(update={"resume": True})
                continue
            print(f"\nstopped; last checkpoint: {where if where else 'none yet'}"
                  + (" (continue with resume=true)" if where else ""), file=sys.stderr)
            if isinstance(error, OSError):  # the driver's own file I/O in the run dir
                raise RunDirWriteError(f"the driver could not write {error.filename or 'a file of the run dir'}: "
                                       f"{error.strerror or error}") from None
            raise
        finally:
            pipeline.close()
            actors.stop()


def worth_a_restart(error: BaseException, checkpoint: Optional[Path], restarts: int, limit: int) -> bool:
    """A dead actor process (a learner rank, or a rollout worker past its own restarts) is worth a restart from the
    checkpoint; an exception raised by our code, Ctrl-C, or an error in an actor's constructor (deterministic: it
    would fail again the same way) is not."""
    from ray.exceptions import RayActorError

    if isinstance(error, RayActorError) and error.actor_init_failed:
        print("\nan actor failed in its constructor; not restarting, since it would fail the same way again", file=sys.stderr)
        return False
    return isinstance(error, RayActorError) and checkpoint is not None and restarts < limit


def write_rounds(history: List[Dict[str, float]], path: Path) -> None:
    names = list(dict.fromkeys(name for summary in history for name in summary))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(history)
