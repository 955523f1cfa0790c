"""Where log records go: this project's warnings and libraries' errors to the console, every record from INFO
on (DEBUG with log_level=debug) to a file per process under run_dir/logs/.

Actor processes also get an environment (set before the libraries import) that turns the libraries' own
progress bars off and sends vLLM's records through Python's logging instead of its own console handler;
the project's progress bars (Ray's tqdm_ray in actors, tqdm in the driver) stay.
"""
import logging
from pathlib import Path
from typing import Dict

CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARIES_WITH_OWN_HANDLERS = ("DeepSpeed", "vllm", "ray.tune")


def actor_environment(log_level: str) -> Dict[str, str]:
    """Environment variables for actor processes (read by the libraries when they import)."""
    environment = {"VLLM_CONFIGURE_LOGGING": "0"}  # vLLM's records propagate to the handlers set up here
    if log_level == "warning":
        environment["TQDM_DISABLE"] = "1"  # GGUF de-quantizing, weight loading and saving bars, in every actor
    return environment


class ConsoleFilter(logging.Filter):
    """At log_level=warning: this project's warnings, everyone's errors. Otherwise everything at the level."""

    def __init__(self, log_level: str):
        super().__init__()
        self.only_ours = log_level == "warning"

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.only_ours or record.name.startswith("rayrlhf") or record.levelno >= logging.ERROR


def configure_logging(log_file: Path, log_level: str) -> None:
    """Root logger: a console handler (stderr, filtered) and a file handler; libraries' own handlers removed so
    their records reach both. A log folder that cannot be made (e.g. read-only on this node) leaves the file out."""
    import transformers

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if log_level == "debug" else logging.INFO)
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING if log_level == "warning" else root.level)
    console.addFilter(ConsoleFilter(log_level))
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    root.addHandler(console)
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file, encoding="utf-8")
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        root.addHandler(file)
    except OSError as error:
        root.warning("no log file %s (%s): library logs go nowhere", log_file, error)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity(root.level)
    for name in LIBRARIES_WITH_OWN_HANDLERS:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate, library.level = True, logging.NOTSET
    logging.captureWarnings(True)  # warnings.warn (FutureWarning, ...) as records of the py.warnings logger
