"""Resumable checkpoints without pickle: LoRA, token vector and AdamW moments as safetensors, the rest JSON."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the current run."""


def save_checkpoint(root: Path, step: int, *, lora: dict[str, torch.Tensor], token: str | None,
                    vector: torch.Tensor | None, optimizer: torch.optim.Optimizer, param_names: list[str],
                    state: dict, keep: int = 2) -> Path:
    """Write ``root/step-NNNNNN`` atomically (temp dir + rename) and prune to the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, tmp / "lora.safetensors")
        if vector is not None:
            save_file({token: vector.detach().float().cpu().contiguous()}, tmp / "token.safetensors")
        opt_tensors, opt_meta = {}, {"param_groups": [], "steps": {}}
        by_id = {id(p): n for p, n in zip(_all_params(optimizer), param_names)}
        for group in optimizer.param_groups:
            opt_meta["param_groups"].append({k: v for k, v in group.items() if k != "params"})
            for p in group["params"]:
                st = optimizer.state.get(p)
                if not st:
                    continue
                name = by_id[id(p)]
                opt_tensors[f"{name}::exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
                opt_tensors[f"{name}::exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
                opt_meta["steps"][name] = float(st["step"])
        if opt_tensors:
            save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _all_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A ``step-N`` folder, or the newest one under a run folder / its ``checkpoints/``."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"no checkpoint found at {path} (expected a step-NNNNNN folder with {STATE_FILE})")


def load_checkpoint(path: Path) -> dict:
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        state["lora"] = load_file(path / "lora.safetensors")
        tok = path / "token.safetensors"
        state["token_tensors"] = load_file(tok) if tok.is_file() else {}
        opt = path / "optimizer.safetensors"
        state["optimizer_tensors"] = load_file(opt) if opt.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {e}") from e
    return state


RESUME_KEYS = ("rank", "lora_targets", "train_placeholder_token", "placeholder_token")


def check_compatible(state: dict, where: Path, train_cfg) -> None:
    """Refuse to resume a checkpoint trained with a different LoRA shape or token, naming the setting."""
    saved = state.get("config", {}).get("train", {})
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(train_cfg, key):
            raise CheckpointError(
                f"checkpoint {where} was trained with train.{key}={saved[key]!r} but this run has "
                f"{getattr(train_cfg, key)!r}; use the same value to resume"
            )


def restore_optimizer(optimizer: torch.optim.Optimizer, param_names: list[str], state: dict) -> None:
    meta = state["optimizer"]
    tensors = state["optimizer_tensors"]
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k in group and not isinstance(group[k], torch.Tensor):
                group[k] = tuple(v) if isinstance(group[k], tuple) else v
    for p, name in zip(_all_params(optimizer), param_names):
        if f"{name}::exp_avg" not in tensors:
            continue
        optimizer.state[p] = {
            "step": torch.tensor(meta["steps"][name]),
            "exp_avg": tensors[f"{name}::exp_avg"].to(p.device, p.dtype),
            "exp_avg_sq": tensors[f"{name}::exp_avg_sq"].to(p.device, p.dtype),
        }
