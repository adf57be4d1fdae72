"""prestartup_script.py: the opt-in native CUDA allocator (setting ``QwenZeroPrior.NativeAllocator``). Its helpers
here; inside real ComfyUI (both versions, where the allocator is chosen before and after the prestartup scripts):
tests/test_comfyui.py's *native_allocator* test."""

from __future__ import annotations

import json
import logging

import pytest

from qwen_zero_prior import prestartup_script as ps


@pytest.mark.parametrize("conf, kept", [
    ("backend:cudaMallocAsync", ""),
    ("garbage_collection_threshold:0.9,backend:cudaMallocAsync", "garbage_collection_threshold:0.9"),
    ("backend: cudaMallocAsync,max_split_size_mb:512", "max_split_size_mb:512"),
    ("backend:native,max_split_size_mb:512", "backend:native,max_split_size_mb:512"),
    ("", ""),
])
def test_without_async_backend(conf, kept):
    assert ps.without_async_backend(conf) == kept


def test_wanted_reads_the_setting_and_never_fails(tmp_path, caplog):
    path = tmp_path / "comfy.settings.json"
    assert ps.wanted(str(path)) is False  # no settings file yet: off
    path.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    assert ps.wanted(str(path)) is False  # off by default
    path.write_text(json.dumps({ps.SETTING: True}))
    assert ps.wanted(str(path)) is True
    for value in ("true", 1, None, False):  # only the boolean the frontend stores turns it on
        path.write_text(json.dumps({ps.SETTING: value}))
        assert ps.wanted(str(path)) is False, value
    path.write_text(json.dumps([ps.SETTING]))
    assert ps.wanted(str(path)) is False
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="qwen_zero_prior.prestartup"):
        assert ps.wanted(str(path)) is False
    assert str(path) in caplog.text and "left as it is" in caplog.text


def test_too_late_once_torch_is_imported(caplog):
    """In this process torch is imported already: the switch says so and changes nothing."""
    import os

    import torch  # noqa: F401

    before = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    with caplog.at_level(logging.WARNING, logger="qwen_zero_prior.prestartup"):
        assert ps.use_native_allocator() is False
    assert "--disable-cuda-malloc" in caplog.text
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == before
