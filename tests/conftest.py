"""Fixtures shared across test modules."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import omni.default_model as default_model


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model, converted once per test session into a private cache."""
    cache = tmp_path_factory.mktemp("omni-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMNI_CACHE_DIR", str(cache))
        path = Path(default_model.default_model_path())
        assert path == cache / "models" / "SmolLM2-135M-Instruct"
        # Converted once: the second call returns the folder at once and leaves no temp dirs.
        started = time.perf_counter()
        assert default_model.default_model_path() == str(path)
        assert time.perf_counter() - started < 0.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["SmolLM2-135M-Instruct"]
    return path
