"""Error types for problems a user can fix (bad input, bad config, wrong checkpoint).

Every message names the file, key or row at fault and says what to do about it. The CLI prints
these without a traceback; anything else is a bug and keeps its traceback.
"""

__all__ = ["FedpdError", "ConfigError", "CheckpointError", "DataError", "RunFailedError"]


class FedpdError(Exception):
    """Base class of all user-fixable fedpd errors."""


class ConfigError(FedpdError, ValueError):
    """A run-config or node-config key is unknown, missing, mistyped or out of range."""


class CheckpointError(FedpdError, ValueError):
    """A model checkpoint cannot be loaded exactly (missing, unexpected or mis-shaped tensors, bad file)."""


class DataError(FedpdError, ValueError):
    """An input table or image is missing, malformed or inconsistent."""


class RunFailedError(FedpdError, RuntimeError):
    """A run trained nothing (no site update was aggregated): there is no model to report on."""
