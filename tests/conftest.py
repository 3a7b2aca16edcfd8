from __future__ import annotations

from pathlib import Path

import pytest

from support import make_bundle, make_keys


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private, public) key paths generated for this test session."""
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def toy_bundle(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    """A freshly built, signed two-variant bundle in a temp dir (safe to tamper with)."""
    return make_bundle(tmp_path / "toy-1", keys[0])
