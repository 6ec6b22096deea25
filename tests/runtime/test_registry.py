"""The model registry: registering, promoting, rolling back, challengers, and the users' assignment to variants."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest

from conftest import TinyVersions
from moviematch_ml.errors import RegistryError
from moviematch_ml.runtime.cards import read_card
from moviematch_ml.runtime.registry import (
    CHAMPION,
    REGISTRY_FILE,
    Registry,
    assign,
    directory_version,
    weights_with,
)


def test_the_first_model_registered_is_the_champion(tmp_path: Path, tiny_model_dir: Path, tiny: TinyVersions) -> None:
    registry = Registry(tmp_path / "reg")
    assert registry.read().champion is None  # nothing yet: an empty assignment, no file
    version, new = registry.register(tiny_model_dir)
    assert (version, new) == (tiny.model, True)
    assignment = registry.read()
    assert (assignment.champion, assignment.revision, assignment.variants()) == (
        tiny.model,
        1,
        [(CHAMPION, version, 1.0)],
    )
    # Copied whole, under its version: the service loads it from there.
    copied = registry.model_dir(version)
    assert copied == tmp_path / "reg" / "models" / version
    assert (copied / "model.txt").read_bytes() == (tiny_model_dir / "model.txt").read_bytes()
    assert directory_version(copied) == version
    # Registering the same model again changes nothing.
    assert registry.register(tiny_model_dir) == (version, False)
    assert registry.read().revision == 1


def test_a_model_that_does_not_load_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    with (broken / "model.txt").open("a") as f:
        f.write("\n")  # no longer the checksum its card records
    registry = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match=r"ModelChecksumError|does not match"):
        registry.register(broken)
    assert registry.models() == []
    assert not (tmp_path / "reg" / REGISTRY_FILE).exists()


def test_promote_rollback_challenge_end(
    tmp_path: Path, tiny_model_dir: Path, other_model_dir: Path, tiny_personalized_dir: Path
) -> None:
    registry = Registry(tmp_path / "reg")
    a, _ = registry.register(tiny_model_dir)
    b, _ = registry.register(other_model_dir)
    c, _ = registry.register(tiny_personalized_dir)
    assert len({a, b, c}) == 3
    assert registry.read().champion == a  # registering more changes no role
    registry.challenge("b", b, 0.25)
    registry.challenge("c", c[:12], 0.5)  # a unique prefix names a version
    assert registry.read().variants() == [(CHAMPION, a, 0.25), ("b", b, 0.25), ("c", c, 0.5)]
    with pytest.raises(RegistryError, match="less than 1"):
        registry.challenge("d", c, 0.3)  # 0.25 + 0.5 + 0.3: the champion would get nothing
    promoted = registry.promote("b")  # a variant's name names its version
    assert (promoted.champion, sorted(promoted.challengers)) == (b, ["c"])  # b's users go to the champion
    back = registry.rollback()
    assert (back.champion, sorted(back.challengers)) == (a, ["c"])
    assert registry.rollback().champion == b  # the champion before a was b: rolling back twice goes forth again
    ended = registry.end("c")
    assert ended.challengers == {}
    assert [e.action for e in ended.history] == [
        "register",
        "register",
        "register",
        "challenge",
        "challenge",
        "promote",
        "rollback",
        "rollback",
        "end",
    ]
    assert ended.revision == 9
    # The file is JSON a person can read.
    assert json.loads((tmp_path / "reg" / REGISTRY_FILE).read_text())["champion"] == b


def test_refusals_say_why(tmp_path: Path, tiny_model_dir: Path, other_model_dir: Path) -> None:
    registry = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()
    a, _ = registry.register(tiny_model_dir)
    b, _ = registry.register(other_model_dir)
    with pytest.raises(RegistryError, match="already the champion"):
        registry.promote(a)
    with pytest.raises(RegistryError, match="no model in the registry match 'nope'"):
        registry.promote("nope")
    with pytest.raises(RegistryError, match="2 models in the registry match 'model-'"):
        registry.promote("model-")
    with pytest.raises(RegistryError, match="is the champion"):
        registry.challenge("x", a, 0.1)
    for weight in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(RegistryError, match="weight"):
            registry.challenge("x", b, weight)
    for name in ("champion", "", "a b", "x" * 65):
        with pytest.raises(RegistryError, match="variant name"):
            registry.challenge(name, b, 0.1)
    with pytest.raises(RegistryError, match="no challenger named 'x'"):
        registry.end("x")
    (tmp_path / "reg" / REGISTRY_FILE).write_text("{not json")
    with pytest.raises(RegistryError, match="not a valid registry file"):
        registry.read()


def test_concurrent_changes_are_serialised(tmp_path: Path, tiny_model_dir: Path, other_model_dir: Path) -> None:
    registry = Registry(tmp_path / "reg")
    registry.register(tiny_model_dir)
    b, _ = registry.register(other_model_dir)
    errors: list[BaseException] = []

    def change(n: int) -> None:
        try:
            for k in range(10):
                Registry(tmp_path / "reg").challenge(f"v{n}", b, 0.01 + 0.001 * k)
        except BaseException as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=change, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # Every change was applied on top of the previous one: 2 registrations + 40 changes, none lost.
    assignment = registry.read()
    assert assignment.revision == 42
    assert sorted(assignment.challengers) == ["v0", "v1", "v2", "v3"]


def test_a_card_read_without_loading_gives_the_registry_version(
    tiny_personalized_dir: Path, tiny: TinyVersions
) -> None:
    assert directory_version(tiny_personalized_dir) == tiny.model_with_personalized
    assert read_card(tiny_personalized_dir).version == tiny.six


# --- the users' assignment to variants ----------------------------------------------------------------------------

USERS = [f"user-{i}" for i in range(20_000)]


def _assigned(weights: list[tuple[str, float]], salt: str = "s1") -> list[int]:
    return [assign(u, weights, salt) for u in USERS]


def test_each_variant_gets_its_share_and_a_user_always_the_same() -> None:
    weights = [(CHAMPION, 0.7), ("b", 0.2), ("c", 0.1)]
    first = _assigned(weights)
    assert first == _assigned(weights)  # the same users, the same variants: a hash, not a draw
    shares = [first.count(i) / len(USERS) for i in range(3)]
    # 20,000 users: a share's standard error is at most 0.0035; 0.015 is more than four of them.
    for share, (_, weight) in zip(shares, weights, strict=True):
        assert share == pytest.approx(weight, abs=0.015)
    # Another salt, another draw: about as many users keep their variant as chance gives (0.7^2 + 0.2^2 + 0.1^2).
    other = _assigned(weights, salt="s2")
    kept = sum(a == b for a, b in zip(first, other, strict=True)) / len(USERS)
    assert kept == pytest.approx(0.54, abs=0.02)


def test_changing_the_challenger_s_weight_moves_only_the_users_it_must() -> None:
    # An A/B test: one challenger. Going from 10% to 20% moves a tenth of the users, all from the champion to b.
    before = _assigned([(CHAMPION, 0.9), ("b", 0.1)])
    after = _assigned([(CHAMPION, 0.8), ("b", 0.2)])
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert {(x, y) for x, y in moved} == {(0, 1)}
    assert len(moved) / len(USERS) == pytest.approx(0.10, abs=0.015)
    # And back: the same users return, no one else moves (the assignment is a function of the weights).
    assert _assigned([(CHAMPION, 0.9), ("b", 0.1)]) == before
    # Ending it (weight 0) sends b's users, and only them, back to the champion.
    ended = _assigned([(CHAMPION, 1.0), ("b", 0.0)])
    assert set(ended) == {0}
    assert sum(x != y for x, y in zip(before, ended, strict=True)) == before.count(1)


def test_with_several_challengers_each_keeps_its_share_when_another_changes() -> None:
    before = _assigned([(CHAMPION, 0.8), ("b", 0.1), ("c", 0.1)])
    after = _assigned([(CHAMPION, 0.7), ("b", 0.2), ("c", 0.1)])
    assert after.count(2) / len(USERS) == pytest.approx(0.1, abs=0.015)  # c keeps its share
    # Users only move into b, or from the champion (whose share shrank) to c: never out of b, never c -> champion.
    moves = {(x, y) for x, y in zip(before, after, strict=True) if x != y}
    assert moves <= {(0, 1), (2, 1), (0, 2)}
    # How many moved: b's new tenth, plus the few users c takes from the champion to make up for those b took
    # from c (rendezvous hashing keeps shares exact, not every user of an unchanged variant in place).
    moved = sum(x != y for x, y in zip(before, after, strict=True)) / len(USERS)
    assert 0.10 <= moved < 0.13


def test_weights_from_the_environment_override_the_registry_s() -> None:
    variants = [(CHAMPION, "m-a", 0.7), ("b", "m-b", 0.3)]
    assert weights_with({"b": 0.1}, variants) == [(CHAMPION, "m-a", 0.9), ("b", "m-b", 0.1)]
    assert weights_with({}, variants) == [(CHAMPION, "m-a", pytest.approx(0.7)), ("b", "m-b", 0.3)]
    with pytest.raises(RegistryError, match="names no challenger"):
        weights_with({"z": 0.1}, variants)
