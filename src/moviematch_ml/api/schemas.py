"""Pydantic models of the requests and responses, generated from FEATURES, used only for the OpenAPI docs.

Requests are validated by ``online/contract.py`` on the hot path; these models are built from the same feature
and identifier rules (``Feature.annotation``, ``features.Identifier``), and a test checks that both accept and
refuse the same requests, so that ``/docs`` and ``/openapi.json`` tell clients the truth.
"""

from __future__ import annotations

from types import GenericAlias
from typing import Annotated, Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

from moviematch_ml.features import EXAMPLE, FEATURES, ID_RULE, Identifier, IdStr

_FORBID: Final = ConfigDict(extra="forbid")


_FEATURE_FIELDS: Final[dict[str, Any]] = {f.name: (f.annotation(), ...) for f in FEATURES}
_USER_ID: Final[tuple[Any, Any]] = (
    Identifier | None,
    Field(
        None,
        description="The user the prediction is for: a user with ratings through /feedback gets the personalised "
        f"model's answer. Rule: {ID_RULE}.",
    ),
)

PredictRequest: type[BaseModel] = create_model(
    "PredictRequest",
    __config__=_FORBID,
    __doc__="The six features of one user-movie pair. Unknown fields are refused (422 'unknown field').",
    **_FEATURE_FIELDS,
    user_id=_USER_ID,
    movie_id=(
        Identifier | None,
        Field(
            None, description=f"The movie, in the app's ids: the personalised model's movie inputs. Rule: {ID_RULE}."
        ),
    ),
)

BatchMovie: type[BaseModel] = create_model(
    "BatchMovie",
    __config__=_FORBID,
    __doc__="One movie of a batch: its id and the six features for this user.",
    movie_id=(Identifier, Field(description=f"The movie, echoed in the answer. Rule: {ID_RULE}.")),
    **_FEATURE_FIELDS,
)

# list[BatchMovie], spelt so that mypy (with or without the pydantic plugin) accepts a model made by create_model.
_MOVIE_LIST: Final[Any] = GenericAlias(list, (BatchMovie,))

BatchRequest: type[BaseModel] = create_model(
    "BatchRequest",
    __config__=_FORBID,
    __doc__="Movies to predict for one user; answered in request order unless `rank` or `top_k` is given.",
    movies=(
        _MOVIE_LIST,
        Field(min_length=1, description="1 to MAX_BATCH_SIZE (default 10000) movies; `movie_id` is required."),
    ),
    user_id=_USER_ID,
    rank=(bool, Field(False, description="Sort the predictions best-first (ties keep request order).")),
    top_k=(int | None, Field(None, ge=1, description="Keep only the best k predictions; implies `rank`.")),
)

Source = Literal["model", "fallback", "personalized"]


class PredictResponse(BaseModel):
    """One predicted rating on the 0-10 scale of ``vote_average``."""

    predicted_rating: float = Field(ge=0, le=10, description="Rounded to 3 decimals.", examples=[7.912])
    model_version: str = Field(
        description="The model that answered: a hash of every file it loads (its six-feature and personalised "
        "parts; `source` says which part answered), or fallback-1 for the fallback rule.",
        examples=["fallback-1"],
    )
    variant: str = Field(
        description="The A/B variant that answered: champion, or a challenger's name (from the model registry).",
        examples=["champion"],
    )
    source: Source = Field(description="Which predictor answered.")
    prediction_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="Quote it when sending feedback.")


class BatchPrediction(BaseModel):
    movie_id: int | str
    predicted_rating: float = Field(ge=0, le=10)
    source: Source
    prediction_id: str = Field(description="`<batch id>-<index of the movie in the request>`.")


class BatchResponse(BaseModel):
    predictions: list[BatchPrediction]
    model_version: str = Field(
        description="The model that answered every row (each row's `source` says which of its parts).",
        examples=["fallback-1"],
    )
    variant: str = Field(description="The A/B variant that answered.", examples=["champion"])
    count: int = Field(description="Number of predictions returned (top_k may keep fewer than sent).")
    ranked: bool = Field(description="True when sorted best-first (rank or top_k).")


class FieldProblem(BaseModel):
    field: str = Field(examples=["movies[3].vote_average"])
    rule: str = Field(examples=["must be a finite number between 0 and 10"])
    value: Any = Field(
        None, examples=[11], description="The offending value as sent; absent when the field is missing."
    )


class ErrorResponse(BaseModel):
    """Every error: a stable code, a human message, and for 422 one entry per broken rule."""

    error: str = Field(examples=["validation_error"])
    message: str = Field(examples=["movies[3].vote_average: must be a finite number between 0 and 10 (got 11)"])
    detail: list[FieldProblem] | None = None


