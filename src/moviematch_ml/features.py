"""The six features and the identifiers: each rule defined once, with every form a validator needs derived from it.

A feature's rule depends on its kind:

    flag    0 or 1, as an integer, an integral float or a JSON boolean
    count   an integer (or an integral float) between minimum and maximum
    number  a finite number between minimum and maximum

``Feature`` states that rule once and gives it in each form the service uses: ``parse`` (one JSON value, with
the exact error), ``column_ok`` (a whole column of a batch at once), ``msgspec_type`` (the typed batch decoder),
``annotation`` (the pydantic type behind the OpenAPI schema) and ``rule`` (the words of the 422 answers). A
property test (tests/test_features.py) drives all of them with the same values and checks that they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec
import numpy as np
import numpy.typing as npt
from pydantic import BeforeValidator, Field, Strict, StringConstraints

from moviematch_ml.errors import FieldError

Kind = Literal["count", "flag", "number"]

_NUMERIC_TYPES: Final[frozenset[type]] = frozenset({int, float})
_FLAG_TYPES: Final[frozenset[type]] = frozenset({int, float, bool})


@dataclass(frozen=True, slots=True)
class Feature:
    """One model input: its JSON name, kind, valid range and where the app takes it from."""

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

    def parse(self, value: object, loc: str) -> float:
        """Check one JSON value against the rule and return it as a float; FieldError(loc, rule, value) if not.

        Written by hand rather than through a pydantic model so that a batch is validated without building a
        Python object per field.
        """
        # bool is a subclass of int in Python: only the flag accepts it.
        if isinstance(value, bool):
            if self.kind == "flag":
                return 1.0 if value else 0.0
            raise FieldError(loc, self.rule, value)
        if type(value) is int:
            x = float(value)
        elif type(value) is float:
            x = value
            if not math.isfinite(x) or (self.kind != "number" and not x.is_integer()):
                raise FieldError(loc, self.rule, value)
        else:
            raise FieldError(loc, self.rule, value)
        if self.kind == "flag":
            if x != 0.0 and x != 1.0:
                raise FieldError(loc, self.rule, value)
        elif not (self.minimum <= x <= self.maximum):
            raise FieldError(loc, self.rule, value)
        return x

    @property
    def json_types(self) -> frozenset[type]:
        """The Python types a decoded JSON value of this feature may have (before the value checks)."""
        return _FLAG_TYPES if self.kind == "flag" else _NUMERIC_TYPES

    def column_ok(self, values: npt.NDArray[np.float64]) -> bool:
        """Whether every value of a column (already of ``json_types``, as float64) keeps the rule."""
        if self.kind == "flag":
            return bool(((values == 0.0) | (values == 1.0)).all())
        # NaN fails both comparisons; orjson never yields NaN or infinities, but the rule refuses them anyway.
        if not bool(((values >= self.minimum) & (values <= self.maximum)).all()):
            return False
        return self.kind != "count" or bool((np.floor(values) == values).all())

    def check_json_type(self, value: object) -> object:
        """``value`` unchanged when its type is one of ``json_types``, else ValueError: the type half of the rule, for
        pydantic (``annotation``), whose lax mode would take ``"2"`` for 2 and ``true`` for 1, and whose strict mode
        would refuse ``2.0`` for a count, which the rule accepts. Not shown in the JSON schema."""
        if type(value) not in self.json_types:
            raise ValueError(self.rule)
        return value

    def msgspec_type(self) -> Any:
        """The type msgspec's typed decoder checks: the same rule, but stricter on integral floats (a count sent
        as ``2.0`` or a flag as ``1.0`` is refused there, and then accepted by ``parse`` on the slow path)."""
        if self.kind == "flag":
            return bool | Literal[0, 1]
        if self.kind == "count":
            return Annotated[int, msgspec.Meta(ge=int(self.minimum), le=int(self.maximum))]
        return Annotated[float, msgspec.Meta(ge=self.minimum, le=self.maximum)]

    def annotation(self) -> Any:
        """The pydantic type of the OpenAPI schema (with the description and example); it accepts what ``parse``
        accepts, JSON types included (``check_json_type``)."""
        description = f"{self.description} Rule: {self.rule}. From TMDB: `{self.tmdb}`."
        json_type = BeforeValidator(self.check_json_type)
        if self.kind == "flag":
            flag = Field(description=description, examples=[int(self.example)])
            return Annotated[Literal[0, 1] | bool, flag, json_type]
        if self.kind == "count":
            bounds = Field(
                ge=int(self.minimum), le=int(self.maximum), description=description, examples=[int(self.example)]
            )
            return Annotated[int, bounds, json_type]
        bounds = Field(
            ge=self.minimum, le=self.maximum, allow_inf_nan=False, description=description, examples=[self.example]
        )
        return Annotated[float, bounds, json_type]


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


def example_matrix() -> npt.NDArray[np.float64]:
    """EXAMPLE as a (1, 6) matrix: the canned request every model must answer before it serves."""
    return np.array([[float(EXAMPLE[name]) for name in FEATURE_NAMES]], dtype=np.float64)


# --- identifiers ---------------------------------------------------------------------------------------------------

# Identifiers (user_id, movie_id) are opaque keys: integers or short strings. They are never model inputs, only
# keys for A/B assignment, feedback and per-user state, so the rule is about safety, not meaning.
MAX_ID_LENGTH: Final[int] = 128
MAX_INT_ID: Final[int] = 2**63 - 1
ID_RULE: Final[str] = f"must be a non-negative integer or a string of 1-{MAX_ID_LENGTH} printable characters"


def parse_id(value: object, loc: str) -> str | int:
    """Validate a user or movie identifier; integers stay integers so responses echo what was sent."""
    if type(value) is int:
        if value < 0 or value > MAX_INT_ID:
            raise FieldError(loc, ID_RULE, value)
        return value
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable():
        return value
    raise FieldError(loc, ID_RULE, value)


def id_msgspec_type() -> Any:
    """The identifier rule for msgspec's decoder (printability is checked after decoding: msgspec has no test)."""
    return (
        Annotated[int, msgspec.Meta(ge=0, le=MAX_INT_ID)]
        | Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    )


# The identifier rule for pydantic (OpenAPI). "Printable" (Python's str.isprintable) has no exact JSON-schema
# pattern; the descriptions state it. Strict integers: pydantic's lax mode would take 1.0 or true for 1, which
# parse_id refuses.
IdInt = Annotated[int, Strict(), Field(ge=0, le=MAX_INT_ID)]
IdStr = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
Identifier = IdInt | IdStr
