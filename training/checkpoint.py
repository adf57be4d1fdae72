"""Resumable checkpoints without pickle: LoRA, token vectors (keyed by token string) and AdamW moments as
safetensors, the rest JSON."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .archive import umask

logger = logging.getLogger(__name__)
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the current run."""


def save_checkpoint(root: Path, step: int, *, lora: dict[str, torch.Tensor], token: str | None = None,
                    vector: torch.Tensor | None = None, optimizer: torch.optim.Optimizer, param_names: list[str],
                    state: dict, keep: int = 2, vectors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``root/step-NNNNNN`` atomically (temp dir + rename) and prune to the newest ``keep``.

    The token vectors: ``vectors`` (token -> vector), or one ``token`` with its ``vector``."""
    if vectors is None and vector is not None:
        vectors = {token: vector}
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=root))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp gives 0700; the renamed folder keeps it
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, tmp / "lora.safetensors")
        if vectors:
            save_file({t: v.detach().float().cpu().contiguous() for t, v in vectors.items()}, tmp / "token.safetensors")
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
    """Read a checkpoint; a missing, truncated or malformed file raises :class:`CheckpointError` naming it."""
    path = Path(path)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is incomplete or corrupt: {what}; resume from another "
                               "checkpoint (or start over)")

    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"{STATE_FILE}: {e.__class__.__name__}: {e}") from e
    if not isinstance(state, dict):
        raise bad(f"{STATE_FILE} holds {type(state).__name__}, not an object")
    step, opt = state.get("step"), state.get("optimizer")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"{STATE_FILE} step must be a non-negative integer, got {step!r:.80}")
    if (not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list)
            or not all(isinstance(g, dict) for g in opt["param_groups"]) or not isinstance(opt.get("steps"), dict)
            or not all(isinstance(v, (int, float)) for v in opt["steps"].values())):
        raise bad(f"{STATE_FILE} optimizer must be an object with param_groups (a list) and steps")
    losses = state.get("losses", [])
    if not isinstance(losses, list) or not all(isinstance(x, (int, float)) for x in losses):
        raise bad(f"{STATE_FILE} losses must be a list of numbers")
    if not isinstance(state.get("config", {}), dict) or not isinstance(state.get("config", {}).get("train", {}), dict):
        raise bad(f"{STATE_FILE} config must be an object")
    for key, name, required in (("lora", "lora.safetensors", True), ("token_tensors", "token.safetensors", False),
                                ("optimizer_tensors", "optimizer.safetensors", False)):
        f = path / name
        if not required and not f.is_file():
            state[key] = {}
            continue
        try:
            state[key] = load_file(f)
        except (OSError, SafetensorError, ValueError, RuntimeError) as e:
            raise bad(f"{name}: {e.__class__.__name__}: {e}") from e
    missing = [f"{n}::{k}" for n in opt["steps"] for k in ("exp_avg", "exp_avg_sq")
               if f"{n}::{k}" not in state["optimizer_tensors"]]
    if missing:
        raise bad(f"optimizer.safetensors lacks {missing[:3]}")
    return state


RESUME_KEYS = ("rank", "lora_targets", "train_placeholder_token")  # the LoRA / token layout (and the token list)
SOFT_RESUME_KEYS = ("seed",)  # a different value trains a different run; --force-resume accepts it


def check_compatible(state: dict, where: Path, train_cfg, *, dataset: dict | None = None, force: bool = False) -> None:
    """Refuse to resume a checkpoint from another run, naming the setting.

    A different LoRA layout or token (``RESUME_KEYS``) is always refused: its tensors cannot fit. A different
    seed or dataset (``dataset``: :func:`data.dataset_fingerprint` of this run, compared with the one the
    checkpoint recorded) is refused unless ``force`` (``--force-resume``); then it is logged and accepted.
    """
    saved = state.get("config", {}).get("train", {})
    # the token list: checkpoints written before several tokens existed record placeholder_token only
    was = saved.get("placeholder_tokens") or ([saved["placeholder_token"]] if "placeholder_token" in saved else None)
    if was is not None and list(was) != list(train_cfg.placeholder_tokens):
        def show(tokens):
            return repr(tokens[0]) if len(tokens) == 1 else str(list(tokens))

        raise CheckpointError(
            f"checkpoint {where} was trained with the placeholder token(s) {show(was)} but this run has "
            f"{show(train_cfg.placeholder_tokens)}; use the same token list, in the same order, to resume (its vectors "
            "and optimizer state cannot fit otherwise)")
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(train_cfg, key):
            raise CheckpointError(
                f"checkpoint {where} was trained with train.{key}={saved[key]!r} but this run has "
                f"{getattr(train_cfg, key)!r}; use the same value to resume (its tensors cannot fit otherwise)"
            )
    differences = [f"train.{key}={saved[key]!r} (this run: {getattr(train_cfg, key)!r})"
                   for key in SOFT_RESUME_KEYS if key in saved and saved[key] != getattr(train_cfg, key)]
    was = state.get("dataset")
    if dataset is not None and isinstance(was, dict) and was.get("sha256") != dataset.get("sha256"):
        differences.append(f"a different dataset ({was.get('images')} images, sha256 {str(was.get('sha256'))[:12]}; "
                           f"this run: {dataset['images']} images, sha256 {dataset['sha256'][:12]})")
    if not differences:
        return
    if force:
        logger.warning("resuming checkpoint %s although it was trained with %s (forced)", where, "; ".join(differences))
        return
    raise CheckpointError(
        f"checkpoint {where} was trained with {'; '.join(differences)}: resuming would not continue that run. "
        "Use the same settings and dataset, or --force-resume to resume anyway"
    )


def check_lora_shapes(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor], where: Path) -> None:
    """The checkpoint's LoRA tensors must be exactly the model's (names, shapes, finite values)."""
    missing = sorted(set(current) - set(saved))
    if missing:
        raise CheckpointError(f"checkpoint {where}: lora.safetensors lacks {len(missing)} LoRA tensor(s), e.g. "
                              f"{missing[0]!r}; it does not fit this model")
    for k, v in current.items():
        if tuple(saved[k].shape) != tuple(v.shape):
            raise CheckpointError(f"checkpoint {where}: LoRA tensor {k!r} has shape {list(saved[k].shape)} but the "
                                  f"model's is {list(v.shape)}; it does not fit this model")
        if not saved[k].is_floating_point() or not torch.isfinite(saved[k]).all():
            raise CheckpointError(f"checkpoint {where}: LoRA tensor {k!r} is not finite floating point; the checkpoint "
                                  "is damaged")


# optimizer hyper-parameters a checkpoint restores (the moments' schedule); the rest (fused, foreach, capturable, ...)
# describes this run's device and torch, and the learning rates come from this run's config
_RESTORED_GROUP_KEYS = ("betas", "eps", "amsgrad", "maximize")


def _legacy_name(name: str) -> str:
    """Optimizer-state names of checkpoints written before the one loop carried peft's adapter name."""
    return name.replace(".lora_A.", ".lora_A.zero_prior.").replace(".lora_B.", ".lora_B.zero_prior.")


def restore_optimizer(optimizer: torch.optim.Optimizer, param_names: list[str], state: dict) -> None:
    """AdamW's moments and step counts from ``state`` into ``optimizer`` (whose parameters are ``param_names``).

    Learning rates and device settings stay this run's (a changed learning rate is logged); ``step`` is placed
    where torch's own ``load_state_dict`` would put it (on the parameter's device for fused or capturable
    groups). Parameters without moments (one that never had a gradient) start fresh, as they would have; moments
    saved under the names older versions used (peft's adapter name inside) are found too."""
    meta = state["optimizer"]
    tensors = state["optimizer_tensors"]
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint optimizer state has {len(meta['param_groups'])} parameter groups, this run "
                              f"{len(optimizer.param_groups)}; it was written with another token setting")
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for k in _RESTORED_GROUP_KEYS:
            if k in saved and k in group:
                group[k] = tuple(saved[k]) if isinstance(group[k], tuple) else saved[k]
        if "lr" in saved and saved["lr"] != group.get("lr"):
            logger.info("resuming with learning rate %s (the checkpoint's run used %s)", group.get("lr"), saved["lr"])
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    missing = []
    for p, name in zip(_all_params(optimizer), param_names):
        key = name if f"{name}::exp_avg" in tensors else _legacy_name(name)
        if f"{key}::exp_avg" not in tensors:
            missing.append(name)
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            if tuple(tensors[f"{key}::{k}"].shape) != tuple(p.shape):
                raise CheckpointError(f"checkpoint optimizer state {key}::{k} has shape "
                                      f"{list(tensors[f'{key}::{k}'].shape)}, the parameter {list(p.shape)}")
        group = group_of[id(p)]
        on_device = group.get("fused") or group.get("capturable")
        optimizer.state[p] = {
            "step": torch.tensor(meta["steps"].get(key, meta["steps"].get(name)), dtype=torch.float32,
                                 device=p.device if on_device else "cpu"),
            "exp_avg": tensors[f"{key}::exp_avg"].to(p.device, p.dtype),
            "exp_avg_sq": tensors[f"{key}::exp_avg_sq"].to(p.device, p.dtype),
        }
    if tensors and len(missing) == len(param_names):
        raise CheckpointError("checkpoint optimizer state names none of this run's parameters "
                              f"(e.g. {param_names[0]!r}); it does not belong to this run")
