"""Every error xbench reports, in two families.

- `XbenchError` and its subclasses are a user's mistakes at the command line or in a config
  (a bad key, a missing file, a model that cannot be loaded): the CLI prints one line and exits 2.
- `ServiceError` is how a rerank request can end: its `ErrorKind` decides the HTTP status in
  one place (`ErrorKind.status`), and each API dialect (serve/apis/) renders it in the shape its
  clients parse. The core raises kinds of it too (`InputTooLong`, `RequestCancelled`), so a
  request fails the same way in process and over HTTP.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from enum import Enum


class XbenchError(Exception):
    """Base of every error xbench reports to a user as one line."""


class ConfigError(XbenchError):
    """A bad option, config key or value (CLI exit 2)."""


class ModelError(XbenchError):
    """A model that cannot be resolved or loaded."""


class DataError(XbenchError):
    """A workload file that is missing or malformed."""


class BackendUnavailable(ConfigError):
    """An optional package that is not installed (a backend's extra, Ray, a sweep launcher), or a
    device that is not present."""


def missing_modules(modules: Iterable[str]) -> list[str]:
    """Those of `modules` (optional dependencies) that are not installed, found without importing them
    (a dotted name imports its parents)."""

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False

    return [m for m in modules if not installed(m)]


def require(feature: str, modules: Iterable[str], install: str) -> None:
    """An optional feature's packages, checked before it starts: one line that names the feature,
    what is missing and the command that installs it, rather than a traceback from deep inside."""
    if missing := missing_modules(modules):
        raise BackendUnavailable(f"{feature} needs {', '.join(missing)}: {install}")


class ErrorKind(Enum):
    """How a request can fail, with its HTTP status (TEI maps its ErrorType the same way)."""

    MALFORMED = ("malformed", 400)  # not JSON, not an object, or a model that is not served
    UNAUTHORIZED = ("unauthorized", 401)
    NOT_FOUND = ("not_found", 404)  # no such route
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405)
    TIMEOUT = ("timeout", 408)  # the body did not arrive within body_timeout_s
    TOO_LARGE = ("too_large", 413)  # too many documents, or a body over the limit
    VALIDATION = ("validation", 422)  # a field of the wrong type or value
    TOO_LONG = ("too_long", 422)  # a pair over max_input_length with truncation off
    OVERLOADED = ("overloaded", 429)
    CANCELLED = ("cancelled", 499)  # the client went away
    INTERNAL = ("internal", 500)  # the backend failed
    UNAVAILABLE = ("unavailable", 503)  # loading, failed to load, a worker died, or shutting down

    @property
    def status(self) -> int:
        return self.value[1]


class ServiceError(Exception):
    """A request's failure: its kind, a message that names the field where one can be named,
    the field itself, and headers the response must carry (Retry-After)."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return self.kind.status


class InputTooLong(ServiceError):
    """Pairs longer than the model's max_length, sent with truncation off."""

    def __init__(self, count: int, max_length: int, param: str | None = None):
        super().__init__(ErrorKind.TOO_LONG, f"{count} input(s) are longer than max_input_length={max_length} tokens "
                         "and truncate is false", param=param)


class RequestCancelled(ServiceError):
    """The client went away; its pairs were dropped before they cost compute."""

    def __init__(self) -> None:
        super().__init__(ErrorKind.CANCELLED, "the request was cancelled")


class NonFiniteScores(ServiceError):
    """A backend returned NaN or infinite logits: never passed on as scores."""

    def __init__(self, count: int, rows: int, engine: str):
        super().__init__(ErrorKind.INTERNAL, f"backend {engine} returned {count} non-finite score(s) in a batch of "
                         f"{rows} pairs; no score of the batch is returned (a model or backend defect, not the input)")
