"""The frame the command lines share: help, logging, CONF plus `key.sub=value` overrides, and bad input
reported as one `error: ...` line with exit status 2 (no traceback)."""
import logging
import sys
from typing import Any, Callable, List, Optional

from rayrlhf.config import RunConfig, load_config
from rayrlhf.errors import RayRLHFError


def run_command(doc: str, argv: Optional[List[str]], job: Callable[[RunConfig], None]) -> int:
    return run_command_with(doc, argv, load_config, job)


def run_command_with(doc: str, argv: Optional[List[str]], load: Callable[[str, List[str]], Any],
                     job: Callable[[Any], None]) -> int:
    """`load(CONF, overrides)` then `job(loaded)`; --help prints `doc`; a RayRLHFError is one line, status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        return 0 if argv else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        job(load(argv[0], argv[1:]))
    except RayRLHFError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
