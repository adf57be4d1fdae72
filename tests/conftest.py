"""Shared fixtures: the real Qwen-Image tokenizer (../shared) and tiny random models of the real classes."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/comfy_harness, tests/cog_harness
sys.path.insert(1, str(REPO))  # predict.py, train.py, cog_support.py (Cog's entry points live at the root)


def _tokenizer_dir() -> Path | None:
    env = os.environ.get("QWEN_IMAGE_TOKENIZER")
    cands = [Path(env)] if env else []
    cands += [REPO.parent / "shared" / "tokenizers" / "qwen-image", REPO / "shared" / "tokenizers" / "qwen-image"]
    return next((c for c in cands if (c / "vocab.json").is_file()), None)


TOKENIZER_DIR = _tokenizer_dir()
TOKENIZER_MISSING = (
    "Qwen-Image's tokenizer not found: set QWEN_IMAGE_TOKENIZER to a folder with its vocab.json (e.g. "
    "hf download Qwen/Qwen-Image --include 'tokenizer/*' --local-dir qwen-image; then qwen-image/tokenizer)"
)
needs_tokenizer = pytest.mark.skipif(
    TOKENIZER_DIR is None,
    reason=TOKENIZER_MISSING,
)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    if TOKENIZER_DIR is None:
        pytest.skip(TOKENIZER_MISSING)
    return TOKENIZER_DIR


@pytest.fixture
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def _tiny_pipe_session(tokenizer_dir):
    from qwen_zero_prior.training.tiny import tiny_pipeline

    pipe = tiny_pipeline(tokenizer_dir, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipe(_tiny_pipe_session):
    """A fresh copy of a tiny QwenImagePipeline (real classes, random weights, real tokenizer)."""
    return copy.deepcopy(_tiny_pipe_session)


@pytest.fixture(scope="session")
def tiny_model_dir(_tiny_pipe_session, tmp_path_factory) -> Path:
    """The same tiny pipeline saved in diffusers layout, for code paths that load from disk."""
    d = tmp_path_factory.mktemp("tiny-qwen-image")
    _tiny_pipe_session.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def _tiny_pipe_21_session(tokenizer_dir):
    from qwen_zero_prior.training.tiny import tiny_pipeline_21

    pipe = tiny_pipeline_21(tokenizer_dir, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipe_21(_tiny_pipe_21_session):
    """A fresh copy of a tiny QwenImage21Pipeline (real classes, random weights, Qwen3-VL tokenizer built from
    the real Qwen-Image files plus Qwen3's four added tokens)."""
    return copy.deepcopy(_tiny_pipe_21_session)


@pytest.fixture(scope="session")
def tiny_model_dir_21(_tiny_pipe_21_session, tmp_path_factory) -> Path:
    """The tiny 2.1 pipeline saved in diffusers layout (transformers saves and loads its Qwen3VLProcessor only
    with torchvision, which ComfyUI's requirements install: skipped where it is absent)."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("transformers saves/loads a Qwen3VLProcessor (QwenImage21Pipeline's) only with torchvision; "
                    "install it (ComfyUI's requirements do) to run the Qwen-Image 2.1 folder tests")
    d = tmp_path_factory.mktemp("tiny-qwen-image-2.1")
    _tiny_pipe_21_session.save_pretrained(d)
    return d


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path / "data", n=4, size=32)


@pytest.fixture
def make_config():
    """make_config(model_dir, **train_overrides) -> Config for the tiny models on CPU in float32."""
    return _tiny_config


def _tiny_config(model_dir: Path | str = "unused", **train):
    from qwen_zero_prior.training.config import Config

    t = {"train_placeholder_token": True, "rank": 4, "steps": 4, "learning_rate": 2e-3,
         "token_learning_rate": 2e-2, "resolution": 32, "checkpoint_every": 0, "seed": 0}
    t.update(train)
    return Config.from_dict({"model": {"base_model": str(model_dir), "dtype": "float32", "device": "cpu"},
                             "train": t})


@pytest.fixture(autouse=True)
def _quiet_logs():
    for name in ("diffusers", "transformers", "PIL", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield


@pytest.fixture(autouse=True)
def _inductor_choices_as_found():
    """A compiled trainer installs inductor's wider persistent reductions process-wide until its backend closes
    (training/reductions.py); a test that builds one and never closes it must not hand that to the next test."""
    from qwen_zero_prior.training import reductions

    was = reductions.installed()
    yield
    if not was:
        reductions.uninstall()
