"""The serving core without HTTP: the active model with its fallback, and request bytes to response bytes."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import operator
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
import orjson

try:  # a faster typed decoder for batches; without it the orjson path serves them (same answers)
    import msgspec
except ImportError:  # pragma: no cover - msgspec is a dependency; this keeps an older image working
    msgspec = None  # type: ignore[assignment]

from moviematch_ml import model
from moviematch_ml.errors import FieldError, InputError, ModelError
from moviematch_ml.fallback import FallbackPredictor
from moviematch_ml.features import (
    EXAMPLE,
    FEATURE_NAMES,
    FEATURES,
    MAX_ID_LENGTH,
    N_FEATURES,
    Feature,
    matrix_from_mappings,
    parse_id,
    row_from_mapping,
)
from moviematch_ml.settings import Settings

_codec: Any
try:  # the per-movie loops of batches in C (setup.py); without it, the Python loops below (same bytes)
    from moviematch_ml import _codec
except ImportError:  # pragma: no cover - depends on how the package was built
    _codec = None

log = logging.getLogger(__name__)

Status = Literal["ok", "degraded"]
Id = str | int

# Only bodies up to this size are cached (a /predict body or a batch of ~100 movies): the key is the body itself, and
# entries of big batches would make the cache's memory unbounded in practice.
CACHE_MAX_BODY_BYTES: Final[int] = 16 * 1024
# Memory budget of the cache (approximate bytes), on top of its entry count.
CACHE_MAX_BYTES: Final[int] = 32 * 1024 * 1024
NOT_LOADED: Final[str] = "starting: the model has not been loaded yet"


A = TypeVar("A")  # an answer: (rating, source, cacheable, version) or a _BatchAnswer


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


@dataclass(frozen=True, slots=True)
class Answering:
    """One consistent snapshot: the predictor, why it is the fallback (if it is), and its model card."""

    predictor: model.Predictor
    reason: str | None
    card: model.ModelCard | None

    @property
    def status(self) -> Status:
        return "ok" if self.predictor.source != "fallback" else "degraded"


class ModelHolder:
    """Owns the predictor that answers right now: the trained model, or the fallback rule with the reason why.

    ``current`` is replaced whole by ``swap`` (one attribute assignment), so a request that reads it once uses one
    consistent model (version, source, predict) and ``/health`` one consistent status and reason, even while
    another thread swaps in a new model.
    """

    def __init__(self, settings: Settings, *, loader: Callable[[Path], model.Predictor] | None = None) -> None:
        self._path: Path = settings.model_path or model.BUNDLED_MODEL_DIR
        self._loader = loader if loader is not None else model.load_predictor
        self.current: Answering = Answering(FallbackPredictor(), NOT_LOADED, None)
        self.ready: bool = False

    @property
    def active(self) -> model.Predictor:
        """The predictor that answers now (read it once per request)."""
        return self.current.predictor

    @property
    def status(self) -> Status:
        return self.current.status

    @property
    def reason(self) -> str | None:
        return self.current.reason

    def load(self) -> None:
        """Load the model from the configured path; on any model error keep the fallback and remember why."""
        try:
            predictor = self._loader(self._path)
        except ModelError as exc:
            reason = f"model not loaded, answering with the fallback rule: {type(exc).__name__}: {exc}"
            log.error("model load failed", extra={"model_path": str(self._path), "reason": reason})
            self.swap(FallbackPredictor(), reason=reason)
            return
        except Exception as exc:
            # Not a refused model but a broken environment (say, LightGBM's native library missing from the image):
            # still answer with the fallback rather than crash-loop, and keep the traceback in the log.
            reason = f"model not loaded, answering with the fallback rule: {type(exc).__name__}: {exc}"
            log.exception("model load failed", extra={"model_path": str(self._path), "reason": reason})
            self.swap(FallbackPredictor(), reason=reason)
            return
        log.info("model loaded", extra={"model_path": str(self._path), "model_version": predictor.version})
        self.swap(predictor)

    def swap(self, predictor: model.Predictor, *, reason: str | None = None) -> None:
        """Make ``predictor`` the one that answers; ``reason`` says why when it is the fallback."""
        card = getattr(predictor, "card", None)
        self.current = Answering(
            predictor,
            reason if predictor.source == "fallback" else None,
            card if isinstance(card, model.ModelCard) else None,
        )

    def warm_up(self) -> bool:
        """Answer the canned example; the service is ready only once this gave finite ratings on the 0-10 scale."""
        x = np.array([[float(EXAMPLE[name]) for name in EXAMPLE]], dtype=np.float64)
        try:
            y = self.active.predict(x)
            ok = y.shape == (1,) and math.isfinite(float(y[0])) and 0.0 <= float(y[0]) <= 10.0
        except Exception:
            log.exception("canned prediction failed")
            ok = False
        if not ok and self.active.source != "fallback":
            # A model that loads but cannot answer is as good as no model: fall back rather than stay unready.
            self.swap(FallbackPredictor(), reason="model loaded but its canned prediction failed")
            return self.warm_up()
        self.ready = ok
        return ok

    def summary(self) -> dict[str, object]:
        """What ``GET /`` says about the model."""
        current = self.current
        out: dict[str, object] = {
            "version": current.predictor.version,
            "source": current.predictor.source,
            "status": current.status,
            "reason": current.reason,
        }
        card = current.card
        if card is not None and current.predictor.source != "fallback":
            out["name"] = card.name
            out["created_at"] = card.created_at
            out["features"] = card.features
            out["rating_scale"] = card.rating_scale.model_dump()
            out["metrics"] = card.metrics
        return out


class Personalizer(Protocol):
    """Per-user predictions: for a known user, ratings for some rows and a mask of the rows it answered.

    Returns None when it knows nothing about the user; the model's ratings are then used unchanged.
    """

    @property
    def version(self) -> str | None:
        """The personalised model's version, reported as ``model_version`` of the answers it gave."""
        ...

    def __call__(
        self, user_id: Id, movie_ids: Sequence[Id | None], x: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None: ...


@runtime_checkable
class OneMoviePersonalizer(Personalizer, Protocol):
    """A personalizer with a path of its own for /predict's one movie, on Python floats."""

    def predict_one(self, user_id: Id, movie_id: Id | None, row: list[float]) -> float | None:
        """The answer (0-10) for a known user, or None (then the model's answer is used)."""
        ...


_PREDICT_EXTRA: Final[frozenset[str]] = frozenset({"user_id", "movie_id"})
_MOVIE_EXTRA: Final[frozenset[str]] = frozenset({"movie_id"})
_BATCH_KEYS: Final[frozenset[str]] = frozenset({"movies", "user_id", "rank", "top_k"})
TOP_K_RULE: Final[str] = "must be an integer >= 1"
RANK_RULE: Final[str] = "must be true or false"


# (matrix, movie ids, user id, rank, top_k): a validated /predict-batch body.
_Batch = tuple[npt.NDArray[np.float64], list[Id], Id | None, bool, int | None]


def _msgspec_type(feature: Feature) -> Any:
    """The msgspec type of one feature: the same rule as ``Feature.rule`` (stricter on 2.0-style integers)."""
    if feature.kind == "flag":
        return bool | Literal[0, 1]
    if feature.kind == "count":
        return Annotated[int, msgspec.Meta(ge=int(feature.minimum), le=int(feature.maximum))]
    return Annotated[float, msgspec.Meta(ge=feature.minimum, le=feature.maximum)]


def _batch_decoder() -> Any:
    """msgspec's typed JSON decoder for /predict-batch bodies (None without msgspec: the orjson path serves)."""
    if msgspec is None:
        return None
    identifier = (
        Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
        | Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    )
    movie = msgspec.defstruct(
        "Movie",
        [("movie_id", identifier), *((f.name, _msgspec_type(f)) for f in FEATURES)],
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
_FEATURE_VALUES: Final = operator.attrgetter(*FEATURE_NAMES)


def _loads(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSONError(f"request body is not valid JSON: {exc}") from None


def _rows_one_by_one(movies: list[object]) -> tuple[npt.NDArray[np.float64], list[Id]]:
    """The per-field loop: raises the exact error of the first broken rule (the vectorised check only says "no")."""
    n = len(movies)
    x = np.empty((n, N_FEATURES), dtype=np.float64)
    ids: list[Id] = [0] * n
    for i, movie in enumerate(movies):
        loc = f"movies[{i}]"
        row_from_mapping(movie, loc, x[i], _MOVIE_EXTRA)
        assert isinstance(movie, dict)  # row_from_mapping refused anything else
        try:
            raw_id = movie["movie_id"]
        except KeyError:
            raise FieldError(loc + ".movie_id", "is required", None) from None
        ids[i] = parse_id(raw_id, loc + ".movie_id")
    return x, ids


def new_id() -> str:
    """A fresh 32-hex-digit id (prediction ids, request ids): unique, not secret.

    Mersenne Twister bits instead of ``os.urandom``: one system call less per id on the hot path. The generator
    is seeded from the OS at import and reseeded by Python after a fork, so workers do not share a sequence.
    """
    return f"{random.getrandbits(128):032x}"


class PredictionService:
    """Turns the bytes of a /predict or /predict-batch request into the bytes of its JSON answer.

    Validation writes straight into a preallocated feature matrix and the model is called once per request,
    never row by row: this is the hot path, so no pydantic objects and no pandas here.
    """

    def __init__(
        self,
        holder: ModelHolder,
        *,
        max_batch_size: int,
        personalizer: Personalizer | None = None,
        cache_size: int = 0,
        cache: AnswerCache | None = None,
    ) -> None:
        self.holder = holder
        self.max_batch_size = max_batch_size
        self.personalizer = personalizer
        # Checked once here rather than per request (a runtime protocol check costs microseconds).
        self._predict_one_personal = (
            personalizer.predict_one if isinstance(personalizer, OneMoviePersonalizer) else None
        )
        # An explicit cache (say, the shared Redis one) wins; else an in-process LRU of cache_size entries.
        self.cache: AnswerCache | None = cache if cache is not None else LRUCache(cache_size) if cache_size else None
        self.movies_rule = f"must be a list of 1 to {max_batch_size} movies"

    def predict_one(self, body: bytes) -> bytes:
        """``POST /predict``: six features, optional ``user_id`` and ``movie_id``."""
        answer = self._cached(body, self._predict_one, lambda a: (a[2], 1))
        return _render_one(answer)

    def _cached(self, body: bytes, compute: Callable[[bytes], A], rows: Callable[[A], tuple[bool, int]]) -> A:
        """The answer to ``body`` from the cache, else computed (and stored when ``rows`` says it may be:
        (cacheable, number of predictions)). Answers hold no prediction ids, so a hit still gets fresh ones."""
        cache = self.cache
        if cache is None or len(body) > CACHE_MAX_BODY_BYTES:
            return compute(body)
        predictor = self.holder.active
        key = (predictor.version, predictor.source, body)
        hit: A | None = cache.get(key)
        if hit is not None:
            return hit
        answer = compute(body)
        cacheable, n = rows(answer)
        if cacheable:
            cache.put(key, answer, n)
        return answer

    def _predict_one(self, body: bytes) -> tuple[float, str, bool, str]:
        """(rounded rating, source, whether the answer depends on the body alone, model version)."""
        obj = _loads(body)
        x = np.empty((1, N_FEATURES), dtype=np.float64)
        row_from_mapping(obj, "", x[0], _PREDICT_EXTRA)
        assert isinstance(obj, dict)  # row_from_mapping refused anything else
        user_id = parse_id(obj["user_id"], "user_id") if "user_id" in obj else None
        movie_id = parse_id(obj["movie_id"], "movie_id") if "movie_id" in obj else None
        predictor = self.holder.active
        personalizer = self.personalizer
        one: float | None = None
        if user_id is not None and personalizer is not None:
            if self._predict_one_personal is not None:
                one = self._predict_one_personal(user_id, movie_id, x[0].tolist())
            else:
                answer = personalizer(user_id, [movie_id], x)
                if answer is not None and bool(answer[1][0]):
                    one = float(answer[0][0])
        if one is not None:
            y, source = one, "personalized"  # the six-feature model is not needed at all
        else:
            y, source = float(predictor.predict(x)[0]), predictor.source
        # A personalised answer changes with the user's feedback: it is never cached.
        cacheable = user_id is None or personalizer is None
        version = predictor.version
        if source == "personalized":
            version = (personalizer.version if personalizer is not None else None) or version
        return round(y, 3), source, cacheable, version

    def predict_batch(self, body: bytes) -> bytes:
        """``POST /predict-batch``: one prediction per movie, in request order or ranked best-first."""
        return _render_batch(self._cached(body, self._predict_batch, lambda a: (a.cacheable, len(a.order))))

    def _decode_batch_fast(self, body: bytes) -> _Batch | None:
        """The batch validated by msgspec's typed decoder, or None (then ``_decode_batch`` finds the exact error).

        The decoder's types say the same rules as ``features.FEATURES`` but it refuses some bodies the rules
        accept (a count sent as 2.0, a flag sent as 1.0, ...): those, like every invalid body, take the slow
        path, which accepts or refuses them with the contract's messages. It never accepts what the rules refuse.
        """
        decoder = _BATCH_DECODER
        if decoder is None:
            return None
        try:
            batch = decoder.decode(body)
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
        if _codec is None or not _codec.matrix(movies, FEATURE_NAMES, x):
            # One flat pass (chain + fromiter): 20% faster than np.array over a list of per-movie tuples.
            values = itertools.chain.from_iterable(map(_FEATURE_VALUES, movies))
            x = np.fromiter(values, dtype=np.float64, count=n * N_FEATURES).reshape(n, N_FEATURES)
        return x, ids, user_id, batch.rank, batch.top_k

    def _decode_batch(self, body: bytes) -> _Batch:
        """The batch validated by the hand-written rules: raises the contract's error for the first broken one."""
        obj = _loads(body)
        if not isinstance(obj, dict):
            raise FieldError("body", "must be a JSON object", obj)
        for key in obj:
            if key not in _BATCH_KEYS:
                raise FieldError(str(key), "unknown field", obj[key])
        if "movies" not in obj:
            raise FieldError("movies", "is required", None)
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
        x, ids = checked if checked is not None else _rows_one_by_one(movies)
        return x, ids, user_id, rank, top_k

    def _predict_batch(self, body: bytes) -> _BatchAnswer:
        parsed = self._decode_batch_fast(body)
        x, ids, user_id, rank, top_k = parsed if parsed is not None else self._decode_batch(body)
        n = len(ids)
        predictor = self.holder.active
        source = predictor.source
        sources: list[str] | None = None
        personalized_version: str | None = None
        personalizer = self.personalizer
        answer = None
        if user_id is not None and personalizer is not None:
            answer = personalizer(user_id, ids, x)
        if answer is None or personalizer is None:
            y = predictor.predict(x)
        else:
            ratings, mask = answer
            if mask.all():
                y = ratings  # only read below (np.round makes a new array)
                source = "personalized"  # every row: one source for all, no per-row list
            else:  # only the rows the personalised model did not answer need the six-feature model
                y = np.array(ratings, dtype=np.float64)
                rest = ~mask
                y[rest] = predictor.predict(x[rest])
                sources = ["personalized" if m else predictor.source for m in mask.tolist()]
            personalized_version = personalizer.version
        rounded: list[float] = np.round(y, 3).tolist()

        ranked = rank or top_k is not None
        if ranked:
            # Stable sort on the rounded ratings: equal answers keep request order, and the list reads sorted.
            order: list[int] = np.argsort(-np.asarray(rounded), kind="stable").tolist()
            if top_k is not None:
                order = order[:top_k]
        else:
            order = list(range(n))

        cacheable = user_id is None or self.personalizer is None
        return _BatchAnswer(
            ids, rounded, source, sources, order, ranked, predictor.version, cacheable, personalized_version
        )


@dataclass(frozen=True, slots=True)
class _BatchAnswer:
    """A batch's answer without its prediction ids (fresh for every response, cached or not)."""

    ids: list[Id]
    rounded: list[float]
    source: str
    sources: list[str] | None
    order: list[int]
    ranked: bool
    version: str
    cacheable: bool
    personalized_version: str | None = None


def _render_one(answer: tuple[float, str, bool, str]) -> bytes:
    return orjson.dumps(
        {"predicted_rating": answer[0], "model_version": answer[3], "source": answer[1], "prediction_id": new_id()}
    )


_SUFFIXES: list[str] = []


def _suffixes(n: int) -> list[str]:
    """``["-0", "-1", ...]`` for at least ``n`` rows, built once: prediction ids are ``batch id + suffix``."""
    global _SUFFIXES
    current = _SUFFIXES
    if len(current) < n:
        # A new list, swapped in whole: a thread-pool request reading the old one never sees it half-extended.
        current = current + [f"-{i}" for i in range(len(current), n)]
        _SUFFIXES = current
    return current


def _render_batch(answer: _BatchAnswer) -> bytes:
    batch_id = new_id()
    tail: dict[str, object] = {"model_version": answer.version, "count": len(answer.order), "ranked": answer.ranked}
    if answer.personalized_version is not None:
        # Rows with "source": "personalized" came from this model; model_version is the six-feature model's.
        tail["personalized_model_version"] = answer.personalized_version
    if _codec is not None:
        sources = None if answer.sources is None else list(map(_json_text, answer.sources))
        order = answer.order if answer.ranked else None  # unranked answers are in request order
        rows: bytes | None = _codec.rows(
            answer.ids, answer.rounded, order, _json_text(answer.source), sources, batch_id.encode("ascii")
        )
        if rows is not None:
            # The bytes orjson would write for the dict below (tests/test_fastpath.py compares the two).
            return b'{"predictions":[' + rows + b"]," + orjson.dumps(tail)[1:]
    return _render_batch_dicts(answer, batch_id, tail)


def _render_batch_dicts(answer: _BatchAnswer, batch_id: str, tail: dict[str, object]) -> bytes:
    """The answer through per-row dicts and orjson: string movie ids, or without the C extension."""
    ids, rounded, source, sources = answer.ids, answer.rounded, answer.source, answer.sources
    suffix = _suffixes(len(ids))
    predictions = [
        {
            "movie_id": ids[i],
            "predicted_rating": rounded[i],
            "source": source if sources is None else sources[i],
            "prediction_id": batch_id + suffix[i],
        }
        for i in answer.order
    ]
    return orjson.dumps({"predictions": predictions, **tail})


@functools.lru_cache(maxsize=64)
def _json_text(text: str) -> bytes:
    """A string as JSON (a source name): computed once per distinct string."""
    return orjson.dumps(text)


class AnswerCache(Protocol):
    """Where answers are kept by (model version, source, request body): in process, or in Redis (``cache.py``)."""

    def get(self, key: tuple[str, str, bytes]) -> Any: ...

    def put(self, key: tuple[str, str, bytes], value: Any, rows: int = 1) -> None: ...


def encode_answer(value: tuple[float, str, bool, str] | _BatchAnswer) -> dict[str, Any]:
    """An answer as plain JSON data, for a cache outside the process (no pickle)."""
    if isinstance(value, _BatchAnswer):
        return {"batch": [getattr(value, f) for f in _BatchAnswer.__dataclass_fields__]}
    return {"one": list(value)}


def decode_answer(data: dict[str, Any]) -> tuple[float, str, bool, str] | _BatchAnswer:
    """The inverse of ``encode_answer``."""
    if "batch" in data:
        return _BatchAnswer(*data["batch"])
    rating, source, cacheable, version = data["one"]
    return float(rating), str(source), bool(cacheable), str(version)


class LRUCache:
    """Answers by (model version, source, request body): a bounded, least-recently-used map.

    The model version is in the key, so a swapped model never answers from its predecessor's entries. Only
    answers that depend on the body alone are stored (not personalised ones, which change with feedback).
    """

    def __init__(self, max_entries: int, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple[str, str, bytes], tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str, bytes]) -> Any:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        with suppress(KeyError):  # evicted meanwhile by a thread-pool request: the value is still right
            self._data.move_to_end(key)
        return entry[0]

    def put(self, key: tuple[str, str, bytes], value: Any, rows: int = 1) -> None:
        """Store ``value``; ``rows`` (predictions in it) sizes the entry for the memory budget."""
        data = self._data
        if key in data:
            return
        # Rough bytes held: the body (the key) plus ~100 bytes of Python objects per prediction.
        size = len(key[2]) + 100 * rows
        data[key] = (value, size)
        self.bytes += size
        while len(data) > self.max_entries or self.bytes > self.max_bytes:
            try:
                _, (_, old_size) = data.popitem(last=False)
            except KeyError:  # emptied meanwhile by another thread
                break
            self.bytes -= old_size

    def __len__(self) -> int:
        return len(self._data)
