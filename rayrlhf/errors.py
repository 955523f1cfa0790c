"""The project's user-facing errors: each carries one readable paragraph that names the culprit."""


class RayRLHFError(Exception):
    """Base of errors caused by the user's input; command lines print the message and exit with status 2."""


class ConfigError(RayRLHFError):
    """A config file or override is wrong: unknown key, wrong type, impossible value, missing file."""


class DataError(RayRLHFError):
    """A data source is wrong: malformed line (file:line), missing field, bad label."""


class ModelSourceError(RayRLHFError):
    """A model spec cannot be loaded: missing folder, unknown package, unreachable hub id."""
