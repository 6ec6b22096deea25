"""The request contract of the prediction routes: request bytes -> a validated feature matrix, answers -> bytes.

Two decoders accept exactly the same bodies. The fast one (msgspec's typed decoder, the columns checked at once)
serves valid requests; it only says "no". The exact one (``Feature.parse`` field by field) then finds the first
broken rule and raises its error, with the field, the rule and the value (tests/online/test_contract.py drives
both with the same bodies).
"""

from __future__ import annotations

import functools
import operator
import random
from dataclasses import dataclass
from typing import Annotated, Any, Final, cast

import msgspec
import numpy as np
import numpy.typing as npt
import orjson

from moviematch_ml.errors import FieldError, InvalidJSONError
from moviematch_ml.features import (
    FEATURE_NAMES,
    FEATURES,
    MAX_INT_ID,
    N_FEATURES,
    id_msgspec_type,
    parse_id,
)
from moviematch_ml.runtime import native

FloatArray = npt.NDArray[np.float64]
Id = str | int

TOP_K_RULE: Final[str] = "must be an integer >= 1"
RANK_RULE: Final[str] = "must be true or false"
_PREDICT_EXTRA: Final[frozenset[str]] = frozenset({"user_id", "movie_id"})
_MOVIE_EXTRA: Final[frozenset[str]] = frozenset({"movie_id"})
_BATCH_KEYS: Final[frozenset[str]] = frozenset({"movies", "user_id", "rank", "top_k"})
_NAME_SET: Final[frozenset[str]] = frozenset(FEATURE_NAMES)


def new_id() -> str:
    """A fresh 32-hex-digit id (prediction ids, request ids): unique, not secret.

    Mersenne Twister bits instead of ``os.urandom``: one system call less per id on the hot path. The generator
    is seeded from the OS at import and reseeded by Python after a fork, so workers do not share a sequence.
    """
    return f"{random.getrandbits(128):032x}"


def loads(body: bytes) -> object:
    """The body as JSON, or InvalidJSONError (400)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSONError(f"request body is not valid JSON: {exc}") from None


# --- /predict -------------------------------------------------------------------------------------------------------


# Not frozen, like the other value objects of a request: a frozen dataclass's __init__ costs more than the
# validation of a field.
@dataclass(slots=True)
class OneRequest:
    """A validated /predict body."""

    x: FloatArray  # (1, 6)
    user_id: Id | None
    movie_id: Id | None


def row_from_mapping(
    obj: object, loc: str, out: FloatArray, allowed_extra: frozenset[str] = frozenset()
) -> dict[str, object]:
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
            raise FieldError(prefix + feature.name, "is required") from None
        out[i] = feature.parse(value, prefix + feature.name)
    if len(obj) > N_FEATURES:
        for key in obj:
            if key not in _NAME_SET and key not in allowed_extra:
                raise FieldError(prefix + str(key), "unknown field", obj[key])
    return obj


def decode_one(body: bytes) -> OneRequest:
    """A /predict body: the six features, optional ``user_id`` and ``movie_id``."""
    x = np.empty((1, N_FEATURES), dtype=np.float64)
    obj = row_from_mapping(loads(body), "", x[0], _PREDICT_EXTRA)
    user_id = parse_id(obj["user_id"], "user_id") if "user_id" in obj else None
    movie_id = parse_id(obj["movie_id"], "movie_id") if "movie_id" in obj else None
    return OneRequest(x, user_id, movie_id)


# --- /predict-batch -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class BatchRequest:
    """A validated /predict-batch body."""

    x: FloatArray  # (n, 6)
    ids: list[Id]
    user_id: Id | None
    rank: bool
    top_k: int | None


def _batch_decoder() -> Any:
    """msgspec's typed JSON decoder for /predict-batch bodies, its types generated from FEATURES."""
    identifier = id_msgspec_type()
    movie = msgspec.defstruct(
        "Movie",
        [("movie_id", identifier), *((f.name, f.msgspec_type()) for f in FEATURES)],
        forbid_unknown_fields=True,
        gc=False,
    )
    body = msgspec.defstruct(
        "BatchBody",
        [
            ("movies", list[movie]),  # type: ignore[valid-type]  # a class built at run time
            ("user_id", identifier | msgspec.UnsetType, msgspec.UNSET),
            ("rank", bool, False),
            ("top_k", Annotated[int, msgspec.Meta(ge=1)] | None, None),
        ],
        forbid_unknown_fields=True,
    )
    return msgspec.json.Decoder(body)


