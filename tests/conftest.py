"""Shared fixtures: the read-only ``../shared`` folder beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
GOLDEN = SHARED / "golden" / "public"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"shared test material not found at {path} (expected ../shared beside the repository)"
        )
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared``; skips (with the reason) when the folder is absent."""
    return _require(SHARED)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``../shared/golden/public`` with the MindSpore-written checkpoints and outputs."""
    return _require(GOLDEN)


@pytest.fixture(scope="session")
def pbmc3k_path() -> Path:
    return _require(SHARED / "data" / "pbmc3k_raw.h5ad")


@pytest.fixture(scope="session")
def wu2020_path() -> Path:
    return _require(SHARED / "data" / "wu2020_200_raw.h5ad")


@pytest.fixture(scope="session")
def cellfm_vocab_path() -> Path:
    return _require(SHARED / "cellfm" / "expand_gene_info.csv")