class ModelState(BaseModel):
    """One model's state."""

    status: Literal["ok", "fallback", "absent", "refused", "starting"] = Field(
        description="ok: loaded and answering; fallback: the six-feature model did not load and the fallback rule "
        "answers; absent: there is no personalised model; refused: present but not loaded (see reason); starting."
    )
    version: str | None
    reason: str | None = Field(description="Why it is not ok (null when ok or absent).")
    name: str | None = Field(None, description="GET / only: the model card's name.")
    created_at: str | None = Field(None, description="GET / only: when the model was trained.")


class ModelStates(BaseModel):
    six_features: ModelState
    personalized: ModelState


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="ok when the six-feature model answers and no personalised model was refused."
    )
    model_version: str = Field(description="The champion model's version (fallback-1 for the fallback rule).")
    source: Literal["model", "fallback"]
    reason: str | None = Field(description="Why the service is degraded (null when ok).")
    uptime_seconds: float
    models: ModelStates
    variants: list[VariantState] = Field(description="The champion and the A/B challengers in service.")
    store: str = Field(
        description="sqlite, postgresql, or 'sqlite (ephemeral)': a SQLite file in a container that a redeploy loses."
    )
    store_status: Literal["ok", "unavailable", "unknown"] = Field(
        description="Whether the store answered its last call (a write, or the periodic ping)."
    )
    store_reason: str | None = Field(description="Why the store is unavailable (null otherwise).")


class StatusResponse(BaseModel):
    status: str


class DriftBin(BaseModel):
    bin: str = Field(description="below, [a,b) between two training quantiles, [max,max], or above.")
    training_share: float = Field(description="The share of training inputs in the bin.")


class LoadedModel(BaseModel):
    """One model as loaded: its status and version, its card, and (six-feature model) its drift bins."""

    status: Literal["ok", "fallback", "absent", "refused", "starting"]
    version: str | None
    card: dict[str, Any] | None = Field(
        description="The model card (what the model is, its data, training and metrics); file paths by their name "
        "only. Null for the fallback rule and when there is no model."
    )
    drift_bins: dict[str, list[DriftBin]] | None = Field(
        description="Per feature, the bins /metrics counts inputs in (moviematch_drift_inputs_total), with their "
        "training shares; null without feature statistics in the card."
    )
    drift_shares_exact: bool | None = Field(
        description="Whether the training shares were counted at training time (else read off the quantile levels)."
    )


class ModelsResponse(BaseModel):
    six_features: LoadedModel
    personalized: LoadedModel


class VariantState(BaseModel):
    """An A/B variant: its share of the users (with a user id) and its model."""

    name: str = Field(examples=["champion"])
    weight: float = Field(ge=0, le=1)
    model_version: str
    status: Literal["ok", "degraded"]


class ReloadResponse(BaseModel):
    reloaded: bool = Field(description="False: the new models were refused and the ones in service kept (409).")
    reason: str | None = Field(description="Why the reload was refused (null when reloaded).")
    revision: int | None = Field(description="The registry revision in service (null without a registry).")
    variants: list[VariantState] = Field(description="The variants in service after the reload.")


class RootResponse(BaseModel):
    service: str
    version: str
    answer_scale: dict[str, float] = Field(
        description="The scale of every predicted_rating: 0 to 10 (TMDB's vote_average scale), whatever the model."
    )
    model: dict[str, Any] = Field(
        description="The six-feature model (or fallback rule) in detail. Its rating_scale is the scale of the ratings "
        "it was trained on (0.5-5 stars for the bundled model), not the answers': they are multiplied by "
        "to_answer_scale onto answer_scale."
    )
    models: ModelStates
    variants: list[VariantState] = Field(description="The champion and the A/B challengers in service.")
    auth: Literal["on", "off"] = Field(description="Whether access keys (API_KEYS) are required.")
    docs: str


# The examples: the example request (features.EXAMPLE, the app's typical call) alone, in a batch, and ranked.
PREDICT_EXAMPLE: Final[dict[str, Any]] = dict(EXAMPLE)
BATCH_EXAMPLE: Final[dict[str, Any]] = {"movies": [{"movie_id": 1, **EXAMPLE}]}
RANKED_EXAMPLE: Final[dict[str, Any]] = {
    "user_id": "u-42",
    "top_k": 2,
    "movies": [
        {"movie_id": 1, **EXAMPLE},
        {"movie_id": 2, **EXAMPLE, "vote_average": 6.1, "vote_count": 40, "is_favorite_genre": 0},
        {"movie_id": 3, **EXAMPLE, "vote_average": 8.4, "n_shared_genres": 3},
    ],
}


