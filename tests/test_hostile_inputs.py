"""Bad archives, datasets, checkpoints, configs and output faults: each gives one clear error (or the right
result), nothing wrong is ever served, and no work is lost late (issue 13)."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from qwen_zero_prior.training import archive as A
from qwen_zero_prior.training.archive import ArchiveError, ArchiveMeta, load_archive, safe_extract, write_archive
from qwen_zero_prior.training.token import TokenError, validate_token

REPO = Path(__file__).resolve().parents[1]


def _meta(**kw) -> ArchiveMeta:
    base = dict(base_model="tiny", placeholder_token="<zwx>", placeholder_token_id=151665, rank=4,
                created=ArchiveMeta.now(), alpha=4.0)
    base.update(kw)
    return ArchiveMeta(**base)


def _small_lora() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}


def _zip(path: Path, members: dict[str, bytes | str], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    return path


def _valid_members() -> dict[str, bytes]:
    meta = _meta()
    meta.contents = ["lora", "token"]
    meta.embedding_dim = 32
    return {"meta.json": meta.to_json().encode(), A.LORA_MEMBER: A.lora_file_bytes(_small_lora()),
            A.TOKEN_MEMBER: A.token_file_bytes("<zwx>", torch.ones(32))}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ==== archives: one ArchiveError naming the archive ====================================================
def test_zip_bad_crc_names_archive_and_member(tmp_path):
    p = _zip(tmp_path / "crc.zip", _valid_members())
    raw = bytearray(p.read_bytes())
    data = A.token_file_bytes("<zwx>", torch.ones(32))
    at = raw.find(data[-64:])  # stored: the member's bytes are in the file as is
    raw[at + 10] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError) as e:
        load_archive(p)
    assert str(p) in str(e.value) and A.TOKEN_MEMBER in str(e.value) and "corrupt" in str(e.value)
    assert "CRC" in str(e.value)


def test_zip_corrupt_deflate_stream(tmp_path):
    members = _valid_members()
    members[A.LORA_MEMBER] = A.lora_file_bytes({k: torch.zeros_like(v) for k, v in _small_lora().items()})
    p = _zip(tmp_path / "deflate.zip", members, zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo(A.LORA_MEMBER)
    raw = bytearray(p.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 2, start + 12):
        raw[i] = 0xFF  # garbage in the middle of the deflate stream
    p.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match=r"lora/lora_weights.safetensors' is corrupt") as e:
        load_archive(p)
    assert str(p) in str(e.value)


def _tar_bytes(members: dict[str, bytes]) -> tuple[bytes, list[int]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        offsets = [m.offset for m in tf.getmembers()]
    return buf.getvalue(), offsets


@pytest.mark.parametrize("cut", ["in_header", "in_data", "at_member_end"])
@pytest.mark.parametrize("gz", [False, True])
def test_truncated_tar_is_refused_not_listed_short(tmp_path, cut, gz):
    members = _valid_members()
    members["extra/notes.txt"] = b"n" * 3000
    raw, offsets = _tar_bytes(members)
    last = offsets[-1]
    end = {"in_header": last + 100, "in_data": last + 512 + 1000, "at_member_end": last + 512 + 3072}[cut]
    data = raw[:end]
    p = tmp_path / ("cut.tar.gz" if gz else "cut.tar")
    p.write_bytes(zlib.compress(data, wbits=31) if gz else data)  # a *valid* gzip of a truncated tar, too
    with pytest.raises(ArchiveError, match="truncated") as e:
        load_archive(p)
    assert str(p) in str(e.value)


def test_truncated_gzip_stream(tmp_path):
    raw, _ = _tar_bytes(_valid_members())
    gz = zlib.compress(raw, wbits=31)
    p = tmp_path / "half.tar.gz"
    p.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ArchiveError) as e:
        load_archive(p)
    assert str(p) in str(e.value)
    ok = tmp_path / "whole.tar.gz"
    ok.write_bytes(gz)
    assert load_archive(ok).has_token  # the complete one still loads


@pytest.mark.parametrize("field, value, needle", [
    ("extra", "a string", "extra must be an object"),
    ("contents", [["lora"], "token"], "contents must be a list drawn from"),
    ("contents", "lora", "contents must be a list drawn from"),
    ("lora_targets", "to_q", "lora_targets must be a list of module names"),
    ("steps", "many", "steps must be a non-negative integer"),
    ("steps", True, "steps must be a non-negative integer"),
    ("alpha", "big", "alpha must be a non-negative number"),
    ("alpha", float("inf"), "alpha must be a non-negative number"),
    ("embedding_dim", [32], "embedding_dim must be a positive integer"),
    ("train_placeholder_token", "yes", "train_placeholder_token must be true or false"),
    ("placeholder_init_std", -1, "placeholder_init_std must be a non-negative number"),
    ("trainer", {"a": 1}, "trainer must be a string"),
    ("base_model", ["x"], "base_model must be a string"),
    ("placeholder_token", "<zw\u200bx>", "invisible format character"),
    ("placeholder_token", "<zwx> ", "whitespace"),
])
def test_meta_fields_of_the_wrong_shape(tmp_path, field, value, needle):
    m = json.loads(_meta().to_json())
    m[field] = value
    p = _zip(tmp_path / "meta.zip", {"meta.json": json.dumps(m)})
    with pytest.raises(ArchiveError) as e:
        load_archive(p)
    assert needle in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("depth", [40, 200_000])
def test_pathologically_nested_meta_json(tmp_path, depth):
    m = _meta().to_json()
    nested = "[" * depth + "]" * depth
    p = _zip(tmp_path / "deep.zip", {"meta.json": m[:-1] + f', "notes": {nested}}}'})
    with pytest.raises(ArchiveError, match="nested") as e:
        load_archive(p)
    assert str(p) in str(e.value)


def test_unneeded_bomb_member_is_never_read(tmp_path):
    members = _valid_members()
    members["junk/bomb.bin"] = b"\0" * 50_000
    p = _zip(tmp_path / "bomb.zip", members, zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("junk/bomb.bin")
    raw = bytearray(p.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 3: start + 9] = b"\xff" * 6  # the bomb is also corrupt: reading it would fail
    p.write_bytes(bytes(raw))
    arc = load_archive(p, max_member_bytes=20_000)  # over the limit and corrupt, but never needed
    assert arc.has_lora and arc.has_token
    with pytest.raises(ArchiveError, match="'junk/bomb.bin' is 50000 bytes, over the 20000-byte limit"):
        safe_extract(p, tmp_path / "out", max_member_bytes=20_000)  # extracting needs it: refused by size


def test_needed_member_refused_by_declared_and_actual_size(tmp_path):
    members = _valid_members()
    big = _zip(tmp_path / "declared.zip", {**members, "meta.json": members["meta.json"] + b" " * (A.MAX_META_BYTES + 1)})
    with pytest.raises(ArchiveError, match=r"'meta.json' is \d+ bytes, over the 1048576-byte limit"):
        load_archive(big)
    # a member that declares fewer bytes than it holds (a forged header): refused while reading
    payload = b"x" * 5000
    p = _zip(tmp_path / "forged.zip", {**members, A.TOKEN_MEMBER: payload}, zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo(A.TOKEN_MEMBER)
    raw = bytearray(p.read_bytes())
    struct.pack_into("<I", raw, info.header_offset + 22, 100)  # local header: uncompressed size
    entry = raw.find(b"PK\x01\x02" + raw[raw.find(b"PK\x01\x02") + 4: raw.find(b"PK\x01\x02") + 4])
    patched = 0
    while (entry := raw.find(b"PK\x01\x02", entry)) >= 0:
        if raw[entry + 46: entry + 46 + len(A.TOKEN_MEMBER)] == A.TOKEN_MEMBER.encode():
            struct.pack_into("<I", raw, entry + 24, 100)  # central directory: uncompressed size
            patched += 1
        entry += 4
    assert patched == 1
    p.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError) as e:
        load_archive(p)
    assert A.TOKEN_MEMBER in str(e.value) and str(p) in str(e.value)


def test_nan_lora_in_archive_refused(tmp_path):
    lora = _small_lora()
    lora["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"][3, 1] = float("nan")
    p = write_archive(tmp_path / "nan.zip", _meta(), lora, torch.ones(32))
    with pytest.raises(ArchiveError, match=r"LoRA tensor 'transformer.transformer_blocks.0.attn.to_q.lora_B.weight' "
                                           r"is not finite") as e:
        load_archive(p)
    assert str(p) in str(e.value)


# ==== the token: one check for training, inference and ComfyUI ========================================
@pytest.mark.parametrize("token, needle", [
    ("<|im_start|>", "already a special token"),
    ("<|endoftext|>", "already a special token"),
    ("<tool_call>", "already a special token"),
    ("hello", "regular vocabulary entry"),
    ("<zwx><|im_end|>", "overlaps the special token '<|im_end|>'"),
    ("<|im", "overlaps the special token"),
    ("two words", "whitespace"),
    ("<zwx>\n", "whitespace"),
    ("<zw\u200bx>", "invisible format character (U+200B"),
    ("<zw\x07x>", "control character"),
    ("<zw\ue000x>", "private-use character"),
    ("", "non-empty string"),
    ("<" + "z" * 80 + ">", "characters long"),
])
def test_validate_token_refuses_naming_it(tokenizer, token, needle):
    with pytest.raises(TokenError) as e:
        validate_token(token, tokenizer, where="weights.zip")
    assert needle in str(e.value) and "weights.zip" in str(e.value)
    if token:
        assert repr(token)[1:-1][:20] in str(e.value)
    assert validate_token("<zwx>", tokenizer) == "<zwx>"


@pytest.mark.parametrize("token", ["<zw\u200bx>", "<zwx>\t", "<zw\x00x>"])
def test_training_config_uses_the_same_token_check(token):
    from qwen_zero_prior.training.config import Config, ConfigError

    with pytest.raises(ConfigError, match="train.placeholder_token: placeholder token"):
        Config.from_dict({"train": {"placeholder_token": token}})


# ==== inference: after any failed load, nothing is loaded =============================================
def _lora_for(pipe, seed=0):
    import copy

    from qwen_zero_prior.training.lora import add_lora, export_lora

    tr = copy.deepcopy(pipe.transformer)
    add_lora(tr, 4, 8.0, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                          "to_add_out"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return export_lora(tr, 4, 8.0)


def broken_archives(folder: Path, pipe) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """A good archive and broken ones (name -> (path, expected message part)); shared with the Cog test."""
    lora = _lora_for(pipe, seed=1)
    vec = torch.randn(32, generator=torch.Generator().manual_seed(1))
    good = write_archive(folder / "good.zip", _meta(), lora, vec)
    first_a = next(k for k in lora if k.endswith("lora_A.weight"))
    shape = dict(lora)
    shape[first_a] = torch.randn(4, 33)
    nomatch = {k.replace("transformer_blocks.", "no_such_blocks."): v for k, v in lora.items()}
    special = _meta(placeholder_token="<|im_start|>")
    return good, {
        "lora_shape": (write_archive(folder / "lora_shape.zip", _meta(), shape, vec),
                       f"LoRA tensor {first_a!r} has shape [4, 33]"),
        "vector_width": (write_archive(folder / "vector_width.zip", _meta(), lora, torch.randn(64)),
                         "has shape (64,) but the text encoder's embedding width is 32"),
        "lora_nomatch": (write_archive(folder / "lora_nomatch.zip", _meta(), nomatch, vec),
                         "LoRA key(s) match no module of QwenImageTransformer2DModel"),
        "special_token": (write_archive(folder / "special.zip", special, lora, vec),
                          "'<|im_start|>' is already a special token"),
    }


def test_failed_apply_leaves_nothing_loaded(tiny_pipe, tmp_path):
    from qwen_zero_prior.training.inference import GenerateOptions, InferenceSession
    from qwen_zero_prior.training.lora import LoraError, has_lora_layers
    from qwen_zero_prior.training.token import PlaceholderEmbedding

    good, broken = broken_archives(tmp_path, tiny_pipe)
    session = InferenceSession(tiny_pipe)
    opts = GenerateOptions("a photo of <zwx>", steps=2, guidance=1.0, width=32, height=32, seed=3)
    base = np.asarray(session.generate(opts), dtype=np.int16)
    session.apply(load_archive(good))
    first = np.asarray(session.generate(opts), dtype=np.int16)
    assert np.abs(first - base).max() > 0
    for name, (path, needle) in broken.items():
        session.apply(load_archive(good))
        with pytest.raises((LoraError, TokenError)) as e:
            session.apply(load_archive(path))
        assert needle in str(e.value) and str(path) in str(e.value), (name, str(e.value))
        assert session.archive is None and session.token_id is None, name
        assert not has_lora_layers(tiny_pipe.transformer), name
        assert not isinstance(tiny_pipe.text_encoder.get_input_embeddings(), PlaceholderEmbedding), name
        assert "<zwx>" not in tiny_pipe.tokenizer.get_added_vocab(), name
        assert np.array_equal(np.asarray(session.generate(opts), dtype=np.int16), base), name
        session.apply(load_archive(good))
        assert np.array_equal(np.asarray(session.generate(opts), dtype=np.int16), first), name


def test_lora_load_errors_name_key_and_shapes(tiny_pipe):
    from qwen_zero_prior.training.lora import LoraError, has_lora_layers, load_lora_into_pipeline

    lora = _lora_for(tiny_pipe)
    key = "transformer.transformer_blocks.0.attn.to_k.lora_B.weight"
    bad = {**lora, key: torch.randn(48, 4)}
    with pytest.raises(LoraError) as e:
        load_lora_into_pipeline(tiny_pipe, bad, source="w.zip")
    assert str(e.value).startswith("w.zip: ") and f"{key!r} has shape [48, 4]" in str(e.value)
    assert "weight of shape [32, 32]" in str(e.value) and "would need [32, 4]" in str(e.value)
    with pytest.raises(LoraError, match="match no module"):
        load_lora_into_pipeline(tiny_pipe, {"transformer.nope.lora_A.weight": torch.zeros(4, 32),
                                            "transformer.nope.lora_B.weight": torch.zeros(32, 4)}, source="w.zip")
    with pytest.raises(LoraError, match="holds NaN or Inf"):
        load_lora_into_pipeline(tiny_pipe, {**lora, key: torch.full((32, 4), float("inf"))})
    with pytest.raises(LoraError, match="to_k.* has no lora_B"):
        load_lora_into_pipeline(tiny_pipe, {k: v for k, v in lora.items() if k != key})
    assert not has_lora_layers(tiny_pipe.transformer)  # nothing was half-loaded
    assert load_lora_into_pipeline(tiny_pipe, lora) == {"missing": [], "unexpected": []}


def test_cli_predict_never_downloads_an_archive_hub_id(tmp_path, monkeypatch, capsys):
    from qwen_zero_prior.cli import main
    from qwen_zero_prior.training import models

    def no_load(*a, **k):
        raise AssertionError("load_pipeline must not be called")

    monkeypatch.setattr(models, "load_pipeline", no_load)
    p = write_archive(tmp_path / "hub.zip", _meta(base_model="Qwen/Qwen-Image"), None, torch.ones(32))
    assert main(["predict", "--archive", str(p), "--prompt", "x"]) == 2
    line = _one_line_error(capsys)
    assert "'Qwen/Qwen-Image', which is not a folder on this machine" in line
    assert "--base-model Qwen/Qwen-Image" in line and str(p) in line


# ==== datasets ========================================================================================
def _png_header_only(path: Path, w: int, h: int) -> Path:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_every_dataset_problem_in_one_message_before_any_model_loads(tiny_model_dir, make_config, tmp_path):
    from qwen_zero_prior.training.data import DatasetError, scan_dataset
    from qwen_zero_prior.training.run import train
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    d = make_synthetic_dataset(tmp_path / "d", n=3, size=32)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    with Image.open(d / "truncated.jpg") as im:
        im.verify()  # a header check passes: only a full decode finds it
    _png_header_only(d / "huge.png", 15000, 15000)
    (d / "img_01.txt").write_bytes("a photo of <zwx> in a café".encode("latin-1"))
    (d / "notes.txt").write_text("not a caption")
    with pytest.raises(DatasetError) as e:
        scan_dataset(d, "<zwx>", "{token}", True)
    msg = str(e.value)
    assert "2 unreadable image(s): " in msg and "truncated.jpg (OSError: image file is truncated" in msg
    assert "huge.png (too large: Image size (225000000 pixels) exceeds limit" in msg
    assert "1 caption file(s) that are not text: img_01.txt (not UTF-8 text: byte 0xe9 at offset 25" in msg
    # the same through the core's train(): refused before the (here missing) model would load
    cfg = make_config(tmp_path / "no-such-model")
    with pytest.raises(DatasetError) as e2:
        train(cfg, d, tmp_path / "out" / "weights.zip")
    assert "truncated.jpg" in str(e2.value) and "huge.png" in str(e2.value) and "img_01.txt" in str(e2.value)


def test_sixteen_bit_png_is_scaled_not_white(tmp_path):
    from qwen_zero_prior.training.data import load_pixels, open_image

    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    rgb = np.asarray(open_image(tmp_path / "g16.png"), dtype=np.int16)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, -1].tolist() == [255, 255, 255]
    assert abs(int(rgb[0, 16, 0]) - round(ramp[0, 16] / 257)) <= 1
    px = load_pixels(tmp_path / "g16.png", (32, 32))
    assert -1.0 <= float(px.min()) < -0.9 and float(px.mean()) == pytest.approx(0.0, abs=0.05)


def test_exif_orientation_applied(tmp_path):
    from qwen_zero_prior.training.data import assign_buckets, load_pixels, scan_dataset

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    d = tmp_path / "d"
    d.mkdir()
    Image.fromarray(arr).save(d / "rot.jpg", exif=exif.tobytes(), quality=95)
    (ex,) = scan_dataset(d, "<zwx>", "{token}", True)
    assert ex.size == (20, 40)  # portrait as displayed, not the stored landscape
    (ex,) = assign_buckets([ex], 32)
    px = load_pixels(ex.image, ex.bucket)
    top, bottom = px[:, : px.shape[1] // 4], px[:, -px.shape[1] // 4:]
    assert float(top[0].mean()) > 0.5 and float(top[2].mean()) < -0.5  # red on top after the rotation
    assert float(bottom[2].mean()) > 0.5 and float(bottom[0].mean()) < -0.5


@pytest.mark.parametrize("raw, expect", [
    ("a photo of <zwx>, naïve".encode("utf-16"), "a photo of <zwx>, naïve"),  # with BOM
    ("a photo of <zwx>, naïve".encode("utf-8-sig"), "a photo of <zwx>, naïve"),
    ("a photo of <zwx>, naïve".encode("utf-32"), "a photo of <zwx>, naïve"),
    ("a photo of <zwx>, naïve".encode("cp1252"), "not UTF-8 text: byte 0xef at offset 20"),
    ("a photo of <zwx>".encode("utf-16-le"), "holds NUL characters (UTF-16 without a byte-order mark?)"),
])
def test_caption_encodings(tmp_path, raw, expect):
    from qwen_zero_prior.training.data import DatasetError, scan_dataset
    from qwen_zero_prior.training.tiny import make_synthetic_dataset

    d = make_synthetic_dataset(tmp_path / "d", n=1, size=32)
    (d / "img_00.txt").write_bytes(raw)
    if expect.startswith("a photo"):
        (ex,) = scan_dataset(d, "<zwx>", "{token}", True)
        assert ex.caption == expect
    else:
        with pytest.raises(DatasetError) as e:
            scan_dataset(d, "<zwx>", "{token}", True)
        assert f"img_00.txt ({expect}" in str(e.value)


def test_transparent_pixels_on_stated_background(tmp_path):
    from qwen_zero_prior.training.data import TRANSPARENT_BACKGROUND, open_image

    assert TRANSPARENT_BACKGROUND == (255, 255, 255)
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    rgba[:4] = (255, 0, 0, 128)  # half-transparent red on top
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = np.asarray(open_image(tmp_path / "t.png"), dtype=np.int16)
    assert out[6, 6].tolist() == [255, 255, 255]
    assert out[1, 1, 0] == 255 and abs(int(out[1, 1, 1]) - 127) <= 1
    pal = Image.fromarray(rgba[..., :3]).convert("P")
    pal.info["transparency"] = pal.getpixel((6, 6))
    pal.save(tmp_path / "p.png", transparency=pal.getpixel((6, 6)))
    assert np.asarray(open_image(tmp_path / "p.png"))[6, 6].tolist() == [255, 255, 255]


def test_extraction_streams_members_to_disk(tmp_path):
    import tracemalloc

    size = 48 << 20
    p = _zip(tmp_path / "big.zip", {"images/zeros.bin": b"\0" * size}, zipfile.ZIP_DEFLATED)
    tracemalloc.start()
    try:
        safe_extract(p, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "out" / "images" / "zeros.bin").stat().st_size == size
    assert peak < 8 << 20, f"extraction held {peak >> 20} MiB in memory"
    with pytest.raises(ArchiveError, match="over the 1048576-byte limit"):
        safe_extract(p, tmp_path / "out2", max_member_bytes=1 << 20)
    assert not (tmp_path / "out2" / "images" / "zeros.bin").exists()


# ==== configs: one `error:` line each ==================================================================
@pytest.mark.parametrize("text, needle", [
    (b"train:\n  default_caption: \"caf\xe9 {token}\"\n", "not UTF-8 text (byte 0xe9 at offset 30)"),
    (b"model:\n  device: quantum\n", "model.device must be auto, cpu, cuda, cuda:N (or mps, xpu, xpu:N), got 'quantum'"),
    (b"sample:\n  prompts: a photo of <zwx>\n", "sample.prompts must be a list of prompts"),
    (b"sample:\n  prompts: ['a photo', 3]\n", "sample.prompts[1] must be a non-empty string, got 3"),
    (b"sample:\n  prompts: ['a photo', {x: 1}]\n", "sample.prompts[1] must be a non-empty string, got {'x': 1}"),
])
def test_bad_config_files_give_one_error_line(tmp_path, dataset_dir, capsys, text, needle):
    from qwen_zero_prior.cli import main

    p = tmp_path / "c.yaml"
    p.write_bytes(text)
    assert main(["train", "--config", str(p), "--dataset", str(dataset_dir),
                 "--output", str(tmp_path / "o" / "weights.zip")]) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()  # nothing started


# ==== faults: found at start, not after the work =======================================================
def test_full_disk_found_at_start(tmp_path, dataset_dir, monkeypatch, capsys):
    from qwen_zero_prior.cli import main

    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_scan(*a, **k):
        raise AssertionError("the dataset must not be scanned when the output cannot be written")

    monkeypatch.setattr(os, "fsync", enospc)  # the disk fills up: fsync of the probe reports it
    monkeypatch.setattr("qwen_zero_prior.training.run.scan_dataset", no_scan)
    out = tmp_path / "full"
    assert main(["train", "--dataset", str(dataset_dir), "--output", str(out / "weights.zip"),
                 "--set", "model.base_model=/no/such/model"]) == 2
    line = _one_line_error(capsys)
    assert f"output folder {out} is on a full disk" in line and "No space left on device" in line
    assert not out.exists()  # the probe is gone, and so is the folder the CLI created for this failed run


def _drop_dac_caps() -> None:
    """In the child, before exec: drop root's permission-override capabilities from the bounding set, so the
    CLI meets file modes as any user does (a read-only folder is read-only for it)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


