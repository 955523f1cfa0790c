"""Fault injection for tests of what a failure leaves behind. RAYRLHF_FAULT=<point>:<round> makes the actor
method named <point> raise during that round; <point>:<round>:kill ends the actor's process there instead,
once per run (a marker in the run dir keeps a restarted actor from dying again); <point>:<round>:nan makes the
data it trains on NaN (a diverged step). Unset (always, outside tests) it does nothing."""
import os
from pathlib import Path

FAULT_VARIABLE = "RAYRLHF_FAULT"


def inject_fault(point: str, round_index: int, run_dir: str = "") -> None:
    fault = os.environ.get(FAULT_VARIABLE, "")
    if fault == f"{point}:{round_index}":
        raise RuntimeError(f"injected fault at {point} in round {round_index} ({FAULT_VARIABLE})")
    if fault == f"{point}:{round_index}:kill":
        marker = Path(run_dir) / ".injected_faults" / f"{point}_{round_index}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            os._exit(1)  # as a killed process: no exception, no clean-up


def poisons_with_nan(point: str, round_index: int) -> bool:
    """Whether RAYRLHF_FAULT asks the method named `point` to train on NaN in this round."""
    return os.environ.get(FAULT_VARIABLE, "") == f"{point}:{round_index}:nan"
