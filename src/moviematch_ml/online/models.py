"""The models the service answers with: loaded, checked, swapped in together, and reported one by one.

A ``Models`` snapshot holds the six-feature predictor (the trained model, or the fallback rule with the reason
why) and the personalised model (or none), each with its report. ``ModelSet.current`` is replaced whole by one
attribute assignment, so a request that reads it once answers with one consistent pair, and ``/health`` reports
one consistent state, even while another thread swaps in new models.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np

from moviematch_ml.errors import ModelError, ModelTermsError
from moviematch_ml.features import example_matrix
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR, PERSONALIZED_DIR, ModelCard, noncommercial_sources
from moviematch_ml.runtime.fallback import FallbackPredictor
from moviematch_ml.runtime.personalized import PersonalizedModel
from moviematch_ml.runtime.predictor import Predictor, load_six_features

log = logging.getLogger(__name__)

Status = Literal["ok", "degraded"]
# ok: loaded and answering; fallback: the six-feature model did not load, the rule answers; absent: there is no
# personalised model (normal: the six-feature model answers everyone); refused: present but not loadable or its
# canned prediction failed; starting: nothing loaded yet.
ModelStatus = Literal["ok", "fallback", "absent", "refused", "starting"]
NOT_LOADED: Final[str] = "starting: the model has not been loaded yet"


@dataclass(frozen=True, slots=True)
class ModelReport:
    """What ``/health`` says of one model."""

    status: ModelStatus
    version: str | None
    reason: str | None = None
    card: ModelCard | None = None

    def summary(self, *, details: bool = False) -> dict[str, object]:
        out: dict[str, object] = {"status": self.status, "version": self.version, "reason": self.reason}
        if details and self.card is not None:
            out["name"] = self.card.name
            out["created_at"] = self.card.created_at
        return out


@dataclass(frozen=True, slots=True)
class Models:
    """One consistent set of what answers: read it once per request."""

    six: Predictor  # the trained six-feature model, or the fallback rule
    personalized: PersonalizedModel | None
    six_report: ModelReport
    personalized_report: ModelReport

    @property
    def status(self) -> Status:
        """ok when the six-feature model answers and no personalised model was refused."""
        ok = self.six_report.status == "ok" and self.personalized_report.status in ("ok", "absent")
        return "ok" if ok else "degraded"

    @property
    def reason(self) -> str | None:
        """Why the service is degraded (the first model that did not load), or None."""
        if self.six_report.status != "ok":
            return self.six_report.reason
        return self.personalized_report.reason if self.personalized_report.status == "refused" else None

    def reports(self) -> dict[str, dict[str, object]]:
        """Each model's status and version, for ``/health``."""
        return {"six_features": self.six_report.summary(), "personalized": self.personalized_report.summary()}


def _starting() -> Models:
    return Models(
        FallbackPredictor(),
        None,
        ModelReport("starting", FallbackPredictor.version, NOT_LOADED),
        ModelReport("starting", None, NOT_LOADED),
    )


def load_personalized(model_path: Path) -> PersonalizedModel | None:
    """The personalised model stored next to the six-feature one (``<model dir>/personalized``), or None when there
    is none; raises ModelError when there is one that cannot be loaded."""
    directory = (model_path if model_path.is_dir() else model_path.parent) / PERSONALIZED_DIR
    if not directory.is_dir():
        return None
    return PersonalizedModel.load(directory)


def canned_personalized(model: PersonalizedModel) -> float:
    """The personalised model's answer to a canned request: a user who rated three of its movies, the example
    features, one of those movies. Raises whatever the model raises."""
    ids = list(model.mf.item_ids[:3])
    view = model.user_view_of_ratings(ids, [model.scale.max] * len(ids), [0.0, 1.0, 2.0][: len(ids)])
    if view is None:
        raise ModelError("the canned user has no view")
    pred, _ = model.predict(view, example_matrix(), ids[:1], model.movie_table(), now=3.0)
    return float(pred[0])


