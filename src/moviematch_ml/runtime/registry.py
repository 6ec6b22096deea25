"""The model registry: model directories by version in one folder, which one is the champion, which are challengers.

A registry is a directory (a local disk, or a volume every replica mounts)::

    registry.json            the assignment: champion, challengers and their traffic weights, the experiment salt
    models/<version>/        a registered model directory (model_card.json, model.txt, personalized/...), never
                             changed once written: its name is its content's version (cards.model_version)

``registry.json`` is replaced whole (written aside, then renamed) under a lock, so a reader sees the old assignment
or the new one, never half of each; its ``revision`` grows by one with every change. The service reads it at start,
on ``POST /admin/reload`` and SIGHUP, and whenever its modification time changes (``REGISTRY_POLL_SECONDS``).

A user is assigned to a variant by weighted rendezvous hashing of the experiment salt, the variant's name and the
user id: the same user gets the same variant in every process and after every restart, and each variant gets its
weight's share of users. With one challenger, changing its weight moves exactly the users it must, between it and
the champion (tests/runtime/test_registry.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moviematch_ml.errors import ModelError, RegistryError
from moviematch_ml.runtime.cards import CARD_NAME, PERSONALIZED_DIR, ModelCard, model_version, read_card
from moviematch_ml.runtime.personalized import PersonalizedModel
from moviematch_ml.runtime.predictor import load_six_features

REGISTRY_FILE: Final[str] = "registry.json"
MODELS_DIR: Final[str] = "models"
LOCK_FILE: Final[str] = ".lock"
# The variant every request without a user id, and every user outside the challengers' shares, is answered by.
CHAMPION: Final[str] = "champion"
NAME_RULE: Final[str] = "must be 1-64 letters, digits, '-' or '_', and not 'champion'"
_NAME_CHARS: Final[frozenset[str]] = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class Challenger(BaseModel):
    """A model served to a share of the users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    weight: float = Field(gt=0.0, lt=1.0, description="The share of users (with a user id) it answers.")


class Event(BaseModel):
    """One change of the assignment, for ``models list`` and rollbacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: str
    action: Literal["register", "promote", "rollback", "challenge", "end"]
    version: str | None = None
    variant: str | None = None
    previous: str | None = None


class Assignment(BaseModel):
    """``registry.json``: what answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    revision: int = 0
    champion: str | None = None
    challengers: dict[str, Challenger] = Field(default_factory=dict)
    salt: str = Field(default_factory=lambda: os.urandom(8).hex(), min_length=1)
    history: list[Event] = Field(default_factory=list)

    def variants(self) -> list[tuple[str, str, float]]:
        """(name, version, weight) of every variant, the champion first with the weight the challengers leave."""
        if self.champion is None:
            return []
        rest = 1.0 - sum(c.weight for c in self.challengers.values())
        out = [(CHAMPION, self.champion, rest)]
        out.extend((name, c.version, c.weight) for name, c in sorted(self.challengers.items()))
        return out

    def previous_champion(self) -> str | None:
        """The champion before the current one (what ``rollback`` goes back to)."""
        for event in reversed(self.history):
            if event.action in ("promote", "rollback") and event.version == self.champion:
                return event.previous
        return None


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    """A model of the registry, with its cards."""

    version: str
    path: Path
    six: ModelCard
    personalized: ModelCard | None


def check_name(name: str) -> str:
    if not (0 < len(name) <= 64 and set(name) <= _NAME_CHARS and name != CHAMPION):
        raise RegistryError(f"variant name {name!r} {NAME_RULE}")
    return name


def directory_version(path: Path) -> str:
    """The version of a model directory from its cards (without loading the models)."""
    six = read_card(path)
    personal = path / PERSONALIZED_DIR
    return model_version(six.version, read_card(personal).version if (personal / CARD_NAME).is_file() else None)


def verify_model(path: Path) -> str:
    """Load every part of a model directory, which checks every file against its card's checksum and each card's
    version against its content; the directory's version. Raises ModelError."""
    six = load_six_features(path)
    personal = path / PERSONALIZED_DIR
    version = None
    if (personal / CARD_NAME).is_file():
        version = PersonalizedModel.load(personal).version
    return model_version(six.version, version)


