"""Typed errors. Each maps to one CLI exit code and one HTTP status."""


class XbenchError(Exception):
    """Base of every error xbench reports to a user as one line."""


class ConfigError(XbenchError):
    """A bad option, config key or value (CLI exit 2, HTTP 400/422)."""


class ModelError(XbenchError):
    """A model that cannot be resolved or loaded."""


class DataError(XbenchError):
    """A workload file that is missing or malformed."""


class BackendUnavailable(ConfigError):
    """A backend whose extra is not installed, or a device that is not present."""
