"""Whether two run directories logged the same metrics: every metrics.jsonl record, in order, with what the
machine measured left out (times, speeds, peak memory, and the `checkpoint` records, which hold a time only).

    .venv/bin/python benchmarks/compare_runs.py RUN_DIR_A RUN_DIR_B

Exits 0 when every other value is equal (exactly: the same seed on the same machine and stack repeats a run
bit for bit), else 1, printing the first differences. Standard library only.
"""
import json
import sys
from pathlib import Path
from typing import Dict, List

MEASURED_SUFFIXES = ("_seconds", "_per_second")


def comparable_records(run_dir: Path) -> List[Dict]:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["phase"] != "checkpoint":
            records.append({name: value for name, value in record.items()
                            if not name.endswith(MEASURED_SUFFIXES) and not name.startswith("peak_memory_gb")})
    return records


def differences(first: List[Dict], second: List[Dict]) -> List[str]:
    found = [f"{len(first)} records against {len(second)}"] if len(first) != len(second) else []
    for index, (a, b) in enumerate(zip(first, second)):
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                found.append(f"record {index} ({a.get('phase')} {a.get('step')}): {name} {a.get(name)!r} != {b.get(name)!r}")
    return found


def main() -> int:
    first, second = (comparable_records(Path(folder)) for folder in sys.argv[1:3])
    found = differences(first, second)
    print(f"{len(first)} and {len(second)} records; {len(found)} differences")
    print("\n".join(found[:20]))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
