"""The layers of docs/architecture.md, checked against the imports the code really makes: a module may import
its own package and the layers below its own, never one above (function-level and type-checking imports too)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rayrlhf"
# Top to bottom, as in docs/architecture.md; a unit is a subpackage or a top-level module of rayrlhf.
LAYERS = [
    {"run", "train_rm", "tune", "eval"},  # command lines
    {"tuning"},  # Ray Tune sweeps: trainables, sweep files, the sweep's report
    {"launch"},  # checks before any actor starts; start, restart from a checkpoint
    {"pipeline"},  # the controller: the round loop
    {"actors"},  # Ray actors and their driver-side groups, placement, weight sync
    {"evaluation"},  # judges, diversity, RMs on preference sets, reports (no Ray)
    {"training"},  # DeepSpeed learners, process groups, weight buckets (no Ray)
    {"models", "engines", "data"},  # building and saving models; the rollout engines; data sources, batches
    {"memory_plan", "checkpoints", "metrics", "plots", "logs", "faults", "cli", "run_dir"},  # run-level utilities
    {"algos", "memory", "seeds"},  # the math as pure functions; memory probes; every random stream's seed
    {"config"},
    {"errors"},
]
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def unit_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imported_units(path: Path):
    """(line, unit) of every rayrlhf module the file imports, wherever the import statement is."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "rayrlhf" and len(parts) > 1:
                yield node.lineno, parts[1]


def modules():
    return sorted(path for path in PACKAGE.rglob("*.py") if unit_of(path) != "__init__")


def test_every_unit_has_a_layer():
    units = {unit_of(path) for path in modules()}
    assert units - LAYER_OF.keys() == set(), "add the new unit to LAYERS here and to docs/architecture.md"


def test_imports_only_go_down_the_layers():
    upward = []
    for path in modules():
        source = unit_of(path)
        for line, target in imported_units(path):
            if target != source and LAYER_OF[target] <= LAYER_OF[source]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({source}) imports {target}")
    assert upward == []


@pytest.mark.parametrize("source,target,allowed", [("pipeline", "actors", True), ("actors", "pipeline", False),
                                                     ("models", "data", False), ("training", "training", True)])
def test_the_rule_itself(source, target, allowed):
    """Down is allowed, up and sideways within a layer are not, the same unit always is."""
    assert (target == source or LAYER_OF[target] > LAYER_OF[source]) is allowed
