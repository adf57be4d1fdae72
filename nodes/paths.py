"""Where the nodes may read and write: ComfyUI's own models, input and output folders, nothing else.

A graph queued through the API can name any string. Every path a node uses is resolved (symlinks followed)
and must land inside one of ComfyUI's folders; ``../``, absolute paths elsewhere and symlinks pointing out
are refused with one clear message.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

FOLDER = "zero_prior"  # models/zero_prior: archives (weights.zip) listed by Load Placeholder Archive
ARCHIVE_EXTS = {".zip", ".tar", ".gz", ".tgz"}


class PathNotAllowed(ValueError):
    """A graph named a path outside ComfyUI's models / input / output folders."""


def register_folder() -> None:
    """models/zero_prior for archives (idempotent; also honours extra_model_paths.yaml entries)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        exts.update(ARCHIVE_EXTS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(ARCHIVE_EXTS))


def allowed_roots() -> list[Path]:
    roots = [folder_paths.models_dir, folder_paths.get_input_directory(), folder_paths.get_output_directory()]
    for name in (FOLDER, "loras"):
        roots += folder_paths.get_folder_paths(name)
    return [Path(r).resolve() for r in roots]


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def resolve_input_path(value: str, what: str = "archive") -> Path:
    """An existing file named by a graph: absolute, or relative to models/zero_prior, input or output."""
    raw = (value or "").strip().strip('"')
    if not raw:
        raise PathNotAllowed(f"{what} path is empty")
    roots = allowed_roots()
    p = Path(raw).expanduser()
    candidates = [p] if p.is_absolute() else [Path(r) / p for r in
                                              (*folder_paths.get_folder_paths(FOLDER),
                                               folder_paths.get_input_directory(),
                                               folder_paths.get_output_directory(), folder_paths.models_dir)]
    for cand in candidates:
        real = cand.resolve()
        if not _inside(real, roots):
            raise PathNotAllowed(
                f"{what} path {raw!r} resolves to {real}, outside ComfyUI's models, input and output folders; "
                f"put the file under models/{FOLDER}/ (or input/, output/) and name it relative to that"
            )
        if real.is_file():
            return real
    raise FileNotFoundError(
        f"{what} {raw!r} not found in models/{FOLDER}/, input/ or output/ (looked at: "
        f"{', '.join(str(c) for c in candidates)})"
    )


def resolve_output_path(value: str, default_name: str) -> Path:
    """A file to write, relative to ComfyUI's output folder (absolute paths must be inside it too)."""
    out_root = Path(folder_paths.get_output_directory()).resolve()
    raw = (value or "").strip() or default_name
    p = Path(raw).expanduser()
    real = (p if p.is_absolute() else out_root / p).resolve()
    if not _inside(real, [out_root]) or real == out_root:
        raise PathNotAllowed(
            f"output path {raw!r} resolves to {real}, outside ComfyUI's output folder {out_root}; "
            "give a path relative to the output folder"
        )
    return real


def resolve_dataset_path(value: str) -> Path:
    """A dataset folder or archive named by a graph: relative to input/ (or output/), confined like archives."""
    raw = (value or "").strip()
    if not raw:
        raise PathNotAllowed("dataset path is empty")
    p = Path(raw).expanduser()
    roots = allowed_roots()
    candidates = [p] if p.is_absolute() else [Path(folder_paths.get_input_directory()) / p,
                                              Path(folder_paths.get_output_directory()) / p]
    for cand in candidates:
        real = cand.resolve()
        if not _inside(real, roots):
            raise PathNotAllowed(
                f"dataset path {raw!r} resolves to {real}, outside ComfyUI's models, input and output folders; "
                "put the dataset under input/ and name it relative to that"
            )
        if real.exists():
            return real
    raise FileNotFoundError(f"dataset {raw!r} not found in input/ or output/")
