"""``weights.zip``: writing it atomically, reading zip/tar/tar.gz safely, validating ``meta.json``.

Layout::

    meta.json                              format_version, base_model, model_family, placeholder_token(s), ...
    lora/lora_weights.safetensors          diffusers keys (QwenImagePipeline.load_lora_weights loads them)
    token/placeholder_embedding.safetensors  {token: float32 vector} for each token, keyed by the token *string*

Several tokens (``placeholder_tokens`` in meta.json, in training order) share the one safetensors file;
``placeholder_token`` stays the first, so readers of the one-token format find one of them. Archives written
before several tokens existed have no ``placeholder_tokens``: their token list is ``[placeholder_token]``.

Nothing here unpickles anything: tensors are safetensors, metadata is JSON.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import math
import os
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = 1
LORA_MEMBER = "lora/lora_weights.safetensors"
TOKEN_MEMBER = "token/placeholder_embedding.safetensors"
META_MEMBER = "meta.json"
DEFAULT_MAX_MEMBER_BYTES = 8 << 30  # a rank-1024 LoRA of the 20B transformer stays below this
DEFAULT_MAX_TOTAL_BYTES = 16 << 30
MAX_META_BYTES = 1 << 20  # meta.json is a few hundred bytes
MAX_TOKEN_BYTES = 64 << 20  # one float32 vector (14 KiB for Qwen-Image)
MAX_JSON_DEPTH = 32
_CHUNK = 1 << 20
# what a damaged zip / tar / gzip stream raises while being read
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, zlib.error, gzip.BadGzipFile, EOFError, OSError, ValueError,
            NotImplementedError)


class ArchiveError(ValueError):
    """The archive is unreadable, unsafe, or not laid out as this project writes it."""


@dataclass
class ArchiveMeta:
    base_model: str
    placeholder_token: str | None
    placeholder_token_id: int | None
    rank: int | None
    created: str
    format_version: int = FORMAT_VERSION
    alpha: float | None = None
    lora_targets: list = field(default_factory=list)
    placeholder_init_std: float | None = None
    steps: int = 0
    embedding_dim: int | None = None
    train_placeholder_token: bool = False
    contents: list = field(default_factory=list)  # subset of ["lora", "token"]
    trainer: str = "qwen-zero-prior"
    # qwen-image | qwen-image-2.1 (training.families); archives written before 2.1 support lack it: Qwen-Image
    model_family: str = "qwen-image"
    # every token in training order (the first is placeholder_token) and their ids at training time; archives
    # written before several tokens existed lack both: [placeholder_token], [placeholder_token_id]
    placeholder_tokens: list | None = None
    placeholder_token_ids: list | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> list[str]:
        """Every token of the archive, in training order ([] for none)."""
        if self.placeholder_tokens:
            return list(self.placeholder_tokens)
        return [self.placeholder_token] if self.placeholder_token else []

    @property
    def token_ids(self) -> list[int | None]:
        """The tokens' ids at training time, aligned with :attr:`tokens` (None where unknown)."""
        if self.placeholder_token_ids:
            return list(self.placeholder_token_ids)
        return [self.placeholder_token_id] + [None] * (len(self.tokens) - 1) if self.tokens else []

    @staticmethod
    def now() -> str:
        return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")

    @classmethod
    def from_json(cls, raw: bytes | str, where: str) -> ArchiveMeta:
        if len(raw) > MAX_META_BYTES:
            raise ArchiveError(f"{where}: meta.json is {len(raw)} bytes, over the {MAX_META_BYTES}-byte limit")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArchiveError(f"{where}: meta.json is not valid JSON ({e})") from e
        except RecursionError:
            raise ArchiveError(f"{where}: meta.json is nested too deeply to read") from None
        _check_depth(data, where)
        if not isinstance(data, dict):
            raise ArchiveError(f"{where}: meta.json must hold an object, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ArchiveError(f"{where}: meta.json format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ArchiveError(
                f"{where}: meta.json format_version {version} is newer than this version supports "
                f"({FORMAT_VERSION}); upgrade comfyui-qwen-zero-prior"
            )
        known = {f for f in cls.__dataclass_fields__} - {"extra"}  # extra's keys are written at the top level
        required = ("base_model", "placeholder_token", "placeholder_token_id", "rank", "created")
        missing = [k for k in required if k not in data]
        if missing:
            raise ArchiveError(f"{where}: meta.json lacks required key(s) {missing}")
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise ArchiveError(f"{where}: meta.json extra must be an object, got {extra!r:.80}")
        extra = {**extra, **{k: v for k, v in data.items() if k not in known and k != "extra"}}
        meta = cls(**{k: v for k, v in data.items() if k in known}, extra=extra)
        meta.validate(where)
        return meta

    def validate(self, where: str = "meta.json") -> None:
        """Every field's type and range; raises :class:`ArchiveError` naming the field and quoting its value."""

        def bad(key: str, want: str) -> ArchiveError:
            return ArchiveError(f"{where}: meta.json {key} must be {want}, got {getattr(self, key)!r:.200}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.base_model, str):
            raise bad("base_model", "a string")
        if self.placeholder_token is not None:
            from .token import TokenError, validate_token

            try:
                validate_token(self.placeholder_token)
            except TokenError as e:
                raise ArchiveError(f"{where}: meta.json {e}") from None
        tid, std = self.placeholder_token_id, self.placeholder_init_std
        if tid is not None and (not is_int(tid) or tid < 0):
            raise bad("placeholder_token_id", "a non-negative integer or null")
        if self.rank is not None and (not is_int(self.rank) or self.rank < 1):
            raise bad("rank", "a positive integer or null")
        if not isinstance(self.created, str):
            raise bad("created", "an ISO-8601 string")
        try:
            _dt.datetime.fromisoformat(self.created.replace("Z", "+00:00"))
        except ValueError:
            raise bad("created", "an ISO-8601 UTC timestamp") from None
        if not is_int(self.format_version) or self.format_version < 1:
            raise bad("format_version", "a positive integer")
        if self.alpha is not None and (not is_num(self.alpha) or self.alpha < 0):
            raise bad("alpha", "a non-negative number or null")
        if not isinstance(self.lora_targets, list) or not all(isinstance(t, str) for t in self.lora_targets):
            raise bad("lora_targets", "a list of module names")
        if std is not None and (not is_num(std) or std < 0):
            raise bad("placeholder_init_std", "a non-negative number or null")
        if not is_int(self.steps) or self.steps < 0:
            raise bad("steps", "a non-negative integer")
        if self.embedding_dim is not None and (not is_int(self.embedding_dim) or self.embedding_dim < 1):
            raise bad("embedding_dim", "a positive integer or null")
        if not isinstance(self.train_placeholder_token, bool):
            raise bad("train_placeholder_token", "true or false")
        if not isinstance(self.trainer, str):
            raise bad("trainer", "a string")
        if not isinstance(self.extra, dict):
            raise bad("extra", "an object")
        if (not isinstance(self.contents, list) or not all(isinstance(c, str) for c in self.contents)
                or not set(self.contents) <= {"lora", "token"}):
            raise bad("contents", "a list drawn from ['lora', 'token']")
        if "token" in self.contents and not self.placeholder_token:
            raise ArchiveError(f"{where}: meta.json lists a token but placeholder_token is empty")
        if self.placeholder_tokens is not None:
            from .token import TokenError, validate_tokens

            if not isinstance(self.placeholder_tokens, list):
                raise bad("placeholder_tokens", "a list of token strings or null")
            try:
                validate_tokens(self.placeholder_tokens)
            except TokenError as e:
                raise ArchiveError(f"{where}: meta.json placeholder_tokens: {e}") from None
            if self.placeholder_tokens[0] != self.placeholder_token:
                raise ArchiveError(f"{where}: meta.json placeholder_token {self.placeholder_token!r} must be the first "
                                   f"of placeholder_tokens {self.placeholder_tokens}")
        ids = self.placeholder_token_ids
        if ids is not None:
            if (not isinstance(ids, list) or not all(i is None or (is_int(i) and i >= 0) for i in ids)
                    or len(ids) != len(self.tokens)):
                raise bad("placeholder_token_ids", f"a list of {len(self.tokens)} non-negative integers (one per token) "
                          "or null")
            if ids and ids[0] != self.placeholder_token_id:
                raise ArchiveError(f"{where}: meta.json placeholder_token_id {self.placeholder_token_id!r} must be the "
                                   f"first of placeholder_token_ids {ids}")
        from .families import FAMILIES  # families imports this module

        if self.model_family not in FAMILIES:
            raise ArchiveError(
                f"{where}: meta.json model_family must be one of {list(FAMILIES)}, got {self.model_family!r}; "
                "an unknown family comes from a newer version: upgrade comfyui-qwen-zero-prior"
            )

    def to_json(self) -> str:
        data = asdict(self)
        extra = data.pop("extra") or {}
        data.update(extra)
        return json.dumps(data, indent=2, sort_keys=True)


def _check_depth(value, where: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (iteratively: deep nesting must not recurse here)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ArchiveError(f"{where}: meta.json is nested deeper than {MAX_JSON_DEPTH} levels; refusing")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


@dataclass
class PlaceholderArchive:
    """What an archive holds, in memory."""

    meta: ArchiveMeta
    lora_state_dict: dict[str, torch.Tensor] | None
    lora_metadata: dict[str, str] | None
    token: str | None  # the first token (its vector: ``vector``); every token: ``vectors``
    vector: torch.Tensor | None
    source: str = ""
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)  # token -> float32 vector, in training order

    def __post_init__(self) -> None:
        if not self.vectors and self.token is not None and self.vector is not None:
            self.vectors = {self.token: self.vector}

    @property
    def tokens(self) -> list[str]:
        """Every token, in training order."""
        return list(self.vectors)

    @property
    def has_lora(self) -> bool:
        return bool(self.lora_state_dict)

    @property
    def has_token(self) -> bool:
        return self.vector is not None


# ---- writing ------------------------------------------------------------------------------------------


def token_file_bytes(token: str | dict[str, torch.Tensor], vector: torch.Tensor | None = None) -> bytes:
    """The token member: ``{token: vector}`` for each token (``token`` a token string with ``vector``, or the
    mapping). Its header's ``token`` names the first, as in the one-token format; the order is meta.json's."""
    vectors = token if isinstance(token, dict) else {token: vector}
    return st_save({t: v.detach().to(torch.float32).contiguous().cpu() for t, v in vectors.items()},
                   metadata={"format": "pt", "token": next(iter(vectors))})


def lora_file_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return st_save(tensors, metadata={"format": "pt", **(metadata or {})})


def write_archive(
    path: str | os.PathLike,
    meta: ArchiveMeta,
    lora_state_dict: dict[str, torch.Tensor] | None = None,
    vector: torch.Tensor | None = None,
    lora_metadata: dict[str, str] | None = None,
    extra_files: dict[str, bytes] | None = None,
    *,
    vectors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``weights.zip`` atomically: a temp file in the same folder, fsync, then ``os.replace``.

    The token vectors: ``vector`` (one, for ``meta.placeholder_token``) or ``vectors`` (token -> vector, in training
    order; ``meta.placeholder_token`` and ``placeholder_tokens`` are set from it). ``meta.placeholder_token_ids``
    keeps the ids the caller set when they are one per token, else the first id only."""
    path = Path(path)
    if vector is not None and vectors is not None:
        raise ArchiveError("give the token vector as vector= or vectors=, not both")
    if vector is not None:
        if not meta.placeholder_token:
            raise ArchiveError("cannot store a token vector without meta.placeholder_token")
        vectors = {meta.placeholder_token: vector}
    contents = []
    if lora_state_dict:
        contents.append("lora")
    if vectors:
        tokens = list(vectors)
        meta.placeholder_token, meta.placeholder_tokens = tokens[0], tokens
        ids = meta.placeholder_token_ids
        if not (isinstance(ids, list) and len(ids) == len(tokens) and ids[0] == meta.placeholder_token_id):
            ids = [meta.placeholder_token_id] + [None] * (len(tokens) - 1)
        meta.placeholder_token_ids = ids if any(i is not None for i in ids) else None
        widths = {int(v.shape[-1]) for v in vectors.values()}
        if len(widths) != 1:
            raise ArchiveError(f"token vectors of different widths {sorted(widths)}: all must fit one text encoder")
        contents.append("token")
        meta.embedding_dim = widths.pop()
    else:
        meta.placeholder_tokens = meta.placeholder_token_ids = None
    if not contents:
        raise ArchiveError("nothing to write: the archive needs a LoRA, a token vector, or both")
    meta.contents = contents
    meta.validate(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_for(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr(META_MEMBER, meta.to_json())
                if lora_state_dict:
                    zf.writestr(LORA_MEMBER, lora_file_bytes(lora_state_dict, lora_metadata))
                if vectors:
                    zf.writestr(TOKEN_MEMBER, token_file_bytes(vectors))
                for name, data in (extra_files or {}).items():
                    _check_member_name(name, str(path))
                    zf.writestr(name, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass  # not Linux: fall back to the set-and-restore idiom below
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mkstemp_for(path: Path) -> tuple[int, str]:
    """A temp file beside ``path`` (``.<name>.XXXX.part``) with the mode a plain ``open`` would give it:
    mkstemp creates 0600 files, and os.replace keeps that mode, so outputs would be private to their owner."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())
    except OSError:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_for(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- safe reading -------------------------------------------------------------------------------------


def _check_member_name(name: str, where: str) -> str:
    if not name or "\x00" in name or "\\" in name:
        raise ArchiveError(f"{where}: unsafe member name {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{where}: member {name!r} has an absolute path; refusing to extract")
    if ".." in p.parts:
        raise ArchiveError(f"{where}: member {name!r} points outside the archive ('..'); refusing to extract")
    return str(p)


@dataclass
class _Member:
    name: str
    size: int
    is_dir: bool


class SafeArchiveReader:
    """Uniform, validated access to zip / tar / tar.gz members (no links, no absolute paths, no ``..``).

    Opening lists the members and checks their names and types, and that the listing is complete (a tar
    must end in its end-of-archive block and a gzip stream in its checksum: a truncated file is refused, not
    listed short). Sizes are checked when a member is read or extracted: a member that is never needed is
    never read, one that is needed is refused by its declared size before reading and by its actual size
    while reading. Every damage found while reading (bad CRC, corrupt deflate stream, truncation) raises
    :class:`ArchiveError` naming the archive and the member.
    """

    def __init__(self, path: str | os.PathLike, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES):
        self.path = Path(path)
        self.where = str(self.path)
        self.max_member_bytes = max_member_bytes
        self.max_total_bytes = max_total_bytes
        if not self.path.is_file():
            raise ArchiveError(f"archive not found: {self.where}")
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        if zipfile.is_zipfile(self.path):
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (*_CORRUPT, RecursionError) as e:
                raise ArchiveError(f"{self.where}: corrupt zip ({e})") from e
        else:
            try:
                self._tar = tarfile.open(self.path, "r:*")
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise ArchiveError(
                    f"{self.where}: not a zip, tar or tar.gz archive; expected weights.zip as written by training"
                ) from e
        self.members: dict[str, _Member] = {}
        try:
            for m in self._iter_raw():
                name = _check_member_name(m.name, self.where)
                if m.size < 0:
                    raise ArchiveError(f"{self.where}: member {name!r} declares a negative size")
                self.members[name] = _Member(name, m.size, m.is_dir)
        except BaseException:
            self.close()
            raise

    def _iter_raw(self):
        if self._zip is not None:
            for info in self._zip.infolist():
                mode = (info.external_attr >> 16) & 0xFFFF
                if stat.S_ISLNK(mode):
                    raise ArchiveError(f"{self.where}: member {info.filename!r} is a symbolic link; refusing")
                yield _Member(info.filename.rstrip("/") or info.filename, info.file_size, info.is_dir())
        else:
            try:
                infos = self._tar.getmembers()
                self._check_tar_end()
            except ArchiveError:
                raise
            except (*_CORRUPT, RecursionError) as e:
                raise ArchiveError(f"{self.where}: corrupt or truncated tar ({e.__class__.__name__}: {e})") from e
            for info in infos:
                if info.issym() or info.islnk():
                    raise ArchiveError(f"{self.where}: member {info.name!r} is a link; refusing")
                if not (info.isfile() or info.isdir()):
                    raise ArchiveError(f"{self.where}: member {info.name!r} is not a regular file; refusing")
                yield _Member(info.name, info.size, info.isdir())

    def _check_tar_end(self) -> None:
        """tarfile stops listing silently at a truncated header; a complete tar has its end-of-archive (zero)
        block where the listing stopped. Reading on to the end also makes gzip check its CRC and length."""
        fh = self._tar.fileobj
        fh.seek(self._tar.offset)
        end = fh.read(tarfile.BLOCKSIZE)
        if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
            raise ArchiveError(
                f"{self.where}: the tar is truncated or damaged after member {self._tar.members[-1].name!r} "
                f"(no end-of-archive block at byte {self._tar.offset}); re-create or re-download it"
                if self._tar.members else f"{self.where}: the tar is truncated or damaged (no end-of-archive block)"
            )
        while fh.read(_CHUNK):
            pass

    def files(self) -> list[str]:
        return sorted(n for n, m in self.members.items() if not m.is_dir)

    def find(self, member: str) -> str | None:
        """Exact member, or the same path under one top-level folder (``weights/meta.json``)."""
        if member in self.members:
            return member
        hits = [n for n in self.files() if n.endswith("/" + member) and n.count("/") == member.count("/") + 1]
        return hits[0] if len(hits) == 1 else None

    def _check_declared(self, name: str, limit: int) -> int:
        size = self.members[name].size
        if size > limit:
            raise ArchiveError(f"{self.where}: member {name!r} is {size} bytes, over the {limit}-byte limit")
        return size

    def _open(self, name: str):
        if self._zip is not None:
            return self._zip.open(name)
        return self._tar.extractfile(self._tar.getmember(name))

    def _copy(self, name: str, limit: int, sink) -> int:
        """Stream member ``name`` into ``sink(chunk)``; refuse it past ``limit`` or its declared size."""
        declared = self._check_declared(name, limit)

        def damaged(e: BaseException) -> ArchiveError:
            return ArchiveError(f"{self.where}: member {name!r} is corrupt ({e.__class__.__name__}: {e}); the archive "
                                "is damaged, re-create or re-download it")

        n = 0
        try:
            fh = self._open(name)
        except _CORRUPT as e:
            raise damaged(e) from e
        with fh:
            while True:
                try:  # only reading is guarded: an error of the sink (a full disk) is not the archive's fault
                    chunk = fh.read(_CHUNK)
                except _CORRUPT as e:
                    raise damaged(e) from e
                if not chunk:
                    break
                n += len(chunk)
                if n > declared or n > limit:
                    raise ArchiveError(f"{self.where}: member {name!r} unpacks to more than the {declared} bytes it "
                                       "declares; refusing")
                sink(chunk)
        if n != declared:
            raise ArchiveError(f"{self.where}: member {name!r} holds {n} bytes but declares {declared}; the archive "
                               "is damaged, re-create or re-download it")
        return n

    def read(self, member: str, limit: int | None = None) -> bytes:
        """The whole member in memory (for the small files load_archive needs), at most ``limit`` bytes."""
        name = self.find(member)
        if name is None:
            raise KeyError(member)
        parts: list[bytes] = []
        self._copy(name, min(limit or self.max_member_bytes, self.max_member_bytes), parts.append)
        return b"".join(parts)

    def extract_all(self, dest: str | os.PathLike) -> Path:
        """Every member to ``dest``, streamed to disk in chunks (never a whole member in memory), sizes capped."""
        dest = Path(dest).resolve()
        dest.mkdir(parents=True, exist_ok=True)
        total = 0
        for name, m in self.members.items():  # refuse by declared sizes before writing anything
            if not m.is_dir:
                total += self._check_declared(name, self.max_member_bytes)
                if total > self.max_total_bytes:
                    raise ArchiveError(f"{self.where}: archive unpacks to over {self.max_total_bytes} bytes; refusing")
        for name, m in self.members.items():
            target = (dest / name).resolve()
            if dest != target and dest not in target.parents:
                raise ArchiveError(f"{self.where}: member {name!r} would land outside {dest}; refusing")
            if m.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(target, "wb") as out:
                    self._copy(name, self.max_member_bytes, out.write)
            except BaseException:
                target.unlink(missing_ok=True)
                raise
        return dest

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, **limits: int) -> Path:
    with SafeArchiveReader(archive, **limits) as r:
        return r.extract_all(dest)


def _load_safetensors(data: bytes, member: str, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except Exception as e:  # safetensors raises its own SafetensorError and others for garbage input
        raise ArchiveError(f"{where}: {member} is not a valid safetensors file ({e})") from e
    return tensors, header.get("__metadata__", {}) or {}


def load_archive(path: str | os.PathLike, **limits: int) -> PlaceholderArchive:
    """Read and validate an archive (zip, tar, tar.gz) into memory."""
    with SafeArchiveReader(path, **limits) as r:
        where = r.where
        if r.find(META_MEMBER) is None:
            raise ArchiveError(
                f"meta.json not found in {where} (found: {', '.join(r.files()) or 'nothing'}); "
                "expected weights.zip as written by qwen-zero-prior training"
            )
        meta = ArchiveMeta.from_json(r.read(META_MEMBER, MAX_META_BYTES), where)
        contents = set(meta.contents) if meta.contents else {"lora"} | ({"token"} if meta.placeholder_token else set())
        lora_sd = lora_md = None
        if "lora" in contents:
            if r.find(LORA_MEMBER) is None:
                raise ArchiveError(
                    f"LoRA weights not found: expected {LORA_MEMBER} in {where} (found: {', '.join(r.files()) or 'nothing'})"
                )
            lora_sd, lora_md = _load_safetensors(r.read(LORA_MEMBER), LORA_MEMBER, where)
            if not lora_sd or not all("lora" in k for k in lora_sd):
                raise ArchiveError(f"{where}: {LORA_MEMBER} holds no LoRA tensors (keys must contain 'lora')")
            for k, v in lora_sd.items():
                if not v.is_floating_point() or not torch.isfinite(v).all():
                    raise ArchiveError(f"{where}: LoRA tensor {k!r} is not finite floating point "
                                       f"({v.dtype}{', holds NaN or Inf' if v.is_floating_point() else ''}); "
                                       "the LoRA is unusable (training diverged or the file is damaged)")
        vectors: dict[str, torch.Tensor] = {}
        if "token" in contents:
            if r.find(TOKEN_MEMBER) is None:
                raise ArchiveError(
                    f"placeholder embedding not found: expected {TOKEN_MEMBER} in {where} "
                    f"(found: {', '.join(r.files()) or 'nothing'})"
                )
            tensors, _ = _load_safetensors(r.read(TOKEN_MEMBER, MAX_TOKEN_BYTES), TOKEN_MEMBER, where)
            for token in meta.tokens:  # [placeholder_token] for archives of the one-token format
                if token not in tensors:
                    raise ArchiveError(
                        f"{where}: {TOKEN_MEMBER} has no vector for token {token!r} (keys: {sorted(tensors)})"
                    )
                vector = tensors[token]
                if not vector.is_floating_point():
                    raise ArchiveError(f"{where}: the vector for {token!r} must be floating point, got {vector.dtype}")
                vector = vector.to(torch.float32)
                if vector.ndim != 1 or not torch.isfinite(vector).all():
                    raise ArchiveError(f"{where}: the vector for {token!r} must be 1-D and finite, got shape "
                                       f"{tuple(vector.shape)}")
                if meta.embedding_dim is not None and vector.shape[0] != meta.embedding_dim:
                    raise ArchiveError(f"{where}: vector width {vector.shape[0]} of {token!r} does not match meta.json "
                                       f"embedding_dim {meta.embedding_dim}")
                vectors[token] = vector
        token = next(iter(vectors), None)
        return PlaceholderArchive(meta, lora_sd, lora_md, token, vectors.get(token), source=where, vectors=vectors)
