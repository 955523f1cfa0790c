"""The project's user-facing errors: each carries one readable paragraph that names the culprit."""
import contextlib


class RayRLHFError(Exception):
    """Base of errors caused by the user's input; command lines print the message and exit with status 2."""


class ConfigError(RayRLHFError):
    """A config file or override is wrong: unknown key, wrong type, impossible value, missing file."""


class DataError(RayRLHFError):
    """A data source is wrong: malformed line (file:line), missing field, bad label."""


class ModelSourceError(RayRLHFError):
    """A model spec cannot be loaded: missing folder, unknown package, unreachable hub id."""


class TrainingDivergedError(RayRLHFError):
    """A training step gave a non-finite loss, or a model about to be saved holds non-finite values (usually too
    high a learning rate); the run stops and the last checkpoint stays the latest."""


class RunDirWriteError(RayRLHFError):
    """The driver could not write a file of the run dir (a full disk, a quota, a read-only mount)."""


@contextlib.contextmanager
def naming_the_file(path):
    """An OSError inside that does not say which file (a write on a full disk) is re-raised naming `path`."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