def test_read_only_output_found_at_start(tmp_path, dataset_dir):
    ro = tmp_path / "read-only"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        cmd = [sys.executable, "-m", "qwen_zero_prior.cli", "train", "--dataset", str(dataset_dir),
               "--output", str(ro / "weights.zip"), "--set", "model.base_model=/no/such/model"]
        kw = {"preexec_fn": _drop_dac_caps} if os.geteuid() == 0 else {}  # root would write anywhere
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                           **kw)
        if r.returncode == 97:
            pytest.skip("running as root without CAP_SETPCAP: cannot make a folder read-only for the CLI")
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert lines == [f"error: output folder {ro} is not writable (Permission denied); choose a folder you "
                         "can write to"], r.stderr[-2000:]
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o755)


def _train_cfg(model_dir, **kw):
    from qwen_zero_prior.training.config import Config

    t = {"train_placeholder_token": True, "rank": 2, "steps": 2, "resolution": 32, "checkpoint_every": 0, "seed": 0}
    t.update(kw)
    return Config.from_dict({"model": {"base_model": str(model_dir), "dtype": "float32", "device": "cpu"}, "train": t})


def test_loss_plot_failure_does_not_fail_a_finished_run(tiny_model_dir, dataset_dir, tmp_path, caplog):
    from qwen_zero_prior.training.run import train

    out = tmp_path / "run"
    (out / "weights_loss.png").mkdir(parents=True)  # the plot cannot be written there
    with caplog.at_level("WARNING", logger="qwen_zero_prior"):
        result = train(_train_cfg(tiny_model_dir), dataset_dir, out / "weights.zip")
    assert result.loss_plot is None and load_archive(result.archive).meta.steps == 2
    assert "could not write the loss plot" in caplog.text and "the archive is complete" in caplog.text


