"""Fault injection for tests of what a failure leaves behind: RAYRLHF_FAULT=<point>:<round> makes the
actor method named <point> raise during that round. Unset (always, outside tests) it does nothing."""
import os

FAULT_VARIABLE = "RAYRLHF_FAULT"


def inject_fault(point: str, round_index: int) -> None:
    if os.environ.get(FAULT_VARIABLE) == f"{point}:{round_index}":
        raise RuntimeError(f"injected fault at {point} in round {round_index} ({FAULT_VARIABLE})")