class FeedbackRating(BaseModel):
    """One rating a user gave a movie, on the 0-10 scale the service answers in."""

    model_config = ConfigDict(extra="forbid")

    user_id: Identifier = Field(description=f"Rule: {ID_RULE}.")
    movie_id: Identifier = Field(description=f"Rule: {ID_RULE}.")
    rating: float = Field(ge=0, le=10, allow_inf_nan=False, description="The user's rating, 0-10.")
    # The rule of online/feedback.py: unix seconds in [0, 1e11), or a date-time with its time zone.
    timestamp: Annotated[float, Field(ge=0, lt=1e11, allow_inf_nan=False)] | AwareDatetime | None = Field(
        None,
        description="When the user rated: unix seconds (0 to 10^11), or ISO-8601 with a time zone. Default: arrival "
        "time.",
    )
    prediction_id: IdStr | None = Field(None, description="The `prediction_id` the service returned, if any.")
    feedback_id: IdStr | None = Field(
        None, description="Idempotency key of this rating; a rating whose key was already stored is not stored again."
    )


class FeedbackBatch(BaseModel):
    """Up to 1000 ratings in one request (one transaction)."""

    model_config = ConfigDict(extra="forbid")

    ratings: list[FeedbackRating] = Field(min_length=1, max_length=1000)


class FeedbackResult(BaseModel):
    feedback_id: str
    status: Literal["stored", "duplicate"]


class FeedbackResponse(BaseModel):
    """What the write did: 201 when at least one rating was new, 200 when all were already stored."""

    accepted: int
    duplicates: int
    results: list[FeedbackResult]


FEEDBACK_EXAMPLE: Final[dict[str, Any]] = {"user_id": 42, "movie_id": 1, "rating": 8, "prediction_id": "9f" * 16}

REQUEST_MODELS: Final[tuple[type[BaseModel], ...]] = (
    PredictRequest,
    BatchMovie,
    BatchRequest,
    FeedbackRating,
    FeedbackBatch,
)


def request_components() -> dict[str, Any]:
    """JSON schemas of the request models, as OpenAPI ``components.schemas`` entries."""
    _, top = models_json_schema(
        [(m, "validation") for m in REQUEST_MODELS], ref_template="#/components/schemas/{model}"
    )
    defs: dict[str, Any] = top.get("$defs", {})
    return defs


def request_body(schema_name: str, examples: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{schema_name}"},
                    "examples": {name: {"value": value} for name, value in examples.items()},
                }
            },
        }
    }


FEEDBACK_BODY: Final[dict[str, Any]] = request_body(
    "FeedbackRating",
    {
        "one_rating": FEEDBACK_EXAMPLE,
        "batch": {"ratings": [FEEDBACK_EXAMPLE, {**FEEDBACK_EXAMPLE, "movie_id": 2}]},
    },
)
# The body is one rating or a batch of them.
FEEDBACK_BODY["requestBody"]["content"]["application/json"]["schema"] = {
    "oneOf": [{"$ref": "#/components/schemas/FeedbackRating"}, {"$ref": "#/components/schemas/FeedbackBatch"}]
}


# Request fields that may be left out but, when sent, may not be null: pydantic writes "anyOf [..., null]" for an
# optional field, which tells clients a null is welcome where the service answers 422.
# (The server does take null for top_k, a feedback's timestamp and prediction_id: those stay nullable.)
_NOT_NULL: Final[dict[str, tuple[str, ...]]] = {
    "PredictRequest": ("user_id", "movie_id"),
    "BatchRequest": ("user_id",),
    "FeedbackRating": ("user_id", "movie_id", "feedback_id"),
}


def finish(spec: dict[str, Any], *, auth: bool) -> dict[str, Any]:
    """The finishing touches of the OpenAPI document: optional request fields that are not nullable, and (with
    access keys on) the bearer scheme every operation but the health probes requires."""
    schemas_ = spec.get("components", {}).get("schemas", {})
    for model, fields in _NOT_NULL.items():
        properties = schemas_.get(model, {}).get("properties", {})
        for name in fields:
            prop = properties.get(name)
            if prop is not None and "anyOf" in prop:
                kept = [s for s in prop["anyOf"] if s != {"type": "null"}]
                prop.pop("default", None)
                if len(kept) == 1:
                    del prop["anyOf"]
                    prop.update(kept[0])
                else:
                    prop["anyOf"] = kept
    if auth:
        spec["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An access key of API_KEYS."}
        }
        for path, operations in spec.get("paths", {}).items():
            if not path.startswith("/health"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    return spec
