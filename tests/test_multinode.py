"""A 3-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and two worker nodes, each its own
raylet, stopped through the object that started them). The config pins the rollout workers to the node that
offers `rollout_node` and the learners to the one that offers `learner_node`; the run completes and its
placement.json (Ray's record of each actor's bundle) shows every actor on its role's node."""
import json
import subprocess
import sys

import pytest
from ray.cluster_utils import Cluster

from conftest import ROOT, child_env

pytestmark = pytest.mark.slow
PINNED = "resources.node_resources={rollout: rollout_node, reward: learner_node, ppo: learner_node}"


@pytest.fixture(scope="module")
def three_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    rollout_node = cluster.add_node(num_cpus=2, resources={"rollout_node": 1})
    learner_node = cluster.add_node(num_cpus=2, resources={"learner_node": 1})
    cluster.wait_for_nodes()
    try:
        yield cluster, {"rollout": rollout_node.node_id, "learner": learner_node.node_id, "head": cluster.head_node.node_id}
    finally:
        cluster.shutdown()


def run_on(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayrlhf.run", "conf/tiny.yaml", *args], cwd=ROOT,
                          env={**child_env(), "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=900)


def test_roles_pinned_to_nodes_run_there_and_the_run_completes(three_nodes, tmp_path):
    cluster, node_ids = three_nodes
    run_dir = tmp_path / "run"
    result = run_on(cluster, f"run_dir={run_dir}", "rounds=2", "rollout.engine=hf", "resources.rollout_workers=2",
                    "sft.steps=10", "reward.initial_max_steps=10", "ppo.steps_per_round=4", PINNED)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    placement = json.loads((run_dir / "placement.json").read_text())
    assert [(a["role"], a["index"]) for a in placement] == [("rollout", 0), ("rollout", 1), ("reward", 0), ("ppo", 0)]
    for actor in placement:
        expected = node_ids["rollout"] if actor["role"] == "rollout" else node_ids["learner"]
        assert actor["node_id"] == expected, actor
    assert (run_dir / "rounds.csv").exists()


def test_a_role_pinned_to_a_resource_no_node_offers_is_refused_before_any_actor(three_nodes, tmp_path):
    cluster, _ = three_nodes
    result = run_on(cluster, f"run_dir={tmp_path / 'run'}", "resources.node_resources={ppo: gpu_node}")
    assert result.returncode == 2
    assert "resources.node_resources.ppo='gpu_node'" in result.stderr and "ray start" in result.stderr
    assert not (tmp_path / "run").exists()


def test_spread_places_the_actors_on_several_nodes(three_nodes, tmp_path):
    cluster, _ = three_nodes
    run_dir = tmp_path / "run"
    result = run_on(cluster, f"run_dir={run_dir}", "rounds=1", "rollout.engine=hf", "resources.strategy=STRICT_SPREAD",
                    "resources.rollout_workers=1", "sft.steps=5", "reward.initial_max_steps=5", "ppo.steps_per_round=2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    placement = json.loads((run_dir / "placement.json").read_text())
    assert len({actor["node_id"] for actor in placement}) == 3  # three actors, three nodes, one each


def test_a_run_given_no_ray_address_starts_its_own_instance_beside_a_running_cluster(three_nodes, tmp_path):
    """Only this cluster offers `rollout_node`. A run without RAY_ADDRESS must start its own instance rather than
    join the cluster it finds running on the machine (a bare ray.init() would), so that pin is refused."""
    result = subprocess.run([sys.executable, "-m", "rayrlhf.run", "conf/tiny.yaml", f"run_dir={tmp_path / 'run'}",
                             "resources.node_resources={rollout: rollout_node}"],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert "resources.node_resources.rollout='rollout_node'" in result.stderr
