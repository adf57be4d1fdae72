import zipfile

import pytest

from qwen_zero_prior.training.data import (
    BatchPlan,
    DatasetError,
    assign_buckets,
    load_pixels,
    make_buckets,
    prepare_caption,
    resolve_dataset,
    scan_dataset,
)
from qwen_zero_prior.training.tiny import make_synthetic_dataset


def test_captions_default_and_prepend(tmp_path):
    d = make_synthetic_dataset(tmp_path / "d", n=3, size=32)
    (d / "img_01.txt").unlink()
    (d / "img_02.txt").write_text("a red disc")
    ex = {e.image.name: e.caption for e in scan_dataset(d, "<zwx>", "a photo of {token}", True)}
    assert ex["img_00.png"] == "a photo of <zwx> on a plain background"
    assert ex["img_01.png"] == "a photo of <zwx>"
    assert ex["img_02.png"] == "<zwx> a red disc"
    ex = {e.image.name: e.caption for e in scan_dataset(d, "<zwx>", "a photo of {token}", False)}
    assert ex["img_02.png"] == "a red disc"
    assert prepare_caption("  ", "<t>", "x {token}", False) == "x <t>"


def test_zip_dataset_and_errors(tmp_path):
    d = make_synthetic_dataset(tmp_path / "d", n=2, size=32)
    z = tmp_path / "data.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in d.iterdir():
            zf.write(p, f"images/{p.name}")
        zf.writestr("__MACOSX/._img_00.png", b"junk")
    root = resolve_dataset(z, tmp_path / "work")
    assert len(scan_dataset(root, "<zwx>", "{token}", True)) == 2
    (d / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"1 unreadable image\(s\): broken.png"):
        scan_dataset(d, "<zwx>", "{token}", True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        scan_dataset(tmp_path / "empty", "<zwx>", "{token}", True)
    with pytest.raises(DatasetError, match="dataset not found"):
        resolve_dataset(tmp_path / "nope.zip", tmp_path)


def test_buckets(tmp_path):
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert all(0.85 < w * h / 1024**2 < 1.15 for w, h in buckets)
    d = make_synthetic_dataset(tmp_path / "d", n=2, size=32)  # one square, one 3:2 landscape
    ex = assign_buckets(scan_dataset(d, "<zwx>", "{token}", True), 64)
    assert ex[0].bucket == (64, 64)
    w, h = ex[1].bucket
    assert w > h
    px = load_pixels(ex[1].image, ex[1].bucket)
    assert px.shape == (3, h, w) and px.min() >= -1 and px.max() <= 1


def test_batch_plan_deterministic_and_bucket_pure(tmp_path):
    d = make_synthetic_dataset(tmp_path / "d", n=4, size=32)
    ex = assign_buckets(scan_dataset(d, "<zwx>", "{token}", True), 32)
    a = BatchPlan(ex, 2, seed=1)
    b = BatchPlan(ex, 2, seed=1)
    seq = [a.batch(s) for s in range(10)]
    assert seq == [b.batch(s) for s in range(10)]
    for batch in seq:
        assert len({ex[i].bucket for i in batch}) == 1
    # two ranks of batch 1 together see what one rank of batch 2 sees
    r0, r1 = BatchPlan(ex, 1, 1, rank=0, world=2), BatchPlan(ex, 1, 1, rank=1, world=2)
    assert [r0.batch(s) + r1.batch(s) for s in range(6)] == [BatchPlan(ex, 2, 1).batch(s) for s in range(6)]


def test_require_captions(tmp_path):
    d = make_synthetic_dataset(tmp_path / "d", n=2, size=32)
    (d / "img_01.txt").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) without a same-name .txt caption: img_01.png"):
        scan_dataset(d, "<zwx>", "{token}", True, require_captions=True)
