"""Model files: npz archives without pickle, and files read only when their sha256 is the card's."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from moviematch_ml.errors import ModelChecksumError, ModelFormatError, ModelNotFoundError
from moviematch_ml.runtime.cards import CARD_NAME, read_npz, verified_bytes, write_npz


def test_npz_is_stable_and_refuses_object_arrays() -> None:
    arrays = {"b": np.arange(3.0), "a": np.ones((2, 2))}
    data = write_npz(arrays)
    assert data == write_npz(dict(reversed(arrays.items())))
    back = read_npz(data)
    assert sorted(back) == ["a", "b"]
    np.testing.assert_array_equal(back["a"], arrays["a"])
    np.testing.assert_array_equal(back["b"], arrays["b"])
    buf = io.BytesIO()
    np.savez(buf, bad=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ModelFormatError):
        read_npz(buf.getvalue())
    with pytest.raises(ModelFormatError):
        read_npz(b"not a zip archive")


def test_verified_bytes_reads_a_file_only_when_its_sha256_is_the_cards(tmp_path: Path) -> None:
    card = tmp_path / CARD_NAME
    (tmp_path / "model.txt").write_bytes(b"trees")
    sha = hashlib.sha256(b"trees").hexdigest()
    assert verified_bytes(card, "model.txt", sha) == b"trees"
    with pytest.raises(ModelChecksumError, match="does not match"):
        verified_bytes(card, "model.txt", "0" * 64)
    with pytest.raises(ModelFormatError, match="no checksum"):  # a card without one: refused, not read unchecked
        verified_bytes(card, "model.txt", None)
    with pytest.raises(ModelNotFoundError):
        verified_bytes(card, "other.txt", sha)