_BATCH_DECODER: Final[Any] = _batch_decoder()
_MOVIE_ID: Final = operator.attrgetter("movie_id")


def matrix_from_mappings(objs: list[object], id_key: str) -> tuple[FloatArray, list[Id]] | None:
    """The feature matrix and the ids of many rows at once, or None if any row breaks any rule.

    Values are pulled column by column and each column is checked at once (``Feature.column_ok``), instead of
    one ``Feature.parse`` call per field. It accepts exactly what ``row_from_mapping`` + ``parse_id`` accept
    (each row: a dict holding the six features and ``id_key``, nothing else); on None the caller runs the
    per-row loop, which finds the first broken rule and raises its exact error.
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
        if not set(map(type, column)) <= feature.json_types:
            return None
        try:
            values = np.fromiter(column, dtype=np.float64, count=n)
        except OverflowError:  # an integer too big for a float: certainly out of range
            return None
        if not feature.column_ok(values):
            return None
        x[:, j] = values
    id_types = set(map(type, ids))
    if id_types == {int}:
        int_ids = cast(tuple[int, ...], ids)  # checked just above
        if min(int_ids) < 0 or max(int_ids) > MAX_INT_ID:
            return None
        return x, list[Id](int_ids)
    if not id_types <= {int, str}:
        return None
    try:
        return x, [parse_id(i, "") for i in ids]
    except FieldError:
        return None


def rows_one_by_one(movies: list[object]) -> tuple[FloatArray, list[Id]]:
    """The per-field loop over a batch's movies: the feature matrix and the ids, or the exact error of the first
    broken rule (``matrix_from_mappings`` accepts exactly what this accepts, but only says "no")."""
    n = len(movies)
    x = np.empty((n, N_FEATURES), dtype=np.float64)
    ids: list[Id] = [0] * n
    for i, movie in enumerate(movies):
        loc = f"movies[{i}]"
        obj = row_from_mapping(movie, loc, x[i], _MOVIE_EXTRA)
        try:
            raw_id = obj["movie_id"]
        except KeyError:
            raise FieldError(loc + ".movie_id", "is required") from None
        ids[i] = parse_id(raw_id, loc + ".movie_id")
    return x, ids


class BatchDecoder:
    """/predict-batch bodies of at most ``max_batch_size`` movies -> BatchRequest, or the contract's error."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.movies_rule = f"must be a list of 1 to {max_batch_size} movies"

    def __call__(self, body: bytes) -> BatchRequest:
        fast = self.decode_fast(body)
        return fast if fast is not None else self.decode_exact(body)

    def decode_fast(self, body: bytes) -> BatchRequest | None:
        """The batch validated by msgspec's typed decoder, or None (then ``decode_exact`` finds the exact error).

        The decoder refuses some bodies the rules accept (a count sent as 2.0, a flag sent as 1.0, ...): those,
        like every invalid body, take the exact path, which accepts or refuses them with the contract's messages.
        It never accepts what the rules refuse.
        """
        try:
            batch = _BATCH_DECODER.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        movies = batch.movies
        n = len(movies)
        if n == 0 or n > self.max_batch_size:
            return None
        user_id = batch.user_id
        if user_id is msgspec.UNSET:
            user_id = None
        elif isinstance(user_id, str) and not user_id.isprintable():
            return None
        ids: list[Id] = list(map(_MOVIE_ID, movies))
        if str in set(map(type, ids)) and not all(i.isprintable() for i in ids if isinstance(i, str)):
            return None
        x = np.empty((n, N_FEATURES), dtype=np.float64)
        native.matrix(movies, FEATURE_NAMES, x)
        return BatchRequest(x, ids, user_id, batch.rank, batch.top_k)

    def decode_exact(self, body: bytes) -> BatchRequest:
        """The batch validated by the hand-written rules: raises the contract's error for the first broken one."""
        obj = loads(body)
        if not isinstance(obj, dict):
            raise FieldError("body", "must be a JSON object", obj)
        for key in obj:
            if key not in _BATCH_KEYS:
                raise FieldError(str(key), "unknown field", obj[key])
        if "movies" not in obj:
            raise FieldError("movies", "is required")
        movies = obj["movies"]
        if not isinstance(movies, list):
            raise FieldError("movies", self.movies_rule, movies)
        n = len(movies)
        if n == 0 or n > self.max_batch_size:
            # The count, not the list: echoing ten thousand movies back in an error helps nobody.
            raise FieldError("movies", self.movies_rule, n)
        user_id = parse_id(obj["user_id"], "user_id") if "user_id" in obj else None
        rank = obj.get("rank", False)
        if not isinstance(rank, bool):
            raise FieldError("rank", RANK_RULE, rank)
        top_k = obj.get("top_k")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            raise FieldError("top_k", TOP_K_RULE, top_k)
        checked = matrix_from_mappings(movies, "movie_id")
        x, ids = checked if checked is not None else rows_one_by_one(movies)
        return BatchRequest(x, ids, user_id, rank, top_k)


