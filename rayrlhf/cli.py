"""The frame the command lines share: help, logging, CONF plus `key.sub=value` overrides, and bad input
reported as one `error: ...` line with exit status 2 (no traceback)."""
import logging
import sys
from typing import Callable, List, Optional

from rayrlhf.config import RunConfig, load_config
from rayrlhf.errors import RayRLHFError


def run_command(doc: str, argv: Optional[List[str]], job: Callable[[RunConfig], None]) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        return 0 if argv else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        job(load_config(argv[0], argv[1:]))
    except RayRLHFError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
