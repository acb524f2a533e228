"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.targets.local.baseimage import BaseImage, BaseSpec, ensure_base_image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def state_dir() -> Path:
    """The pipeline state of the test session, kept between runs so base images are reused.

    `PIPELINE_TEST_STATE` moves it; by default it is `.pipeline-test/state` in the checkout.
    """
    path = Path(os.environ.get("PIPELINE_TEST_STATE", REPO / ".pipeline-test" / "state"))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@pytest.fixture(scope="session")
def base_image(state_dir: Path) -> BaseImage:
    """The default base image, built once (about a minute) and then taken from the cache."""
    return ensure_base_image(state_dir, BaseSpec(), log_dir=state_dir / "logs")