class ModelSet:
    """Loads the models of ``model_path`` (the six-feature model, and its ``personalized/`` directory), checks each
    with a canned prediction, and swaps them in together.

    A six-feature model that cannot be loaded or answered leaves the fallback rule answering, with the reason; a
    personalised model that cannot is left out (the six-feature model answers everyone), with the reason. Either
    makes the service ``degraded`` in ``/health``. With ``noncommercial=False`` (``SERVE_NONCOMMERCIAL_MODELS``)
    a model whose card says its training data forbids commercial use is refused the same way.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        load_six: Callable[[Path], Predictor] = load_six_features,
        load_personal: Callable[[Path], PersonalizedModel | None] = load_personalized,
        noncommercial: bool = True,
    ) -> None:
        self.path = model_path
        self.noncommercial = noncommercial
        self._load_six = load_six
        self._load_personal = load_personal
        self.current: Models = _starting()
        self.ready = False
        self.loaded_at: float | None = None
        # Told of every swap, after it (the metrics: each model's info, readiness and drift bins).
        self.listeners: list[Callable[[Models], None]] = []

    def load(self) -> Models:
        """Load, check and swap in the models of the path; never raises for a bad model (see the class)."""
        six, six_report = self._six()
        personal, personal_report = self._personalized()
        models = Models(six, personal, six_report, personal_report)
        self.swap(models)
        self.ready = True
        return models

    def swap(self, models: Models) -> None:
        """Make ``models`` the ones that answer."""
        self.current = models
        self.loaded_at = time.time()
        log.info(
            "models loaded",
            extra={
                "status": models.status,
                "model_version": models.six.version,
                "personalized_model_version": models.personalized_report.version,
                "reason": models.reason,
            },
        )
        for listener in self.listeners:
            try:
                listener(models)
            except Exception:  # the models answer whatever a listener does
                log.exception("model swap listener failed")

    def _six(self) -> tuple[Predictor, ModelReport]:
        path = self.path
        try:
            predictor = self._load_six(path)
            card = getattr(predictor, "card", None)
            if isinstance(card, ModelCard):
                self._check_terms(card)
        except Exception as exc:
            # A ModelError is a refused model; anything else a broken environment (LightGBM's native library missing
            # from the image, say): either way the fallback rule answers rather than the service crash-looping.
            reason = f"model not loaded, answering with the fallback rule: {type(exc).__name__}: {exc}"
            log.error(
                "model load failed",
                extra={"model_path": str(path), "reason": reason},
                exc_info=not isinstance(exc, ModelError),
            )
            return FallbackPredictor(), ModelReport("fallback", FallbackPredictor.version, self._public(reason))
        if not _answers(predictor):
            # A model that loads but cannot answer is as good as no model.
            reason = "model loaded but its canned prediction failed"
            log.error("model load failed", extra={"model_path": str(path), "reason": reason})
            return FallbackPredictor(), ModelReport("fallback", FallbackPredictor.version, reason)
        card = getattr(predictor, "card", None)
        return predictor, ModelReport("ok", predictor.version, None, card if isinstance(card, ModelCard) else None)

    def _personalized(self) -> tuple[PersonalizedModel | None, ModelReport]:
        try:
            model = self._load_personal(self.path)
            if model is not None and model.card is not None:
                self._check_terms(model.card)
        except Exception as exc:
            reason = f"personalised model not loaded: {type(exc).__name__}: {exc}"
            log.error("personalised model not loaded", extra={"model_path": str(self.path), "reason": reason})
            return None, ModelReport("refused", None, self._public(reason))
        if model is None:
            return None, ModelReport("absent", None)
        try:
            y = canned_personalized(model)
            ok = math.isfinite(y) and 0.0 <= y <= 10.0
        except Exception:
            log.exception("canned personalised prediction failed")
            ok = False
        if not ok:
            reason = "personalised model loaded but its canned prediction failed"
            log.error("personalised model not loaded", extra={"model_path": str(self.path), "reason": reason})
            return None, ModelReport("refused", model.version, reason)
        return model, ModelReport("ok", model.version, None, model.card)

    def _public(self, reason: str) -> str:
        """A reason as /health shows it: the model directory is named MODEL_PATH (the log has the full path; the
        answers of a public URL should not tell the machine's layout)."""
        path = self.path.resolve()
        where = "the bundled model" if path == BUNDLED_MODEL_DIR.resolve() else "MODEL_PATH"
        for spelling in sorted({str(path), str(self.path)}, key=len, reverse=True):
            reason = reason.replace(spelling, where)
        return reason

    def _check_terms(self, card: ModelCard) -> None:
        """Refuse a model trained on data that forbids commercial use, unless such models may be served."""
        if self.noncommercial:
            return
        sources = noncommercial_sources(card)
        if sources:
            names = "; ".join(f"{s.name} ({s.publisher})" for s in sources)
            raise ModelTermsError(
                f"{card.version} was trained on data whose terms forbid commercial use without permission: {names}; "
                "SERVE_NONCOMMERCIAL_MODELS is false (train on your own data: docs/training.md#data-and-terms)"
            )

    def summary(self) -> dict[str, object]:
        """What ``GET /`` says of the models: the six-feature model in detail (``model``), and each model."""
        current = self.current
        six = current.six
        out: dict[str, object] = {
            "version": six.version,
            "source": six.source,
            "status": current.status,
            "reason": current.reason,
        }
        card = current.six_report.card
        if card is not None and six.source != "fallback":
            out["name"] = card.name
            out["created_at"] = card.created_at
            out["features"] = card.features
            # The training ratings' scale, not the answers' (those are on 0-10: GET /'s answer_scale).
            out["rating_scale"] = card.rating_scale.model_dump()
            out["to_answer_scale"] = card.rating_scale.to_api
            out["metrics"] = card.metrics
        return out


def _answers(predictor: Predictor) -> bool:
    """Whether the predictor answers the canned example with a finite rating on the 0-10 scale."""
    try:
        y = predictor.predict(example_matrix())
    except Exception:
        log.exception("canned prediction failed")
        return False
    return y.shape == (1,) and bool(np.isfinite(y[0])) and 0.0 <= float(y[0]) <= 10.0
