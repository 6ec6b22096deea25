"""ModelSet: both models of a directory loaded, each checked with a canned prediction, swapped in together, and
reported one by one (what /health says)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from conftest import TinyVersions
from moviematch_ml.errors import ModelChecksumError
from moviematch_ml.features import example_matrix
from moviematch_ml.online.models import NOT_LOADED, ModelReport, Models, ModelSet, load_personalized
from moviematch_ml.runtime.cards import (
    BUNDLED_MODEL_DIR,
    IMDB_GGPLOT2MOVIES,
    MOVIELENS_SMALL,
    DataSource,
    content_versioned,
    noncommercial_sources,
    read_card,
    write_card,
)
from moviematch_ml.runtime.fallback import FallbackPredictor
from moviematch_ml.runtime.personalized import PersonalizedModel
from moviematch_ml.runtime.predictor import load_six_features

FloatArray = npt.NDArray[np.float64]
FALLBACK_EXAMPLE = 7.909  # the fallback rule's answer to EXAMPLE, as GET /predict answers it


def _ok(version: str) -> dict[str, object]:
    return {"status": "ok", "version": version, "reason": None}


ABSENT: dict[str, object] = {"status": "absent", "version": None, "reason": None}


def test_nothing_answers_but_the_rule_before_load(tiny_personalized_dir: Path) -> None:
    models = ModelSet(tiny_personalized_dir)
    assert not models.ready
    current = models.current
    assert (current.six.source, current.personalized, current.status, current.reason) == (
        "fallback",
        None,
        "degraded",
        NOT_LOADED,
    )
    assert current.reports() == {
        "six_features": {"status": "starting", "version": FallbackPredictor.version, "reason": NOT_LOADED},
        "personalized": {"status": "starting", "version": None, "reason": NOT_LOADED},
    }


def test_both_models_of_a_directory_are_loaded(tiny_personalized_dir: Path, tiny: TinyVersions) -> None:
    models = ModelSet(tiny_personalized_dir)
    loaded = models.load()
    assert models.ready
    assert models.current is loaded
    assert (loaded.six.source, loaded.six.version, loaded.status, loaded.reason) == ("model", tiny.six, "ok", None)
    assert loaded.personalized is not None
    assert loaded.personalized.version == tiny.personalized
    assert loaded.reports() == {"six_features": _ok(tiny.six), "personalized": _ok(tiny.personalized)}
    # The six-feature model answers as the predictor of its directory does.
    x = example_matrix()
    np.testing.assert_array_equal(loaded.six.predict(x), load_six_features(tiny_personalized_dir).predict(x))
    summary = models.summary()
    assert (summary["version"], summary["source"], summary["status"], summary["name"]) == (
        tiny.model_with_personalized,
        "model",
        "ok",
        "tiny",
    )
    assert summary["rating_scale"] == {"min": 0.5, "max": 5.0, "step": 0.5}
    assert summary["created_at"] == "2026-01-01T00:00:00+00:00"
    # A path to the model card finds the same two models.
    by_card = ModelSet(tiny_personalized_dir / "model_card.json").load()
    assert by_card.reports() == loaded.reports()


def test_no_personalised_directory_is_absent_and_ok(tiny_model_dir: Path, tiny: TinyVersions) -> None:
    assert load_personalized(tiny_model_dir) is None
    loaded = ModelSet(tiny_model_dir).load()
    assert (loaded.personalized, loaded.status, loaded.reason) == (None, "ok", None)
    assert loaded.reports() == {"six_features": _ok(tiny.six), "personalized": ABSENT}


def test_a_missing_model_directory_leaves_the_fallback_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moviematch_ml")
    models = ModelSet(tmp_path / "missing")
    loaded = models.load()
    assert models.ready  # loaded: degraded, not starting
    assert (loaded.six.source, loaded.status, loaded.personalized) == ("fallback", "degraded", None)
    reason = loaded.six_report.reason
    assert reason is not None
    assert reason.startswith("model not loaded, answering with the fallback rule: ModelNotFoundError: ")
    assert loaded.reason == reason
    assert loaded.reports() == {
        "six_features": {"status": "fallback", "version": FallbackPredictor.version, "reason": reason},
        "personalized": ABSENT,
    }
    assert float(loaded.six.predict(example_matrix())[0]) == pytest.approx(FALLBACK_EXAMPLE, abs=5e-4)
    summary = models.summary()
    assert (summary["source"], summary["status"], summary["reason"]) == ("fallback", "degraded", reason)
    assert "name" not in summary  # no card to describe
    failed = [r for r in caplog.records if r.getMessage() == "model load failed"]
    assert [r.levelno for r in failed] == [logging.ERROR]


def _copy(directory: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "models"
    shutil.copytree(directory, copy)
    return copy


def test_a_corrupt_personalised_model_is_refused_and_the_six_feature_model_answers(
    tiny_personalized_dir: Path, tmp_path: Path, tiny: TinyVersions
) -> None:
    directory = _copy(tiny_personalized_dir, tmp_path)
    state = directory / "personalized" / "state.npz"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped: its sha256 is no longer the card's
    state.write_bytes(bytes(data))
    with pytest.raises(ModelChecksumError, match=r"state\.npz"):
        load_personalized(directory)
    loaded = ModelSet(directory).load()
    assert loaded.personalized is None
    reason = loaded.personalized_report.reason
    assert reason is not None
    assert reason.startswith("personalised model not loaded: ModelChecksumError: ")
    assert "state.npz" in reason
    assert (loaded.status, loaded.reason) == ("degraded", reason)
    assert loaded.reports() == {
        "six_features": _ok(tiny.six),
        "personalized": {"status": "refused", "version": None, "reason": reason},
    }
    assert (loaded.six.source, loaded.six.version) == ("model", tiny.six)  # still answers
    x = example_matrix()
    np.testing.assert_array_equal(loaded.six.predict(x), load_six_features(tiny_personalized_dir).predict(x))


class NaNBooster:
    """Trees that answer NaN for every row (as a model broken in a way its checksum cannot see would)."""

    def predict(self, x: FloatArray, num_threads: int = 1) -> FloatArray:
        return np.full(x.shape[0], np.nan)


class RaisingBooster:
    def predict(self, x: FloatArray, num_threads: int = 1) -> FloatArray:
        raise RuntimeError("the trees are broken")


@pytest.mark.parametrize("booster", [NaNBooster(), RaisingBooster()], ids=["nan", "raises"])
def test_a_personalised_model_whose_canned_prediction_fails_is_refused(
    tiny_personalized_dir: Path, booster: object, tiny: TinyVersions
) -> None:
    good = PersonalizedModel.load(tiny_personalized_dir / "personalized")

    def broken(path: Path) -> PersonalizedModel:
        model = PersonalizedModel(good.config, good.state, booster, good.scale)
        model.card = good.card
        return model

    loaded = ModelSet(tiny_personalized_dir, load_personal=broken).load()
    reason = "personalised model loaded but its canned prediction failed"
    assert loaded.personalized is None
    assert loaded.personalized_report == ModelReport("refused", tiny.personalized, reason)
    assert (loaded.status, loaded.reason) == ("degraded", reason)
    assert loaded.reports()["six_features"] == _ok(tiny.six)


class Answers:
    """A six-feature predictor answering ``rating`` (or raising when it is None)."""

    source = "model"
    version = "odd-1"

    def __init__(self, rating: float | None) -> None:
        self.rating = rating

    def predict(self, x: FloatArray) -> FloatArray:
        if self.rating is None:
            raise RuntimeError("cannot answer")
        return np.full(x.shape[0], self.rating)


@pytest.mark.parametrize("rating", [np.nan, 11.0, -1.0, None])
def test_a_six_feature_model_whose_canned_prediction_fails_leaves_the_fallback(
    tiny_model_dir: Path, rating: float | None
) -> None:
    loaded = ModelSet(tiny_model_dir, load_six=lambda path: Answers(rating)).load()
    reason = "model loaded but its canned prediction failed"
    assert loaded.six_report == ModelReport("fallback", FallbackPredictor.version, reason)
    assert (loaded.six.source, loaded.status, loaded.reason) == ("fallback", "degraded", reason)
    fine = ModelSet(tiny_model_dir, load_six=lambda path: Answers(7.0)).load()
    assert (fine.six.version, fine.status, fine.six_report.card) == ("odd-1", "ok", None)  # no card: none reported


def test_a_loader_that_fails_unexpectedly_leaves_the_fallback(tiny_model_dir: Path) -> None:
    def no_library(path: Path) -> Answers:
        raise OSError("libgomp.so.1: cannot open shared object file")

    loaded = ModelSet(tiny_model_dir, load_six=no_library).load()
    assert loaded.six.source == "fallback"
    assert loaded.reason == (
        "model not loaded, answering with the fallback rule: OSError: libgomp.so.1: cannot open shared object file"
    )


def test_swap_replaces_both_models_at_once(tiny_personalized_dir: Path, tiny: TinyVersions) -> None:
    models = ModelSet(tiny_personalized_dir)
    first = models.load()
    held = models.current  # what a request in flight read
    loaded_at = models.loaded_at
    assert loaded_at is not None
    rule = FallbackPredictor()
    second = Models(rule, None, ModelReport("fallback", rule.version, "replaced"), ModelReport("absent", None, None))
    models.swap(second)
    assert models.current is second
    assert (models.current.six, models.current.personalized) == (rule, None)
    assert models.current.reports() == {
        "six_features": {"status": "fallback", "version": rule.version, "reason": "replaced"},
        "personalized": ABSENT,
    }
    assert models.summary()["source"] == "fallback"
    assert models.loaded_at is not None
    assert models.loaded_at >= loaded_at
    # The snapshot read before the swap still holds the pair it was read with.
    assert held is first
    assert held.personalized is not None
    assert (held.six.version, held.personalized.version) == (tiny.six, tiny.personalized)
    # Loading again (a reload) swaps in fresh models of the directory, both of them.
    again = models.load()
    assert models.current is again
    assert again.personalized is not None
    assert again.personalized is not first.personalized
    assert again.reports() == first.reports()


def test_model_set_states(tiny_model_dir: Path, tiny: TinyVersions) -> None:
    m = ModelSet(tiny_model_dir)
    assert (m.current.status, m.ready, m.current.six.source) == ("degraded", False, "fallback")
    assert str(m.current.reason).startswith("starting")
    loaded = m.load()  # loads, checks each model with a canned prediction, swaps them in
    assert m.current is loaded
    assert (m.current.status, m.current.reason, m.current.six.version) == ("ok", None, tiny.six)
    assert m.ready is True
    assert m.current.reports() == {
        "six_features": {"status": "ok", "version": tiny.six, "reason": None},
        "personalized": {"status": "absent", "version": None, "reason": None},
    }
    again = ModelSet(tiny_model_dir).load()
    m.swap(again)
    assert m.current is again
    assert m.summary()["name"] == "tiny"


# --- models trained on data whose terms forbid commercial use (SERVE_NONCOMMERCIAL_MODELS) ---------------------

OWN_DATA = DataSource(
    name="the app's own ratings", publisher="the app", obtained="its store", terms="the app's", commercial_use=None
)


def _with_terms(directory: Path, tmp_path: Path, six: list[DataSource], personal: list[DataSource]) -> Path:
    """A copy of both tiny models whose cards name the given training data (the model files are unchanged)."""
    copy = _copy(directory, tmp_path)
    for folder, terms in ((copy, six), (copy / "personalized", personal)):
        # A card names its model by its content: other terms, another version.
        write_card(folder, content_versioned(read_card(folder).model_copy(update={"data_terms": terms})))
    return copy


def test_the_bundled_models_state_their_data_and_its_terms() -> None:
    for folder in (BUNDLED_MODEL_DIR, BUNDLED_MODEL_DIR / "personalized"):
        card = read_card(folder)
        assert card.data_terms == [MOVIELENS_SMALL, IMDB_GGPLOT2MOVIES]
        assert noncommercial_sources(card) == [MOVIELENS_SMALL]
    assert MOVIELENS_SMALL.commercial_use is False
    assert "no commercial or revenue-bearing use without permission" in MOVIELENS_SMALL.terms
    assert IMDB_GGPLOT2MOVIES.commercial_use is None  # its documentation states no terms for the data


def test_a_card_from_before_data_terms_that_names_movielens_counts_as_movielens(tiny_model_dir: Path) -> None:
    card = read_card(tiny_model_dir)
    assert (card.data_terms, noncommercial_sources(card)) == ([], [])
    legacy = card.model_copy(update={"data": {"dataset": "movielens-small"}})
    assert noncommercial_sources(legacy) == [MOVIELENS_SMALL]
    own = card.model_copy(update={"data": {"dataset": "movielens-small"}, "data_terms": [OWN_DATA]})
    assert noncommercial_sources(own) == []  # stated terms win over the data set's name


def test_models_of_noncommercial_data_are_served_by_default(
    tiny_personalized_dir: Path, tmp_path: Path, tiny: TinyVersions
) -> None:
    directory = _with_terms(tiny_personalized_dir, tmp_path, [MOVIELENS_SMALL], [MOVIELENS_SMALL])
    loaded = ModelSet(directory).load()
    six, personal = read_card(directory).version, read_card(directory / "personalized").version
    assert (six, personal) != (tiny.six, tiny.personalized)  # other cards, other versions
    assert loaded.reports() == {"six_features": _ok(six), "personalized": _ok(personal)}


def test_without_noncommercial_models_both_are_refused_and_the_rule_answers(
    tiny_personalized_dir: Path, tmp_path: Path
) -> None:
    directory = _with_terms(tiny_personalized_dir, tmp_path, [MOVIELENS_SMALL, IMDB_GGPLOT2MOVIES], [MOVIELENS_SMALL])
    six_version, personal_version = read_card(directory).version, read_card(directory / "personalized").version
    loaded = ModelSet(directory, noncommercial=False).load()
    assert (loaded.six.source, loaded.personalized, loaded.status) == ("fallback", None, "degraded")
    six_reason, personal_reason = loaded.six_report.reason, loaded.personalized_report.reason
    assert six_reason == (
        f"model not loaded, answering with the fallback rule: ModelTermsError: {six_version} was trained on data "
        f"whose terms forbid commercial use without permission: {MOVIELENS_SMALL.name} ({MOVIELENS_SMALL.publisher}); "
        "SERVE_NONCOMMERCIAL_MODELS is false (train on your own data: docs/training.md#data-and-terms)"
    )
    assert personal_reason is not None
    assert personal_reason.startswith(f"personalised model not loaded: ModelTermsError: {personal_version} was ")
    assert loaded.reports() == {
        "six_features": {"status": "fallback", "version": FallbackPredictor.version, "reason": six_reason},
        "personalized": {"status": "refused", "version": None, "reason": personal_reason},
    }
    assert float(loaded.six.predict(example_matrix())[0]) == pytest.approx(FALLBACK_EXAMPLE, abs=5e-4)


def test_without_noncommercial_models_the_apps_own_models_answer(tiny_personalized_dir: Path, tmp_path: Path) -> None:
    # A model trained with --from-feedback (or on the app's CSVs) states its data, with no commercial restriction.
    directory = _with_terms(tiny_personalized_dir, tmp_path, [OWN_DATA], [OWN_DATA])
    six_version, personal_version = read_card(directory).version, read_card(directory / "personalized").version
    loaded = ModelSet(directory, noncommercial=False).load()
    assert loaded.reports() == {"six_features": _ok(six_version), "personalized": _ok(personal_version)}
    # Only the personalised model restricted: it alone is refused, the six-feature model answers everyone.
    mixed = _with_terms(tiny_personalized_dir, tmp_path / "mixed", [OWN_DATA], [MOVIELENS_SMALL])
    loaded = ModelSet(mixed, noncommercial=False).load()
    assert (loaded.six.version, loaded.personalized_report.status) == (read_card(mixed).version, "refused")
    assert loaded.personalized is None
