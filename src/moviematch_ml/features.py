"""The six features: the one definition used by training, evaluation, serving, the fallback and drift."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, cast

import numpy as np
import numpy.typing as npt

from moviematch_ml.errors import FieldError

Kind = Literal["count", "flag", "number"]


@dataclass(frozen=True, slots=True)
class Feature:
    """One model input: its JSON name, type, valid range and where the app takes it from."""

    name: str
    kind: Kind
    minimum: float
    maximum: float
    description: str
    tmdb: str
    example: float

    @property
    def rule(self) -> str:
        """The validation rule in words, as returned in 422 responses and shown in the docs."""
        if self.kind == "flag":
            return "must be 0, 1, true or false"
        if self.kind == "count":
            return f"must be an integer between {_fmt(self.minimum)} and {_fmt(self.maximum)}"
        return f"must be a finite number between {_fmt(self.minimum)} and {_fmt(self.maximum)}"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


FEATURES: Final[tuple[Feature, ...]] = (
    Feature(
        "n_shared_genres",
        "count",
        0,
        30,
        "How many of the movie's genres are among the user's favourite genres.",
        "len(set(movie.genre_ids) & set(user_favourite_genre_ids))",
        2,
    ),
    Feature(
        "vote_average",
        "number",
        0.0,
        10.0,
        "The movie's average crowd rating on a 0-10 scale.",
        "movie.vote_average",
        7.5,
    ),
    Feature(
        "vote_count",
        "count",
        0,
        1e9,
        "How many crowd votes the average is made of.",
        "movie.vote_count",
        1000,
    ),
    Feature(
        "is_favorite_genre",
        "flag",
        0,
        1,
        "1 if the movie has the user's single favourite genre, else 0.",
        "int(user_top_genre_id in movie.genre_ids)",
        1,
    ),
    Feature(
        "years_since_release",
        "number",
        0.0,
        150.0,
        "Years between the movie's release and now (0 for unreleased or this year's films).",
        "max(0, today.year - int(movie.release_date[:4]))",
        3,
    ),
    Feature(
        "popularity",
        "number",
        0.0,
        1e6,
        "TMDB's popularity score (recent views, votes and favourites; unbounded, usually 0-1000).",
        "movie.popularity",
        50.0,
    ),
)

FEATURE_NAMES: Final[tuple[str, ...]] = tuple(f.name for f in FEATURES)
N_FEATURES: Final[int] = len(FEATURES)
EXAMPLE: Final[dict[str, float | int]] = {
    f.name: (int(f.example) if f.kind != "number" else f.example) for f in FEATURES
}

# Identifiers (user_id, movie_id) are opaque keys: integers or short strings. They are never model inputs, only
# keys for A/B assignment, feedback and per-user state, so the rule is about safety, not meaning.
MAX_ID_LENGTH: Final[int] = 128
ID_RULE: Final[str] = f"must be a non-negative integer or a string of 1-{MAX_ID_LENGTH} printable characters"


def parse_value(feature: Feature, value: object, loc: str) -> float:
    """Check one JSON value against its feature's rule and return it as a float.

    Written by hand rather than through a pydantic model so that the batch path validates a thousand rows without
    building a Python object per field; the pydantic schemas in the API only describe the same rules for OpenAPI.
    """
    # bool is a subclass of int in Python: only the flag accepts it.
    if isinstance(value, bool):
        if feature.kind == "flag":
            return 1.0 if value else 0.0
        raise FieldError(loc, feature.rule, value)
    if type(value) is int:
        x = float(value)
    elif type(value) is float:
        x = value
        if not math.isfinite(x):
            raise FieldError(loc, feature.rule, value)
        if feature.kind != "number" and not x.is_integer():
            raise FieldError(loc, feature.rule, value)
    else:
        raise FieldError(loc, feature.rule, value)
    if feature.kind == "flag":
        if x != 0.0 and x != 1.0:
            raise FieldError(loc, feature.rule, value)
    elif not (feature.minimum <= x <= feature.maximum):
        raise FieldError(loc, feature.rule, value)
    return x


def parse_id(value: object, loc: str) -> str | int:
    """Validate a user or movie identifier; integers stay integers so responses echo what was sent."""
    if type(value) is int:
        if value < 0 or value > 2**63 - 1:
            raise FieldError(loc, ID_RULE, value)
        return value
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable():
        return value
    raise FieldError(loc, ID_RULE, value)


def row_from_mapping(
    obj: object, loc: str, out: npt.NDArray[np.float64], allowed_extra: frozenset[str] = frozenset()
) -> None:
    """Validate one JSON object holding the six features and write them into ``out`` (a row of the matrix).

    Unknown fields are refused (422 "unknown field"): a misspelt optional name would otherwise be silently
    ignored, and the backend would never learn that the service did not see what it meant to send.
    """
    if not isinstance(obj, dict):
        raise FieldError(loc or "body", "must be a JSON object", obj)
    prefix = f"{loc}." if loc else ""
    for i, feature in enumerate(FEATURES):
        try:
            value = obj[feature.name]
        except KeyError:
            raise FieldError(prefix + feature.name, "is required", None) from None
        out[i] = parse_value(feature, value, prefix + feature.name)
    if len(obj) > N_FEATURES:
        for key in obj:
            if key not in _NAME_SET and key not in allowed_extra:
                raise FieldError(prefix + str(key), "unknown field", obj[key])


_NAME_SET: Final[frozenset[str]] = frozenset(FEATURE_NAMES)
_NUMERIC_TYPES: Final[frozenset[type]] = frozenset({int, float})
_FLAG_TYPES: Final[frozenset[type]] = frozenset({int, float, bool})
_MAX_INT_ID: Final[int] = 2**63 - 1


def matrix_from_mappings(objs: list[object], id_key: str) -> tuple[npt.NDArray[np.float64], list[str | int]] | None:
    """The feature matrix and the ids of many rows at once, or None if any row breaks any rule.

    The batch fast path: values are pulled column by column with list comprehensions and checked with a few
    vectorised numpy operations, instead of one ``parse_value`` call per field. It accepts exactly what
    ``row_from_mapping`` + ``parse_id`` accept (each row: a dict holding the six features and ``id_key``, nothing
    else); on None the caller runs the per-row loop, which finds the first broken rule and raises its exact error.
    """
    n = len(objs)
    # Every row a dict of exactly seven keys; with the seven names all present (below), no key is unknown.
    if set(map(type, objs)) != {dict}:
        return None
    dicts = cast(list[dict[str, object]], objs)
    if set(map(len, dicts)) != {N_FEATURES + 1}:
        return None
    try:
        rows = list(map(operator.itemgetter(*FEATURE_NAMES, id_key), dicts))
    except KeyError:
        return None
    *columns, ids = zip(*rows, strict=True)
    x = np.empty((n, N_FEATURES), dtype=np.float64)
    for j, (feature, column) in enumerate(zip(FEATURES, columns, strict=True)):
        # bool is a subclass of int, but type() tells them apart: only the flag accepts it.
        allowed = _FLAG_TYPES if feature.kind == "flag" else _NUMERIC_TYPES
        if not set(map(type, column)) <= allowed:
            return None
        try:
            values = np.fromiter(column, dtype=np.float64, count=n)
        except OverflowError:  # an integer too big for a float: certainly out of range
            return None
        if feature.kind == "flag":
            ok = bool(((values == 0.0) | (values == 1.0)).all())
        else:
            # NaN fails both comparisons; orjson never yields NaN or infinities, but the rule refuses them anyway.
            ok = bool(((values >= feature.minimum) & (values <= feature.maximum)).all())
            if ok and feature.kind == "count":
                ok = bool((np.floor(values) == values).all())
        if not ok:
            return None
        x[:, j] = values
    id_types = set(map(type, ids))
    if id_types == {int}:
        int_ids = cast(tuple[int, ...], ids)  # checked just above
        if min(int_ids) < 0 or max(int_ids) > _MAX_INT_ID:
            return None
        return x, list[str | int](int_ids)
    if not id_types <= {int, str}:
        return None
    try:
        return x, [parse_id(i, "") for i in ids]
    except FieldError:
        return None


def as_matrix(rows: Sequence[Mapping[str, float]]) -> npt.NDArray[np.float64]:
    """Stack already-valid feature mappings into the (n, 6) float64 matrix the models take, in FEATURES order."""
    return np.array([[float(r[name]) for name in FEATURE_NAMES] for r in rows], dtype=np.float64).reshape(
        len(rows), N_FEATURES
    )
