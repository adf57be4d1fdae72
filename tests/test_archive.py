import io
import json
import tarfile
import zipfile

import pytest
import torch

from qwen_zero_prior.training import archive as A
from qwen_zero_prior.training.archive import ArchiveError, ArchiveMeta, load_archive, safe_extract, write_archive


def _meta(**kw):
    base = dict(base_model="tiny", placeholder_token="<zwx>", placeholder_token_id=151665, rank=4,
                created=ArchiveMeta.now(), alpha=4.0)
    base.update(kw)
    return ArchiveMeta(**base)


def _lora():
    return {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4)}


def test_zip_roundtrip(tmp_path):
    vec = torch.randn(32)
    p = write_archive(tmp_path / "weights.zip", _meta(steps=9), _lora(), vec)
    names = zipfile.ZipFile(p).namelist()
    assert set(names) == {"meta.json", A.LORA_MEMBER, A.TOKEN_MEMBER}
    meta = json.loads(zipfile.ZipFile(p).read("meta.json"))
    for k in ("base_model", "placeholder_token", "placeholder_token_id", "rank", "created", "format_version",
              "alpha", "steps", "embedding_dim"):
        assert k in meta
    assert meta["created"].endswith("Z") and meta["embedding_dim"] == 32
    arc = load_archive(p)
    assert arc.token == "<zwx>" and torch.equal(arc.vector, vec)
    assert set(arc.lora_state_dict) == set(_lora())
    assert arc.meta.steps == 9
    # the vector is stored under the token string
    from safetensors.torch import load as st_load

    assert list(st_load(zipfile.ZipFile(p).read(A.TOKEN_MEMBER))) == ["<zwx>"]


@pytest.mark.parametrize("mode, suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_tar_roundtrip(tmp_path, mode, suffix):
    vec = torch.randn(32)
    z = write_archive(tmp_path / "weights.zip", _meta(), _lora(), vec)
    t = tmp_path / f"weights{suffix}"
    with zipfile.ZipFile(z) as zf, tarfile.open(t, mode) as tf:
        for name in zf.namelist():
            data = zf.read(name)
            info = tarfile.TarInfo(f"weights/{name}")  # also accept one top-level folder
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    arc = load_archive(t)
    assert torch.equal(arc.vector, vec) and arc.has_lora


def test_token_only_and_lora_only(tmp_path):
    a = load_archive(write_archive(tmp_path / "t.zip", _meta(rank=None), None, torch.ones(32)))
    assert a.has_token and not a.has_lora
    b = load_archive(write_archive(tmp_path / "l.zip", _meta(placeholder_token=None, placeholder_token_id=None), _lora()))
    assert b.has_lora and not b.has_token
    with pytest.raises(ArchiveError, match="nothing to write"):
        write_archive(tmp_path / "n.zip", _meta())


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "weights.zip"
    write_archive(target, _meta(), _lora(), torch.ones(32))
    old = target.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(A, "token_file_bytes", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_archive(target, _meta(), _lora(), torch.zeros(32))
    assert target.read_bytes() == old  # the previous archive is intact, never half-written
    assert [p.name for p in tmp_path.iterdir()] == ["weights.zip"]


def _zip_with(tmp_path, members: dict, name="bad.zip"):
    p = tmp_path / name
    with zipfile.ZipFile(p, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    return p


def test_missing_lora_message(tmp_path):
    meta = _meta()
    meta.contents = ["lora", "token"]
    p = _zip_with(tmp_path, {"meta.json": meta.to_json(), "readme.txt": "x"})
    with pytest.raises(ArchiveError) as e:
        load_archive(p)
    assert str(e.value) == (
        f"LoRA weights not found: expected lora/lora_weights.safetensors in {p} (found: meta.json, readme.txt)"
    )


@pytest.mark.parametrize(
    "members, needle",
    [
        ({"../evil.txt": "x"}, "'..'"),
        ({"/etc/evil": "x"}, "absolute path"),
        ({"readme.txt": "x"}, "meta.json not found"),
        ({"meta.json": "{not json"}, "not valid JSON"),
        ({"meta.json": json.dumps({"format_version": 1})}, "lacks required key"),
        ({"meta.json": json.dumps({"format_version": 99})}, "newer than this version"),
    ],
)
def test_bad_archives(tmp_path, members, needle):
    with pytest.raises(ArchiveError, match=needle):
        load_archive(_zip_with(tmp_path, members))


def test_bad_meta_values(tmp_path):
    m = json.loads(_meta().to_json())
    m["rank"] = "four"
    with pytest.raises(ArchiveError, match="rank must be a positive integer or null, got 'four'"):
        load_archive(_zip_with(tmp_path, {"meta.json": json.dumps(m)}))
    m = json.loads(_meta().to_json())
    m["created"] = "yesterday"
    with pytest.raises(ArchiveError, match="created"):
        load_archive(_zip_with(tmp_path, {"meta.json": json.dumps(m)}))


def test_corrupt_tensor_file(tmp_path):
    meta = _meta()
    meta.contents = ["lora"]
    p = _zip_with(tmp_path, {"meta.json": meta.to_json(), A.LORA_MEMBER: b"garbage"})
    with pytest.raises(ArchiveError, match="not a valid safetensors file"):
        load_archive(p)


def test_not_an_archive(tmp_path):
    p = tmp_path / "weights.zip"
    p.write_bytes(b"hello, I am not a zip")
    with pytest.raises(ArchiveError, match="not a zip, tar or tar.gz archive"):
        load_archive(p)
    with pytest.raises(ArchiveError, match="archive not found"):
        load_archive(tmp_path / "nope.zip")


def test_links_and_size_limits_refused(tmp_path):
    t = tmp_path / "link.tar"
    with tarfile.open(t, "w") as tf:
        info = tarfile.TarInfo("meta.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ArchiveError, match="is a link"):
        load_archive(t)
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("meta.json")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        load_archive(z)
    big = _zip_with(tmp_path, {"meta.json": "x" * 5000}, "big.zip")
    with pytest.raises(ArchiveError, match="over the 1000-byte limit"):
        load_archive(big, max_member_bytes=1000)
    with pytest.raises(ArchiveError, match="unpacks to over"):
        safe_extract(_zip_with(tmp_path, {"a": "x" * 600, "b": "y" * 600}, "two.zip"), tmp_path / "out",
                     max_total_bytes=1000)
    assert not (tmp_path / "out" / "a").exists()