# --- answers --------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class OneAnswer:
    """A /predict answer without its prediction id (fresh for every response, cached or not)."""

    rating: float  # rounded to 3 decimals
    source: str
    cacheable: bool  # depends on the body alone
    version: str  # the model directory's (Models.version)
    variant: str = "champion"

    def packed(self) -> tuple[float, str, bool, str, str]:
        """The fields as a plain tuple, in declaration order (``OneAnswer(*packed)`` is the answer): what the
        in-process cache holds, out of the garbage collector's sight (see ``PredictionLog.add``)."""
        return (self.rating, self.source, self.cacheable, self.version, self.variant)


@dataclass(slots=True)
class BatchAnswer:
    """A /predict-batch answer without its prediction ids."""

    ids: list[Id]
    rounded: list[float]
    source: str
    sources: list[str] | None  # per row, when the rows came from more than one source
    order: list[int]
    ranked: bool
    version: str  # the model directory's (Models.version)
    cacheable: bool
    variant: str = "champion"


def render_one(answer: OneAnswer, prediction_id: str) -> bytes:
    return orjson.dumps(
        {
            "predicted_rating": answer.rating,
            "model_version": answer.version,
            "variant": answer.variant,
            "source": answer.source,
            "prediction_id": prediction_id,
        }
    )


def render_batch(answer: BatchAnswer, request_id: str) -> bytes:
    """The answer; row i's prediction id is ``<request_id>-<i>`` (i: its place in the request)."""
    tail = {
        "model_version": answer.version,
        "variant": answer.variant,
        "count": len(answer.order),
        "ranked": answer.ranked,
    }
    sources = None if answer.sources is None else list(map(_json_text, answer.sources))
    order = answer.order if answer.ranked else None  # unranked answers are in request order
    rows = native.rows(
        answer.ids, answer.rounded, order, _json_text(answer.source), sources, request_id.encode("ascii")
    )
    return b'{"predictions":[' + rows + b"]," + orjson.dumps(tail)[1:]


@functools.lru_cache(maxsize=64)
def _json_text(text: str) -> bytes:
    """A string as JSON (a source name): computed once per distinct string."""
    return orjson.dumps(text)


def encode_answer(value: OneAnswer | BatchAnswer) -> dict[str, Any]:
    """An answer as plain JSON data, for a cache outside the process (no pickle)."""
    if isinstance(value, BatchAnswer):
        return {"batch": [getattr(value, f) for f in BatchAnswer.__dataclass_fields__]}
    return {"one": [getattr(value, f) for f in OneAnswer.__dataclass_fields__]}


def decode_answer(data: dict[str, Any]) -> OneAnswer | BatchAnswer:
    """The inverse of ``encode_answer``."""
    if "batch" in data:
        return BatchAnswer(*data["batch"])
    rating, source, cacheable, version, variant = data["one"]
    return OneAnswer(float(rating), str(source), bool(cacheable), str(version), str(variant))
