"""The Cog trainer and predictor through Cog's own HTTP server, as Replicate calls them."""

from __future__ import annotations

import base64
import inspect
import io
import json
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from cog_harness.server import REPO, CogServer, FileServer

pytestmark = pytest.mark.cog
cog = pytest.importorskip("cog", reason="cog is not installed (pip install -e '.[cog]'): Cog HTTP tests SKIPPED")


def _data_uri_bytes(uri: str) -> bytes:
    assert uri.startswith("data:"), uri[:80]
    return base64.b64decode(uri.split(",", 1)[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    fs = FileServer(root)
    yield root, fs
    fs.close()


@pytest.fixture(scope="module")
def env(tiny_model_dir):
    return {"QWEN_IMAGE_MODEL": str(tiny_model_dir), "QWEN_IMAGE_DTYPE": "float32", "QWEN_IMAGE_DEVICE": "cpu"}


@pytest.fixture(scope="module")
def trained(env, files, tmp_path_factory):
    """weights.zip produced by POST /trainings on a dataset zip served over HTTP."""
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    root, fs = files
    data = make_synthetic_dataset(tmp_path_factory.mktemp("ds"), n=4, size=32)
    with zipfile.ZipFile(root / "dataset.zip", "w") as zf:
        for p in sorted(data.iterdir()):
            zf.write(p, p.name)
    server = CogServer("train", env, tmp_path_factory.mktemp("cogtrain") / "log.txt").start()
    try:
        r = server.post("/trainings", {"dataset": fs.url("dataset.zip"), "steps": 6, "rank": 4, "resolution": 32,
                                       "train_placeholder_token": True, "placeholder_token": "<zwx>",
                                       "learning_rate": 2e-3, "token_learning_rate": 5e-2})
        assert r.status_code == 200, r.text[-2000:]
        body = r.json()
        assert body["status"] == "succeeded", body.get("error") or body.get("logs")
        weights = _data_uri_bytes(body["output"]["weights"])
        bad = server.post("/trainings", {"dataset": fs.url("dataset.zip"), "steps": 0})
        assert bad.status_code == 422 and "steps" in bad.text
        wrong = server.post("/trainings", {"dataset": fs.url("dataset.zip"), "steps": 2, "resolution": 40})
        assert wrong.json()["status"] == "failed" and "multiple of 16, got 40" in wrong.json()["error"]
    finally:
        server.stop()
    (root / "weights.zip").write_bytes(weights)
    return root / "weights.zip"


@pytest.fixture(scope="module")
def predictor(env, tmp_path_factory):
    server = CogServer("predict", env, tmp_path_factory.mktemp("cogpredict") / "log.txt").start()
    yield server
    server.stop()


def _png(server, **inputs) -> tuple[np.ndarray, dict]:
    base = {"prompt": "a photo of <zwx>", "steps": 2, "width": 64, "height": 64, "guidance": 1.0, "seed": 1}
    r = server.post("/predictions", {**base, **inputs})
    assert r.status_code == 200, r.text[-2000:]
    body = r.json()
    assert body["status"] == "succeeded", body.get("error") or body.get("logs")
    raw = _data_uri_bytes(body["output"])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16), body


def test_training_output_is_core_archive(trained):
    from qwen_zero_prior.training.archive import load_archive

    arc = load_archive(trained)
    assert arc.has_lora and arc.has_token and arc.token == "<zwx>"
    assert arc.meta.placeholder_token_id == 151665 and arc.meta.rank == 4 and arc.meta.steps == 6


def test_predict_with_weights_reuse_swap_and_tar(predictor, trained, files):
    root, fs = files
    plain, _ = _png(predictor)
    assert plain.shape == (64, 64, 3)
    with_w, body = _png(predictor, replicate_weights=fs.url("weights.zip"))
    assert np.abs(with_w - plain).max() > 0
    assert "weights loaded" in body["logs"]
    again, body = _png(predictor, replicate_weights=fs.url("weights.zip"))
    assert "weights unchanged" in body["logs"] and "weights loaded" not in body["logs"]
    assert np.array_equal(again, with_w)

    # the same archive as tar.gz works too
    with zipfile.ZipFile(trained) as zf, tarfile.open(root / "weights.tar.gz", "w:gz") as tf:
        for name in zf.namelist():
            data = zf.read(name)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    shutil.copy(root / "weights.tar.gz", root / "weights_tar_copy.tar.gz")
    tar_img, body = _png(predictor, replicate_weights=fs.url("weights.tar.gz"))
    assert np.array_equal(tar_img, with_w)

    # different weights (LoRA only, another token) replace the previous token and LoRA completely
    from qwen_zero_prior.training.archive import load_archive, write_archive

    arc = load_archive(trained)
    arc.meta.placeholder_token = None
    arc.meta.placeholder_token_id = None
    write_archive(root / "lora_only.zip", arc.meta, arc.lora_state_dict, None)
    arc2 = load_archive(trained)
    arc2.meta.placeholder_token = "<sks>"
    write_archive(root / "token_only.zip", arc2.meta, None, arc2.vector)
    token_only, body = _png(predictor, replicate_weights=fs.url("token_only.zip"))
    assert "weights loaded" in body["logs"]
    assert np.array_equal(token_only, plain), "the previous LoRA or <zwx> survived a weights swap"
    back, _ = _png(predictor)
    assert np.array_equal(back, plain)


def test_predict_bad_inputs(predictor, files):
    root, fs = files
    r = predictor.post("/predictions", {"prompt": "x", "steps": 101})
    assert r.status_code == 422 and "steps" in r.text
    r = predictor.post("/predictions", {"prompt": "x", "width": 8})
    assert r.status_code == 422 and "width" in r.text
    r = predictor.post("/predictions", {"steps": 2})
    assert r.status_code == 422 and "prompt" in r.text
    (root / "garbage.zip").write_bytes(b"not an archive at all")
    r = predictor.post("/predictions", {"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                        "replicate_weights": fs.url("garbage.zip")})
    body = r.json()
    assert body["status"] == "failed" and "not a zip, tar or tar.gz archive" in body["error"]
    with zipfile.ZipFile(root / "nolora.zip", "w") as zf:
        zf.writestr("meta.json", json.dumps({"format_version": 1, "base_model": "x", "placeholder_token": None,
                                             "placeholder_token_id": None, "rank": 4, "created": "2026-01-01T00:00:00Z",
                                             "contents": ["lora"]}))
    body = predictor.post("/predictions", {"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                           "replicate_weights": fs.url("nolora.zip")}).json()
    assert body["status"] == "failed" and "LoRA weights not found: expected lora/lora_weights.safetensors" in body["error"]


def test_failed_load_leaves_nothing_loaded(predictor, files, _tiny_pipe_session):
    """Predict A, predict a broken B (it fails), predict A again: A's pixels, loaded afresh (issue 13)."""
    from test_hostile_inputs import broken_archives

    root, fs = files
    good, broken = broken_archives(root, _tiny_pipe_session)
    plain, _ = _png(predictor)
    first, body = _png(predictor, replicate_weights=fs.url(good.name))
    assert "weights loaded" in body["logs"] and np.abs(first - plain).max() > 0
    for name, (path, needle) in broken.items():
        body = predictor.post("/predictions", {"prompt": "a photo of <zwx>", "steps": 2, "width": 64, "height": 64,
                                               "guidance": 1.0, "seed": 1, "replicate_weights": fs.url(path.name)}).json()
        assert body["status"] == "failed" and needle in body["error"], (name, body.get("error"))
        assert "Traceback" not in body["error"], body["error"]
        again, body = _png(predictor, replicate_weights=fs.url(good.name))
        assert "weights loaded" in body["logs"] and "weights unchanged" not in body["logs"], name
        assert np.array_equal(again, first), f"{name}: stale weights served after a failed load"
    # a failed load followed by no weights at all: the base model
    predictor.post("/predictions", {"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                    "replicate_weights": fs.url(broken["lora_shape"][0].name)})
    base, _ = _png(predictor)
    assert np.array_equal(base, plain)


def test_cog_trains_two_tokens_from_a_comma_list_and_predicts_with_both(env, files, predictor, tmp_path):
    """POST /trainings with placeholder_token "<alice>,<bob>" on a zip in the folder convention (issue 18): one
    archive with both vectors; the predictor registers both."""
    from qwen_zero_prior.training.archive import load_archive
    from test_multi_token import two_token_dataset

    root, fs = files
    data = two_token_dataset(tmp_path / "two")
    with zipfile.ZipFile(root / "two_tokens.zip", "w") as zf:
        for p in sorted(data.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(data).as_posix())
    server = CogServer("train", env, tmp_path / "log.txt").start()
    try:
        r = server.post("/trainings", {"dataset": fs.url("two_tokens.zip"), "steps": 3, "rank": 4, "resolution": 32,
                                       "batch_size": 2, "train_placeholder_token": True,
                                       "placeholder_token": "<alice>,<bob>", "token_learning_rate": 5e-2})
        body = r.json()
        assert body["status"] == "succeeded", (body.get("error"), body.get("logs", "")[-3000:])
        dup = server.post("/trainings", {"dataset": fs.url("two_tokens.zip"), "steps": 1, "resolution": 32,
                                         "train_placeholder_token": True, "placeholder_token": "<bob>,<bob>"}).json()
        assert dup["status"] == "failed" and "placeholder token '<bob>' is listed twice" in dup["error"], dup
    finally:
        server.stop()
    (root / "two_weights.zip").write_bytes(_data_uri_bytes(body["output"]["weights"]))
    arc = load_archive(root / "two_weights.zip")
    assert arc.tokens == ["<alice>", "<bob>"] and arc.meta.placeholder_token_ids == [151665, 151666]
    assert all(v.norm() > 1e-2 for v in arc.vectors.values())  # both moved off N(0, 1e-5)
    plain, _ = _png(predictor, prompt="<alice> and <bob>")
    both, body = _png(predictor, prompt="<alice> and <bob>", replicate_weights=fs.url("two_weights.zip"))
    assert "tokens '<alice>' id 151665, '<bob>' id 151666" in body["logs"]
    assert np.abs(both - plain).max() > 0


# ---- one source of truth: Cog literals and the shipped schema follow training.config -------------------
def test_cog_inputs_follow_config():
    import cog_support
    import predict
    import train

    schema = cog_support.openapi_schema()
    shipped = json.loads((REPO / ".cog" / "openapi_schema.json").read_text())
    assert shipped == schema, "run `python cog_support.py` to regenerate .cog/openapi_schema.json"

    def check(fn, props):
        params = {k: v for k, v in inspect.signature(fn).parameters.items() if k != "self"}
        assert list(params) == list(props), (list(params), list(props))
        for name, p in params.items():
            info, prop = p.default, props[name]
            if "default" in prop:
                assert info.default == prop["default"], (name, info.default, prop["default"])
            assert info.ge == prop.get("minimum") and info.le == prop.get("maximum"), name
            assert info.description == prop["description"], name

    check(predict.Predictor.predict, schema["components"]["schemas"]["Input"]["properties"])
    check(train.train, schema["components"]["schemas"]["TrainingInput"]["properties"])
    cfg = (REPO / "cog.yaml").read_text()
    assert 'predict: "predict.py:Predictor"' in cfg and 'train: "train.py:train"' in cfg


def test_cog_requirements_match_pack():
    def reqs(name):
        return {line.strip() for line in (REPO / name).read_text().splitlines() if line.strip() and not line.startswith("#")}

    assert reqs("requirements-cog.txt") - {"torch>=2.5"} == reqs("requirements.txt")


def test_cog_training_data_parallel_two_processes(env, files, tmp_path, trained):
    """POST /trainings with QZP_TRAIN_PROCESSES=2: torchrun, gloo on CPU, one archive from rank 0."""
    from qwen_zero_prior.training.archive import load_archive

    root, fs = files
    server = CogServer("train", {**env, "QZP_TRAIN_PROCESSES": "2", "OMP_NUM_THREADS": "1"}, tmp_path / "log.txt").start()
    try:
        r = server.post("/trainings", {"dataset": fs.url("dataset.zip"), "steps": 3, "rank": 4, "resolution": 32,
                                       "train_placeholder_token": True})
        body = r.json()
        assert body["status"] == "succeeded", (body.get("error"), body.get("logs", "")[-3000:])
        assert "data parallel: rank 1 of 2" in body["logs"] and "trained with 2 data-parallel processes" in body["logs"]
        (tmp_path / "w.zip").write_bytes(_data_uri_bytes(body["output"]["weights"]))
        arc = load_archive(tmp_path / "w.zip")
        assert arc.has_token and arc.meta.steps == 3
    finally:
        server.stop()


# ---- Qwen-Image 2.1: QWEN_IMAGE_MODEL at a 2.1 folder; weights of the other family refused -----------------
def test_cog_qwen_image_21_train_predict_and_family_mismatch(tiny_model_dir_21, files, trained, predictor, tmp_path):
    """``cog train`` on a 2.1 folder writes a 2.1 archive; ``cog predict`` on that folder uses it; each predictor
    refuses the other family's weights with one error naming both families and the predictor's model."""
    from qwen_zero_prior.training.archive import load_archive

    root, fs = files
    env21 = {"QWEN_IMAGE_MODEL": str(tiny_model_dir_21), "QWEN_IMAGE_DTYPE": "float32", "QWEN_IMAGE_DEVICE": "cpu"}
    server = CogServer("train", env21, tmp_path / "train21.txt").start()
    try:
        r = server.post("/trainings", {"dataset": fs.url("dataset.zip"), "steps": 3, "rank": 4, "resolution": 32,
                                       "train_placeholder_token": True, "learning_rate": 1e-2,
                                       "token_learning_rate": 5e-2})
        body = r.json()
        assert body["status"] == "succeeded", (body.get("error"), body.get("logs", "")[-3000:])
        wrong = server.post("/trainings", {"dataset": fs.url("dataset.zip"), "steps": 1, "resolution": 48}).json()
        assert wrong["status"] == "failed"
        assert "train.resolution must be a multiple of 32 for Qwen-Image 2.1, got 48" in wrong["error"]
    finally:
        server.stop()
    (root / "weights21.zip").write_bytes(_data_uri_bytes(body["output"]["weights"]))
    arc = load_archive(root / "weights21.zip")
    assert arc.meta.model_family == "qwen-image-2.1" and arc.meta.placeholder_token_id == 151669
    assert arc.meta.base_model == str(tiny_model_dir_21) and arc.has_lora and arc.meta.steps == 3

    def refused(server, weights):
        body = server.post("/predictions", {"prompt": "a photo of <zwx>", "steps": 1, "width": 64, "height": 64,
                                            "guidance": 1.0, "replicate_weights": fs.url(weights)}).json()
        assert body["status"] == "failed", body.get("logs")
        return body["error"]

    err = refused(predictor, "weights21.zip")
    assert "this archive was trained on Qwen-Image 2.1 (meta.json model_family 'qwen-image-2.1') but the base " \
           "model is Qwen-Image ('qwen-image')" in err
    assert err.endswith(f"This predictor serves {predictor.env['QWEN_IMAGE_MODEL']} (QWEN_IMAGE_MODEL); deploy one "
                        "with QWEN_IMAGE_MODEL set to a Qwen-Image 2.1 model for these weights.")

    p21 = CogServer("predict", env21, tmp_path / "predict21.txt").start()
    try:
        plain, _ = _png(p21)
        with_w, body = _png(p21, replicate_weights=fs.url("weights21.zip"))
        assert "Qwen-Image 2.1): token '<zwx>' id 151669" in body["logs"]
        assert plain.shape == (64, 64, 3) and np.abs(with_w - plain).max() > 0
        err = refused(p21, "weights.zip")
        assert "this archive was trained on Qwen-Image (meta.json model_family 'qwen-image') but the base model " \
               "is Qwen-Image 2.1 ('qwen-image-2.1')" in err and "set to a Qwen-Image model" in err
        again, _ = _png(p21, replicate_weights=fs.url("weights21.zip"))  # the refused weights changed nothing
        assert np.array_equal(again, with_w)
    finally:
        p21.stop()


def test_cog_train_takes_the_fast_path_on_an_fp8_gpu_and_the_plan_keeps_it_safe(monkeypatch):
    """``cog train`` on one Ada/Hopper GPU (an H100) compiles with CUDA graphs and fp8 matmuls with no input set;
    not on older GPUs, CPUs, data-parallel runs or with QZP_COG_FAST=0. The memory plan then keeps what fits: resident
    under 80 GB, checkpointing without CUDA graphs at 40 GB, offload compiled without CUDA graphs or fp8 at 24 GB."""
    import torch

    import cog_support
    from qwen_zero_prior.training import memory

    monkeypatch.setenv("QWEN_IMAGE_MODEL", "tiny")
    monkeypatch.delenv(cog_support.ENV_DEVICE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability["value"])
    base = dict(rank=32, steps=2, learning_rate=1e-4, token_learning_rate=5e-3, train_placeholder_token=True,
                placeholder_token="<zwx>", placeholder_init_std=1e-5, resolution=1024, batch_size=1, seed=0)

    m = cog_support.config_for_training(processes=1, **base).model
    assert (m.compile, m.compile_mode, m.fp8_matmul, m.memory) == (True, "reduce-overhead", True, "auto")
    for why, kwargs, env in (("two processes", {"processes": 2}, None), ("QZP_COG_FAST=0", {"processes": 1}, "0")):
        if env:
            monkeypatch.setenv(cog_support.ENV_FAST, env)
        m2 = cog_support.config_for_training(**kwargs, **base).model
        assert (m2.compile, m2.fp8_matmul) == (False, False), why
        monkeypatch.delenv(cog_support.ENV_FAST, raising=False)
    capability["value"] = (8, 6)  # an A100/3090: no fp8 tensor cores
    m3 = cog_support.config_for_training(processes=1, **base).model
    assert (m3.compile, m3.fp8_matmul) == (False, False)

    capability["value"] = (9, 0)
    cfg = cog_support.config_for_training(processes=1, **base)
    weights = int(47.4 * memory.GIB)  # full-size Qwen-Image with fp8_matmul's one fp8 copy (docs/benchmarks.md)
    cuda = torch.device("cuda", 0)
    h100, plan = memory.resolve(cfg, weights, cuda, capacity_bytes=78 * memory.GIB)
    assert plan.mode == "resident" and h100.model.compile_mode == "reduce-overhead" and h100.model.fp8_matmul
    a40, plan = memory.resolve(cfg, weights, cuda, capacity_bytes=60 * memory.GIB)
    assert plan.mode == "checkpoint" and a40.model.compile and a40.model.compile_mode is None
    small, plan = memory.resolve(cfg, weights, cuda, capacity_bytes=24 * memory.GIB)
    # offload: fp8 off (it stores the weights its own way), compile kept in the default mode (blocks recompute)
    assert plan.mode == "offload" and small.model.compile and small.model.compile_mode is None
    assert not small.model.fp8_matmul
