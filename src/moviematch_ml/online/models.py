"""The models the service answers with: loaded, checked, swapped in together, and reported one by one.

A ``Models`` snapshot holds the six-feature predictor (the trained model, or the fallback rule with the reason
why) and the personalised model (or none), each with its report, and the version of the model directory they came
from. A ``Lineup`` holds the champion's ``Models`` and the challengers' (A/B variants, from a model registry).
``ModelSet.lineup`` is replaced whole by one attribute assignment, so a request that reads it once answers with
one consistent set, and ``/health`` reports one consistent state, even while another thread reloads.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import numpy as np

from moviematch_ml.errors import ModelError, ModelTermsError, RegistryError
from moviematch_ml.features import example_matrix
from moviematch_ml.runtime.cards import (
    APP_SPACE,
    BUNDLED_MODEL_DIR,
    PERSONALIZED_DIR,
    ModelCard,
    model_version,
    noncommercial_sources,
)
from moviematch_ml.runtime.fallback import FallbackPredictor
from moviematch_ml.runtime.personalized import PersonalizedModel
from moviematch_ml.runtime.predictor import Predictor, load_six_features
from moviematch_ml.runtime.registry import CHAMPION, Registry, assign, directory_version, weights_with

log = logging.getLogger(__name__)

Status = Literal["ok", "degraded"]
# ok: loaded and answering; fallback: the six-feature model did not load, the rule answers; absent: there is no
# personalised model (normal: the six-feature model answers everyone); refused: present but not loadable or its
# canned prediction failed; starting: nothing loaded yet.
ModelStatus = Literal["ok", "fallback", "absent", "refused", "starting"]
NOT_LOADED: Final[str] = "starting: the model has not been loaded yet"
# An absolute path in a message (not a URL's, nor a relative path's slashes): group 1 is its last part.
_ABSOLUTE_PATH: Final[re.Pattern[str]] = re.compile(r"(?<![\w.:/~-])/(?:[^\s/:'\",;()]+/)*([^\s/:'\",;()]+)")


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
    """One consistent set of what answers: read it once per request.

    ``version`` names the model directory (``cards.model_version`` of both cards: what answers report as
    ``model_version``, and what the registry and the A/B reports know the model by); the fallback rule's is its own.
    Left empty, it is computed from the parts that loaded.
    """

    six: Predictor  # the trained six-feature model, or the fallback rule
    personalized: PersonalizedModel | None
    six_report: ModelReport
    personalized_report: ModelReport
    version: str = ""

    def __post_init__(self) -> None:
        if self.six.source == "fallback" and self.personalized is None:
            object.__setattr__(self, "version", self.six.version)  # the rule alone answers: it names itself
        elif not self.version:
            personal = None if self.personalized is None else self.personalized.version
            object.__setattr__(self, "version", model_version(self.six.version, personal))

    @property
    def healthy(self) -> bool:
        """Every part the directory holds loaded and answers."""
        return self.six_report.status == "ok" and self.personalized_report.status in ("ok", "absent")

    @property
    def status(self) -> Status:
        """ok when the six-feature model answers and no personalised model was refused."""
        return "ok" if self.healthy else "degraded"

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


@dataclass(frozen=True, slots=True)
class Variant:
    """A challenger: a model served to a share of the users."""

    name: str
    weight: float
    models: Models


@dataclass(frozen=True, slots=True)
class Lineup:
    """What answers: the champion, and the challengers with their shares of the users (``runtime/registry.py``)."""

    champion: Models
    challengers: tuple[Variant, ...] = ()
    salt: str = ""
    revision: int | None = None  # the registry's, when it came from one
    weights: tuple[tuple[str, float], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        rest = 1.0 - sum(v.weight for v in self.challengers)
        object.__setattr__(self, "weights", ((CHAMPION, rest), *((v.name, v.weight) for v in self.challengers)))

    def pick(self, user_id: str | int | None) -> tuple[str, Models]:
        """The variant that answers a request: the champion without a user id or challengers, else the user's."""
        if user_id is None or not self.challengers:
            return CHAMPION, self.champion
        i = assign(str(user_id), self.weights, self.salt)
        return (CHAMPION, self.champion) if i == 0 else (self.challengers[i - 1].name, self.challengers[i - 1].models)

    def variants(self) -> list[dict[str, object]]:
        """Each variant's name, share of users, model version and status (``GET /``, ``/admin/reload``)."""
        out: list[dict[str, object]] = []
        for (name, weight), models in zip(self.weights, self.models(), strict=True):
            out.append(
                {"name": name, "weight": round(weight, 6), "model_version": models.version, "status": models.status}
            )
        return out

    def models(self) -> list[Models]:
        return [self.champion, *(v.models for v in self.challengers)]

    def personalized_models(self) -> list[PersonalizedModel]:
        """The personalised models served, the champion's first, each once."""
        out: list[PersonalizedModel] = []
        for models in self.models():
            if models.personalized is not None and all(m is not models.personalized for m in out):
                out.append(models.personalized)
        return out


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What a reload did: swapped in the new lineup, or kept the old one and why."""

    reloaded: bool
    lineup: Lineup
    reason: str | None = None


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
    # A model without movie-side state (another id space: PersonalizedModel.without_movie_state) knows no movie.
    ids = list(model.mf.item_ids[:3]) or ["canned-1", "canned-2", "canned-3"]
    view = model.user_view_of_ratings(ids, [model.scale.max] * len(ids), [0.0, 1.0, 2.0][: len(ids)])
    if view is None:
        raise ModelError("the canned user has no view")
    pred, _ = model.predict(view, example_matrix(), ids[:1], model.movie_table(), now=3.0)
    return float(pred[0])


class ModelSet:
    """Loads the models, checks each with a canned prediction, and swaps them in together.

    The models come from ``model_path`` (the six-feature model, and its ``personalized/`` directory), or from a model
    registry (``runtime/registry.py``): its champion, and its challengers as A/B variants, with the registry's
    weights unless ``weights`` overrides some (``VARIANT_WEIGHTS``) and its salt unless ``salt`` does.

    At start (``load``), a six-feature model that cannot be loaded or answered leaves the fallback rule answering,
    with the reason; a personalised model that cannot is left out (the six-feature model answers everyone), with
    the reason; a challenger that cannot is left out. Any of these makes the service ``degraded`` in ``/health``.
    A reload (``reload``: ``POST /admin/reload``, SIGHUP, a change of the registry file) is stricter: unless every
    model of the new lineup loads whole, nothing changes and the reason is returned. With ``noncommercial=False``
    (``SERVE_NONCOMMERCIAL_MODELS``) a model whose card says its training data forbids commercial use is refused
    the same way.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        registry: Registry | None = None,
        weights: Mapping[str, float] | None = None,
        salt: str | None = None,
        load_six: Callable[[Path], Predictor] = load_six_features,
        load_personal: Callable[[Path], PersonalizedModel | None] = load_personalized,
        noncommercial: bool = True,
        movie_id_space: str = APP_SPACE,
    ) -> None:
        self.path = model_path
        # Whose movie ids the requests carry (MOVIE_ID_SPACE): a personalised model trained in another space
        # serves without its movie-side state (PersonalizedModel.without_movie_state).
        self.movie_id_space = movie_id_space
        self.registry = registry
        self.weights = dict(weights or {})
        self.salt = salt
        self.noncommercial = noncommercial
        self._load_six = load_six
        self._load_personal = load_personal
        self.lineup = Lineup(_starting())
        self.ready = False
        self.loaded_at: float | None = None
        self.registry_stamp: tuple[int, int] | None = None
        self._reloading = threading.Lock()
        # Told of every swap, after it (the metrics: each model's info, readiness and drift bins).
        self.listeners: list[Callable[[Models], None]] = []

    @property
    def current(self) -> Models:
        """The champion's models (what answers requests without a user id)."""
        return self.lineup.champion

    def load(self) -> Models:
        """Load, check and swap in the models; never raises for a bad model (see the class)."""
        with self._reloading:
            lineup = self._build(strict=False, reuse={})
            self.swap_lineup(lineup)
        self.ready = True
        return lineup.champion

    def reload(self) -> ReloadOutcome:
        """Load the current assignment again and swap it in if every model of it loads whole; else keep the lineup
        in service and say why. One reload at a time; models whose version is already loaded are reused."""
        with self._reloading:
            old = self.lineup
            reuse = {m.version: m for m in old.models() if m.healthy}
            try:
                lineup = self._build(strict=True, reuse=reuse)
            except (ModelError, RegistryError) as exc:
                reason = self._public(str(exc))
                log.error("reload refused, the models in service are kept", extra={"reason": reason})
                return ReloadOutcome(False, old, reason)
            self.swap_lineup(lineup)
            self.ready = True
            return ReloadOutcome(True, lineup)

    def registry_changed(self) -> bool:
        """Whether the registry file changed since the lineup was built from it (a stat, no read)."""
        return self.registry is not None and self.registry.stamp() != self.registry_stamp

    def swap(self, models: Models) -> None:
        """Make ``models`` the only ones that answer."""
        self.swap_lineup(Lineup(models))

    def swap_lineup(self, lineup: Lineup) -> None:
        """Make ``lineup`` the one that answers."""
        self.lineup = lineup
        self.loaded_at = time.time()
        models = lineup.champion
        log.info(
            "models loaded",
            extra={
                "status": models.status,
                "model_version": models.version,
                "variants": [f"{v['name']}={v['model_version']}@{v['weight']}" for v in lineup.variants()],
                "revision": lineup.revision,
                "reason": models.reason,
            },
        )
        for listener in self.listeners:
            try:
                listener(models)
            except Exception:  # the models answer whatever a listener does
                log.exception("model swap listener failed")

    # --- building a lineup ----------------------------------------------------------------------------------------

    def _build(self, *, strict: bool, reuse: dict[str, Models]) -> Lineup:
        registry = self.registry
        if registry is None:
            return Lineup(self._directory(self.path, strict=strict, reuse=reuse))
        stamp = registry.stamp()
        assignment = registry.read()
        variants = assignment.variants()
        if not variants:
            # An empty registry (nothing registered yet) serves MODEL_PATH, or the bundled model.
            log.warning("the model registry has no champion yet: serving MODEL_PATH", extra={"revision": 0})
            self.registry_stamp = stamp
            return Lineup(self._directory(self.path, strict=strict, reuse=reuse))
        variants = weights_with(self.weights, variants)
        champion = self._directory(registry.model_dir(variants[0][1]), strict=strict, reuse=reuse)
        challengers = []
        for name, version, weight in variants[1:]:
            try:
                models = self._directory(registry.model_dir(version), strict=True, reuse=reuse)
            except (ModelError, RegistryError) as exc:
                if strict:
                    raise ModelError(f"challenger {name} ({version}): {exc}") from exc
                log.error("challenger left out", extra={"variant": name, "model_version": version, "reason": str(exc)})
                continue
            challengers.append(Variant(name, weight, models))
        self.registry_stamp = stamp
        return Lineup(champion, tuple(challengers), self.salt or assignment.salt, assignment.revision)

    def _directory(self, path: Path, *, strict: bool, reuse: dict[str, Models]) -> Models:
        """The models of one directory. ``strict``: raise ModelError unless every part loads (no fallback)."""
        version = _directory_version(path)
        if version is not None and version in reuse:
            return reuse[version]
        six, six_report = self._six(path)
        personal, personal_report = self._personalized(path)
        models = Models(six, personal, six_report, personal_report, version or "")
        if strict and not models.healthy:
            raise ModelError(models.reason or f"{path.name} did not load")
        return models

    def _six(self, path: Path) -> tuple[Predictor, ModelReport]:
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

    def _personalized(self, path: Path) -> tuple[PersonalizedModel | None, ModelReport]:
        try:
            model = self._load_personal(path)
            if model is not None and model.card is not None:
                self._check_terms(model.card)
        except Exception as exc:
            reason = f"personalised model not loaded: {type(exc).__name__}: {exc}"
            log.error("personalised model not loaded", extra={"model_path": str(path), "reason": reason})
            return None, ModelReport("refused", None, self._public(reason))
        if model is None:
            return None, ModelReport("absent", None)
        space = model.card.id_space() if model.card is not None else APP_SPACE
        if space != self.movie_id_space:
            log.warning(
                "personalised model trained in another movie id space: its movie-side state is not used",
                extra={"model_version": model.version, "model_space": space, "movie_id_space": self.movie_id_space},
            )
            model = model.without_movie_state()
        try:
            y = canned_personalized(model)
            ok = math.isfinite(y) and 0.0 <= y <= 10.0
        except Exception:
            log.exception("canned personalised prediction failed")
            ok = False
        if not ok:
            reason = "personalised model loaded but its canned prediction failed"
            log.error("personalised model not loaded", extra={"model_path": str(path), "reason": reason})
            return None, ModelReport("refused", model.version, reason)
        return model, ModelReport("ok", model.version, None, model.card)

    def _public(self, reason: str) -> str:
        """A reason as /health shows it, with no absolute path (the log has them; the answers of a public URL should
        not tell the machine's layout): the model's path is named MODEL_PATH (the directory of a model card it names,
        MODEL_PATH/..), the registry's MODEL_REGISTRY, and any other absolute path is cut to its file name."""
        path = self.path
        resolved = path.resolve()
        where = "the bundled model" if resolved == BUNDLED_MODEL_DIR.resolve() else "MODEL_PATH"
        names = {str(p): where for p in (path, resolved)}
        if not path.is_dir():  # a model card's path (or nothing): its directory holds the model's other files
            names.update({str(p.parent): f"{where}/.." for p in (path, resolved) if p.parent != p.parent.parent})
        if self.registry is not None:
            root = self.registry.root
            names.update({str(p): "MODEL_REGISTRY" for p in (root, root.resolve())})
        for spelling in sorted(names, key=len, reverse=True):  # the longest first: a path before its directory
            if len(Path(spelling).parts) > 1:  # "/srv/model", "models/six": no word of a message looks like it
                reason = reason.replace(spelling, names[spelling])
            else:
                # One relative name ("model") may also be a word of the message: replaced only where it stands as a
                # path, at the start of a token and followed by a slash, a quote or the end.
                pattern = rf"(?<![^\s'\"(]){re.escape(spelling)}(?=/|['\"]|$)"
                reason = re.sub(pattern, names[spelling].replace("\\", r"\\"), reason)
        return _ABSOLUTE_PATH.sub(lambda m: m.group(1), reason)

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
        """What ``GET /`` says of the models: the champion in detail (``model``), and each model."""
        current = self.current
        six = current.six
        out: dict[str, object] = {
            "version": current.version,
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


def _directory_version(path: Path) -> str | None:
    """A model directory's version from its cards, or None when they cannot be read (the load then says why)."""
    try:
        return directory_version(path if path.is_dir() else path.parent)
    except (ModelError, OSError):
        return None


def _answers(predictor: Predictor) -> bool:
    """Whether the predictor answers the canned example with a finite rating on the 0-10 scale."""
    try:
        y = predictor.predict(example_matrix())
    except Exception:
        log.exception("canned prediction failed")
        return False
    return y.shape == (1,) and bool(np.isfinite(y[0])) and 0.0 <= float(y[0]) <= 10.0