class Registry:
    """A registry directory (see the module)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def file(self) -> Path:
        return self.root / REGISTRY_FILE

    def read(self) -> Assignment:
        """The current assignment (an empty one when nothing was registered yet)."""
        try:
            raw = self.file.read_bytes()
        except FileNotFoundError:
            return Assignment(salt="unset")
        except OSError as exc:
            raise RegistryError(f"cannot read {REGISTRY_FILE}: {exc.strerror}") from exc
        try:
            return Assignment.model_validate_json(raw)
        except ValidationError as exc:
            raise RegistryError(f"{REGISTRY_FILE} is not a valid registry file: {exc.errors()[0]['msg']}") from None

    def stamp(self) -> tuple[int, int] | None:
        """What changes when the assignment does (modification time and size), without reading it; None if absent."""
        try:
            st = self.file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def model_dir(self, version: str) -> Path:
        path = self.root / MODELS_DIR / version
        if not (path / CARD_NAME).is_file():
            raise RegistryError(f"no model {version} in the registry")
        return path

    def models(self) -> list[RegisteredModel]:
        """Every registered model, oldest first."""
        folder = self.root / MODELS_DIR
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            if not (path / CARD_NAME).is_file():
                continue
            personal = path / PERSONALIZED_DIR
            pcard = read_card(personal) if (personal / CARD_NAME).is_file() else None
            out.append(RegisteredModel(path.name, path, read_card(path), pcard))
        return out

    def resolve(self, name_or_version: str) -> str:
        """A version, from itself, a unique prefix of it, or a variant's name."""
        assignment = self.read()
        if name_or_version == CHAMPION and assignment.champion is not None:
            return assignment.champion
        if name_or_version in assignment.challengers:
            return assignment.challengers[name_or_version].version
        found = [m.version for m in self.models() if m.version.startswith(name_or_version)]
        if len(found) != 1:
            what = "no model" if not found else f"{len(found)} models"
            raise RegistryError(f"{what} in the registry match {name_or_version!r}")
        return found[0]

    # --- changes --------------------------------------------------------------------------------------------------

    def register(self, source: Path) -> tuple[str, bool]:
        """Copy a model directory into the registry after loading it (checksums, versions); (its version, whether it
        was new). Registering the same model again changes nothing. The first model registered becomes the champion."""
        try:
            version = verify_model(source)
        except ModelError as exc:
            raise RegistryError(f"refused {source.name}: {exc}") from exc
        target = self.root / MODELS_DIR / version
        new = not (target / CARD_NAME).is_file()
        if new:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Copied aside, then renamed: a reader never sees half a model.
            staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target.parent))
            try:
                shutil.copytree(source, staging, dirs_exist_ok=True)
                with contextlib.suppress(FileExistsError, OSError):
                    staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if not (target / CARD_NAME).is_file():
                raise RegistryError(f"could not write {MODELS_DIR}/{version}")

        def first_is_champion(a: Assignment) -> Assignment:
            event = Event(at=_now(), action="register", version=version)
            if a.champion is None:
                return a.model_copy(update={"champion": version, "history": [*a.history, event]})
            return a.model_copy(update={"history": [*a.history, event]}) if new else a

        self._update(first_is_champion)
        return version, new

    def promote(self, name_or_version: str) -> Assignment:
        """Make a model the champion; a challenger serving it stops being one (its users go to the champion)."""
        version = self.resolve(name_or_version)

        def change(a: Assignment) -> Assignment:
            if a.champion == version:
                raise RegistryError(f"{version} is already the champion")
            rest = {n: c for n, c in a.challengers.items() if c.version != version}
            event = Event(at=_now(), action="promote", version=version, previous=a.champion)
            return a.model_copy(update={"champion": version, "challengers": rest, "history": [*a.history, event]})

        return self._update(change)

    def rollback(self) -> Assignment:
        """Make the previous champion the champion again."""

        def change(a: Assignment) -> Assignment:
            previous = a.previous_champion()
            if previous is None:
                raise RegistryError("no earlier champion to roll back to")
            event = Event(at=_now(), action="rollback", version=previous, previous=a.champion)
            return a.model_copy(update={"champion": previous, "history": [*a.history, event]})

        return self._update(change)

    def challenge(self, name: str, name_or_version: str, weight: float) -> Assignment:
        """Serve a model to ``weight`` of the users as variant ``name`` (or change that variant's model or weight)."""
        check_name(name)
        version = self.resolve(name_or_version)
        if not 0.0 < weight < 1.0 or not math.isfinite(weight):
            raise RegistryError(f"weight must be between 0 and 1, exclusive (got {weight})")

        def change(a: Assignment) -> Assignment:
            if version == a.champion:
                raise RegistryError(f"{version} is the champion")
            challengers = {**a.challengers, name: Challenger(version=version, weight=weight)}
            if sum(c.weight for c in challengers.values()) >= 1.0:
                raise RegistryError("the challengers' weights must add up to less than 1 (the champion keeps the rest)")
            event = Event(at=_now(), action="challenge", version=version, variant=name)
            return a.model_copy(update={"challengers": challengers, "history": [*a.history, event]})

        return self._update(change)

    def end(self, name: str) -> Assignment:
        """Stop serving variant ``name`` (its users go back to the champion)."""

        def change(a: Assignment) -> Assignment:
            if name not in a.challengers:
                raise RegistryError(f"no challenger named {name!r}")
            rest = {n: c for n, c in a.challengers.items() if n != name}
            event = Event(at=_now(), action="end", version=a.challengers[name].version, variant=name)
            return a.model_copy(update={"challengers": rest, "history": [*a.history, event]})

        return self._update(change)

    def _update(self, change: Callable[[Assignment], Assignment]) -> Assignment:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            current = self.read()
            if current.salt == "unset":
                current = Assignment()
            updated = change(current)
            if updated is current:
                return current
            updated = updated.model_copy(update={"revision": current.revision + 1})
            tmp = self.root / f".{REGISTRY_FILE}.{os.getpid()}"
            tmp.write_text(updated.model_dump_json(indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, self.file)
            return updated

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / LOCK_FILE, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _unit(salt: str, name: str, user_id: str) -> float:
    """A uniform number in (0, 1) from the salt, the variant and the user."""
    digest = hashlib.blake2b(f"{salt}\x00{name}\x00{user_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 18446744073709551616.0


def assign(user_id: str, variants: Sequence[tuple[str, float]], salt: str) -> int:
    """The index of the variant (name, weight) that answers the user: weighted rendezvous hashing. Each variant draws
    an exponential time of rate ``weight`` from the user's hash, the first to arrive wins, so a variant wins with
    probability weight / sum of weights; raising one weight (and lowering another's) moves users only into the
    variant that gained, from the one that lost (and, with three or more, a few more to keep the shares exact)."""
    best, best_time = 0, math.inf
    for i, (name, weight) in enumerate(variants):
        if weight <= 0.0:
            continue
        t = -math.log(_unit(salt, name, user_id)) / weight
        if t < best_time:
            best, best_time = i, t
    return best


def weights_with(
    overrides: Mapping[str, float], variants: Sequence[tuple[str, str, float]]
) -> list[tuple[str, str, float]]:
    """The variants with the weights ``VARIANT_WEIGHTS`` sets for some challengers (the champion keeps the rest)."""
    unknown = set(overrides) - {name for name, _, _ in variants[1:]}
    if unknown:
        raise RegistryError(f"VARIANT_WEIGHTS names no challenger of the registry: {sorted(unknown)}")
    out = [(n, v, overrides.get(n, w)) for n, v, w in variants[1:]]
    rest = 1.0 - sum(w for _, _, w in out)
    if rest < 0.0:
        raise RegistryError("VARIANT_WEIGHTS: the challengers' weights add up to more than 1")
    return [(variants[0][0], variants[0][1], rest), *out]