LOCK_HOLDER = ("import sys, time\nfrom pathlib import Path\nfrom qwen_zero_prior.training.outputs import RunLock\n"
               "RunLock([Path(sys.argv[1])], Path(sys.argv[1]) / 'weights.zip').acquire()\n"
               "print('locked', flush=True)\ntime.sleep(600)\n")


def test_second_training_on_same_output_refused_and_stale_lock_taken_over(tiny_model_dir, dataset_dir, tmp_path,
                                                                           capsys, caplog):
    from qwen_zero_prior.cli import main

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["train", "--dataset", str(dataset_dir), "--output", str(out / "weights.zip"),
                "--set", f"model.base_model={tiny_model_dir}", "--set", "model.dtype=float32",
                "--set", "model.device=cpu", "--set", "train.steps=1", "--set", "train.rank=2",
                "--set", "train.resolution=32", "--set", "train.checkpoint_every=0"]
        assert main(args) == 2
        line = _one_line_error(capsys)
        assert f"output folder {out} is in use by another training (pid {holder.pid} on " in line
        assert f"writing {out / 'weights.zip'}" in line
        # the same archive from another --output-dir is refused too
        assert main(args + ["--output-dir", str(tmp_path / "elsewhere")]) == 2
        assert f"pid {holder.pid}" in _one_line_error(capsys)
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the OS lock does not
        holder.wait()
    assert (out / ".qzp-train.lock").is_file()
    with caplog.at_level("INFO", logger="qwen_zero_prior"):
        assert main(args) == 0
    assert f"left by a run that ended without releasing it (pid {holder.pid}" in caplog.text
    assert (out / "weights.zip").is_file() and not (out / ".qzp-train.lock").exists()


