"""Load Placeholder Archive: weights.zip (zip / tar / tar.gz) -> one ZERO_PRIOR_ARCHIVE object."""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..training.archive import load_archive
from .paths import FOLDER, resolve_input_path
from .sockets import CATEGORY, ZeroPriorArchive

logger = logging.getLogger(__name__)
NONE = "(use path)"


def _pick(archive: str, path: str):
    if path and path.strip():
        return resolve_input_path(path, "archive")
    if not archive or archive == NONE:
        raise ValueError(f"Load Placeholder Archive: choose a file from models/{FOLDER}/ or give a path")
    full = folder_paths.get_full_path(FOLDER, archive)
    if full is None:
        raise FileNotFoundError(f"archive {archive!r} not found in models/{FOLDER}/")
    return resolve_input_path(full, "archive")


class LoadPlaceholderArchive(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroPriorLoadArchive",
            display_name="Load Placeholder Archive",
            category=CATEGORY,
            description="Reads weights.zip from zero-prior training: the placeholder token's string and vector (each "
            "token's, for an archive of several), the Qwen-Image LoRA and meta.json. Re-executes only when the file "
            "changes.",
            inputs=[
                io.Combo.Input(
                    "archive",
                    options=[NONE] + folder_paths.get_filename_list(FOLDER),
                    tooltip=f"An archive in ComfyUI/models/{FOLDER}/ (zip, tar or tar.gz as written by training).",
                ),
                io.String.Input(
                    "path",
                    default="",
                    optional=True,
                    tooltip="Instead of the list: a path relative to models/zero_prior/, input/ or output/ "
                    "(e.g. the training node's output). Paths outside ComfyUI's folders are refused.",
                ),
            ],
            outputs=[
                ZeroPriorArchive.Output(display_name="archive", tooltip="Token, vector, LoRA and metadata."),
                io.String.Output(display_name="token", tooltip="The placeholder token to write in prompts (several: "
                                 "comma-separated, in training order, e.g. '<alice>, <bob>')."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, archive, path=""):
        try:
            p = _pick(archive, path)
        except (ValueError, FileNotFoundError) as e:
            return str(e)
        st = p.stat()
        return f"{p}:{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def execute(cls, archive, path="") -> io.NodeOutput:
        p = _pick(archive, path)
        arc = load_archive(p)
        m = arc.meta
        parts = []
        if arc.has_token:
            tokens = arc.tokens
            parts.append(f"token{'s' if len(tokens) > 1 else ''} {', '.join(tokens)} ({arc.vector.shape[0]}-wide)")
        if arc.has_lora:
            parts.append(f"LoRA rank {m.rank}, {len(arc.lora_state_dict)} tensors")
        info = f"{p.name}: " + ", ".join(parts) + f"; {m.steps} steps; base {m.base_model}"
        logger.info("zero-prior archive %s", info)
        return io.NodeOutput(arc, ", ".join(arc.tokens), ui={"text": [info]})
