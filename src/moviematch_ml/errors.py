"""The project's exceptions: one base class and a small tree, mapped to HTTP in ``api/handlers.py``.

MovieMatchError
├── InputError ............ a request the service refuses (HTTP 4xx)
│   ├── FieldError ........ one field broke one rule (HTTP 422)
│   ├── InvalidJSONError .. the body is not JSON (HTTP 400)
│   ├── BodyTooLargeError . the body is over MAX_BODY_BYTES (HTTP 413)
│   └── UnsupportedMediaTypeError  the body says it is not JSON (HTTP 415)
├── ModelError ............ the model could not be loaded; the service falls back
│   ├── ModelNotFoundError
│   ├── ModelChecksumError
│   ├── ModelFormatError
│   └── ModelTermsError ... its training data's terms forbid serving it here
├── DataError ............. a training data file is malformed (file, line, column)
├── StoreError ............ the feedback store could not read or write
├── ReportError ........... ab-report has nothing to compare (no log, no joined rating, one variant)
└── ConfigError ........... a setting is invalid
    └── MissingExtraError . a setting needs a driver whose extra is not installed
"""

from __future__ import annotations

import importlib.util
import reprlib
from typing import Any, Final

# The error code (the ``error`` of the JSON body) of each HTTP status, for errors that do not name their own.
CODE_BY_STATUS: Final[dict[int, str]] = {
    400: "invalid_json",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "not_ready",
}


class MovieMatchError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(MovieMatchError):
    """A request the service refuses; ``status`` is its HTTP status and ``code`` the error code of the body."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    @property
    def error_code(self) -> str:
        """The ``error`` of the answer's JSON body: the error's own code, else its status's."""
        return self.code or CODE_BY_STATUS.get(self.status, "bad_request")


class _Missing:
    """The value of a field that was not sent at all (as opposed to one sent as null)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final[Any] = _Missing()


class FieldError(InputError):
    """One field of a request broke one rule: carries the field's location, the rule and the offending value
    (``MISSING`` when the field was not sent: the message then shows no value)."""

    status = 422

    def __init__(self, loc: str, rule: str, value: Any = MISSING) -> None:
        self.loc = loc
        self.rule = rule
        self.value = value
        super().__init__(f"{loc}: {rule}" if value is MISSING else f"{loc}: {rule} (got {_short(value)})")


class _BoundedRepr(reprlib.Repr):
    """``repr`` bounded in depth and size (a value nested a thousand levels deep costs no recursion error), with
    dicts in their own order, as ``repr`` writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 12
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 100
        self.maxstring = self.maxother = 400

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        pieces = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in list(x.items())[: self.maxdict]]
        return "{" + ", ".join(pieces) + (", ..." if len(x) > self.maxdict else "") + "}"


_REPR = _BoundedRepr()


def _short(value: Any) -> str:
    # reprlib: bounded in depth and length, so a value nested a thousand levels deep costs no recursion error.
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class InvalidJSONError(InputError):
    """The request body is not JSON (or holds numbers JSON cannot carry, like NaN or 1e999)."""

    code = "invalid_json"
    status = 400


class BodyTooLargeError(InputError):
    """The request body is larger than ``MAX_BODY_BYTES``."""

    code = "body_too_large"
    status = 413


class UnsupportedMediaTypeError(InputError):
    """The request says its body is something other than JSON."""

    code = "unsupported_media_type"
    status = 415


class ModelError(MovieMatchError):
    """The model could not be loaded; the service answers with the fallback rule instead."""


class ModelNotFoundError(ModelError):
    """No model card or model file at the configured path."""


class ModelChecksumError(ModelError):
    """The model file's sha256 does not match the one in its model card."""


class ModelFormatError(ModelError):
    """The model card or model file is not in a format this version reads."""


class ModelTermsError(ModelError):
    """The model was trained on data whose terms forbid commercial use, and SERVE_NONCOMMERCIAL_MODELS is false."""


class RegistryError(MovieMatchError):
    """A model registry operation was refused (an unknown version, a broken model, an invalid weight...)."""


class DataError(MovieMatchError):
    """A training data file is malformed; the message names the file, line and column."""

    def __init__(self, path: str, message: str, *, line: int | None = None, column: str | None = None) -> None:
        self.path = path
        self.line = line
        self.column = column
        where = path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


class StoreError(MovieMatchError):
    """The feedback store could not read or write."""


class ReportError(MovieMatchError):
    """``ab-report`` has nothing to compare: no prediction log, no rating joined to it, or one variant only."""


class ConfigError(MovieMatchError):
    """A setting is invalid."""


class MissingExtraError(ConfigError):
    """A setting needs an optional dependency that is not installed; the message names the extra that brings it."""

    def __init__(self, setting: str, extra: str, module: str) -> None:
        self.setting = setting
        self.extra = extra
        self.module = module
        super().__init__(
            f"{setting} needs {module}, which is not installed: pip install 'moviematch-ml[{extra}]' "
            f"(the Docker image has it)"
        )

    @classmethod
    def require(cls, module: str, *, extra: str, setting: str) -> None:
        """Raise unless ``module`` can be imported (looked up, not imported: no import cost)."""
        if importlib.util.find_spec(module) is None:
            raise cls(setting, extra, module)