def test_leftovers_of_a_killed_run_cleaned_at_next_start(tiny_model_dir, dataset_dir, tmp_path):
    import socket

    from qwen_zero_prior.training.run import train

    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    leftovers = [out / ".weights.zip.abc_1234.part", out / ".weights_loss.png.zzzzzzzz.part"]
    dirs = [out / f".qzp-data-{host}-{dead_pid}-k1l2m3n4", out / "checkpoints" / ".step-000004.q1w2e3r4"]
    keep = [out / f".qzp-data-{host}-{os.getpid()}-live0000", out / ".other.zip.abcdefgh.part", out / "notes.txt"]
    for d in dirs + [keep[0]]:
        (d / "dataset").mkdir(parents=True)
        (d / "dataset" / "x.png").write_bytes(b"x")
    for f in leftovers + keep[1:]:
        f.write_bytes(b"half")
    train(_train_cfg(tiny_model_dir, steps=1), dataset_dir, out / "weights.zip")
    for p in leftovers + dirs:
        assert not p.exists(), p
    for p in keep:
        assert p.exists(), p
    assert [p for p in out.glob(f".qzp-data-{host}-*") if p != keep[0]] == []  # this run's own folder is gone


def test_outputs_get_the_umask_modes(tiny_model_dir, dataset_dir, tmp_path):
    from qwen_zero_prior.training.run import train

    old = os.umask(0o022)
    try:
        result = train(_train_cfg(tiny_model_dir, checkpoint_every=1), dataset_dir, tmp_path / "run" / "weights.zip")
        ck = tmp_path / "run" / "checkpoints" / "step-000002"
        assert oct(result.archive.stat().st_mode & 0o777) == oct(0o644)
        assert oct(result.loss_plot.stat().st_mode & 0o777) == oct(0o644)
        assert oct(ck.stat().st_mode & 0o777) == oct(0o755)
        assert oct((ck / "state.json").stat().st_mode & 0o777) == oct(0o644)
        os.umask(0o027)
        p = write_archive(tmp_path / "w.zip", _meta(), None, torch.ones(32))
        assert oct(p.stat().st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(old)


# ==== checkpoints ======================================================================================
@pytest.fixture
def checkpointed(tiny_model_dir, dataset_dir, tmp_path):
    from qwen_zero_prior.training.run import train

    train(_train_cfg(tiny_model_dir, steps=2, checkpoint_every=1), dataset_dir, tmp_path / "a" / "weights.zip")
    return tmp_path / "a"


def _resume_args(model_dir, dataset, out, resume, *extra):
    return ["train", "--dataset", str(dataset), "--output", str(out / "weights.zip"), "--resume", str(resume),
            "--set", f"model.base_model={model_dir}", "--set", "model.dtype=float32", "--set", "model.device=cpu",
            "--set", "train.train_placeholder_token=true", "--set", "train.rank=2", "--set", "train.steps=3",
            "--set", "train.resolution=32", "--set", "train.checkpoint_every=0", "--set", "train.seed=0", *extra]


@pytest.mark.parametrize("damage, needle", [
    (lambda ck: (ck / "lora.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{garbage"), "lora.safetensors: "),
    (lambda ck: (ck / "lora.safetensors").write_bytes((ck / "lora.safetensors").read_bytes()[:200]),
     "lora.safetensors: "),
    (lambda ck: (ck / "state.json").write_text("{not json"), "state.json: JSONDecodeError"),
    (lambda ck: (ck / "state.json").write_bytes(b"\xff\xfe{}"), "state.json: UnicodeDecodeError"),
    (lambda ck: (ck / "state.json").write_text("[1, 2]"), "state.json holds list, not an object"),
    (lambda ck: (ck / "state.json").write_text(json.dumps({**json.loads((ck / "state.json").read_text()),
                                                            "step": "two"})), "step must be a non-negative integer"),
    (lambda ck: (ck / "state.json").write_text(json.dumps({**json.loads((ck / "state.json").read_text()),
                                                            "optimizer": []})), "optimizer must be an object"),
    (lambda ck: (ck / "optimizer.safetensors").write_bytes(st_save({"x": torch.zeros(1)})), "optimizer.safetensors lacks"),
    (lambda ck: (ck / "state.json").write_text("[" * 100_000 + "]" * 100_000), "RecursionError"),
])
def test_corrupt_checkpoint_one_error_before_model_load(checkpointed, tiny_model_dir, dataset_dir, tmp_path,
                                                        monkeypatch, capsys, damage, needle):
    from qwen_zero_prior.cli import main
    from qwen_zero_prior.training import models

    ck = checkpointed / "checkpoints" / "step-000002"
    damage(ck)

    def no_load(*a, **k):
        raise AssertionError("the model must not load for a corrupt checkpoint")

    monkeypatch.setattr(models, "load_pipeline", no_load)
    monkeypatch.setattr("qwen_zero_prior.training.run.load_pipeline", no_load)
    assert main(_resume_args(tiny_model_dir, dataset_dir, tmp_path / "b", ck)) == 2
    line = _one_line_error(capsys)
    assert f"checkpoint {ck} is incomplete or corrupt" in line and needle in line, line


def test_resume_refuses_other_seed_dataset_or_layout_unless_forced(checkpointed, tiny_model_dir, dataset_dir,
                                                                    tmp_path, capsys):
    import shutil

    from qwen_zero_prior.cli import main

    ck = checkpointed / "checkpoints"
    assert main(_resume_args(tiny_model_dir, dataset_dir, tmp_path / "s", ck, "--set", "train.seed=7")) == 2
    line = _one_line_error(capsys)
    assert "train.seed=0 (this run: 7)" in line and "--force-resume" in line
    other = tmp_path / "other-data"
    shutil.copytree(dataset_dir, other)
    (other / "img_00.txt").write_text("a different caption")
    assert main(_resume_args(tiny_model_dir, other, tmp_path / "d", ck)) == 2
    line = _one_line_error(capsys)
    assert "a different dataset (4 images" in line and "this run: 4 images" in line
    # the LoRA layout cannot be forced: its tensors would not fit
    assert main(_resume_args(tiny_model_dir, dataset_dir, tmp_path / "r", ck, "--set", "train.rank=3",
                             "--force-resume")) == 2
    assert "train.rank=2 but this run has 3" in _one_line_error(capsys)
    # forced, another seed and dataset resume and reach the target step count
    assert main(_resume_args(tiny_model_dir, other, tmp_path / "f", ck, "--set", "train.seed=7",
                             "--force-resume")) == 0
    assert load_archive(tmp_path / "f" / "weights.zip").meta.steps == 3
    # unchanged settings resume without force
    assert main(_resume_args(tiny_model_dir, dataset_dir, tmp_path / "u", ck)) == 0
