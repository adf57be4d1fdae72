"""Shared by the Cog predictor (predict.py) and trainer (train.py): base-model settings from the environment,
and the OpenAPI schema that Cog's HTTP server validates inputs against.

Cog's static schema generator needs literal defaults and bounds in the predict/train signatures, so those
literals are written out there; ``tests/test_cog.py`` checks each one against ``training.config`` (the one
source of truth) and checks that the shipped ``.cog/openapi_schema.json`` is what :func:`openapi_schema` builds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

try:  # installed (pip install .): the package name
    from qwen_zero_prior.training.config import Config, ModelConfig, field_spec
    from qwen_zero_prior.training.token import split_token_list
except ImportError:  # inside a Cog image the source folder itself is on sys.path
    from training.config import Config, ModelConfig, field_spec  # type: ignore[no-redef]
    from training.token import split_token_list  # type: ignore[no-redef]

ENV_MODEL = "QWEN_IMAGE_MODEL"  # local diffusers folder or hub id
ENV_DTYPE = "QWEN_IMAGE_DTYPE"
ENV_DEVICE = "QWEN_IMAGE_DEVICE"
ENV_FAST = "QZP_COG_FAST"  # "0": cog train keeps the model settings' defaults (eager, bf16 matmuls)
SCHEMA_PATH = Path(__file__).resolve().parent / ".cog" / "openapi_schema.json"


def model_config() -> ModelConfig:
    defaults = ModelConfig()
    return ModelConfig(
        base_model=os.environ.get(ENV_MODEL, defaults.base_model),
        dtype=os.environ.get(ENV_DTYPE, defaults.dtype),
        device=os.environ.get(ENV_DEVICE, defaults.device),
    )


# name -> (config section, config field) for trainer inputs taken straight from the config
TRAIN_FIELDS = {
    "rank": ("train", "rank"),
    "steps": ("train", "steps"),
    "learning_rate": ("train", "learning_rate"),
    "token_learning_rate": ("train", "token_learning_rate"),
    "train_placeholder_token": ("train", "train_placeholder_token"),
    "placeholder_token": ("train", "placeholder_token"),
    "placeholder_init_std": ("train", "placeholder_init_std"),
    "resolution": ("train", "resolution"),
    "batch_size": ("train", "batch_size"),
    "seed": ("train", "seed"),
}

# trainer inputs whose Cog description differs from the config field's help (the Cog input takes more)
TRAIN_DESCRIPTIONS = {
    "placeholder_token": "The new special token written in prompts, e.g. <zwx>; several tokens trained together: a "
                         "comma-separated list, e.g. <alice>,<bob> (each its own vector, one LoRA).",
}

PREDICT_INPUTS = {
    "prompt": {"type": "string", "description": "Prompt; write the placeholder token (e.g. <zwx>) where the concept goes."},
    "negative_prompt": {"type": "string", "default": " ", "description": "Negative prompt (used when guidance > 1)."},
    "steps": {"type": "integer", "default": 30, "minimum": 1, "maximum": 100, "description": "Denoising steps."},
    "guidance": {"type": "number", "default": 4.0, "minimum": 1.0, "maximum": 20.0,
                 "description": "True-CFG scale (1 disables CFG)."},
    "width": {"type": "integer", "default": 1024, "minimum": 64, "maximum": 2048, "description": "Image width."},
    "height": {"type": "integer", "default": 1024, "minimum": 64, "maximum": 2048, "description": "Image height."},
    "lora_scale": {"type": "number", "default": 1.0, "minimum": -2.0, "maximum": 3.0,
                   "description": "Strength of the archive's LoRA."},
    "seed": {"type": "integer", "default": 0, "minimum": 0, "maximum": 2147483647, "description": "Random seed."},
    "replicate_weights": {"type": "string", "format": "uri", "nullable": True,
                          "description": "weights.zip (or .tar / .tar.gz) from training; empty: the base model."},
}


def train_inputs() -> dict[str, dict]:
    out = {"dataset": {"type": "string", "format": "uri",
                       "description": "Zip of images with same-name .txt captions."}}
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string"}
    for name, (section, key) in TRAIN_FIELDS.items():
        spec = field_spec(section, key)
        prop = {"type": kinds[type(spec["default"])], "default": spec["default"],
                "description": TRAIN_DESCRIPTIONS.get(name, spec["help"])}
        if "min" in spec:
            prop["minimum"] = spec["min"]
        if "max" in spec:
            prop["maximum"] = spec["max"]
        out[name] = prop
    return out


def _object(title: str, props: dict[str, dict], required: list[str]) -> dict:
    properties = {}
    for i, (name, p) in enumerate(props.items()):
        properties[name] = {"title": name.replace("_", " ").title(), "x-order": i, **p}
    return {"title": title, "type": "object", "properties": properties, "required": required}


def openapi_schema() -> dict:
    """The OpenAPI document Cog's server loads from .cog/openapi_schema.json to validate inputs."""
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": {
            "Input": _object("Input", PREDICT_INPUTS, ["prompt"]),
            "Output": {"title": "Output", "type": "string", "format": "uri"},
            "TrainingInput": _object("TrainingInput", train_inputs(), ["dataset"]),
            "TrainingOutput": {"title": "TrainingOutput", "type": "object",
                               "properties": {"weights": {"title": "Weights", "type": "string", "format": "uri"}},
                               "required": ["weights"]},
        }},
    }


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(openapi_schema(), indent=2) + "\n", encoding="utf-8")
    return path


def config_for_training(*, processes: int | None = None, **inputs) -> Config:
    """The training config for the Cog trainer's inputs; ``processes``: how many data-parallel processes will run it
    (default :func:`train_processes`)."""
    train = {key: inputs[name] for name, (section, key) in TRAIN_FIELDS.items() if section == "train"}
    tokens = split_token_list(train["placeholder_token"])  # "<alice>,<bob>": several tokens in one run
    if len(tokens) > 1:
        train["placeholder_tokens"] = tokens
        del train["placeholder_token"]
    elif tokens:
        train["placeholder_token"] = tokens[0]
    train["checkpoint_every"] = 0
    mc = model_config()
    model = {"base_model": mc.base_model, "dtype": mc.dtype, "device": mc.device,
             **fast_model_settings(processes or train_processes())}
    return Config.from_dict({"model": model, "train": train})


def fast_model_settings(processes: int) -> dict:
    """What ``cog train`` adds to the model settings on one GPU of compute capability 8.9 or newer (Ada, Hopper: the
    H100 Replicate trains on), so that users get the fastest step that fits without setting anything: compiled
    transformer blocks with CUDA graphs and fp8 matmuls for the frozen image-stream weights (at 1024² under a 78 GiB
    cap: 288.9 ms/step, 72.7 GiB, vs 614 ms for the best bf16 step that fits; docs/benchmarks.md). No attention
    backend is named: torch's own SDPA choice took the same GPU time as ``_native_cudnn`` there (session 25), and a
    named backend raises where its kernel does not take a shape instead of falling back. ``model.memory:
    auto`` still plans from the card: where the step does not fit resident it recomputes blocks without CUDA graphs,
    and on a 24 GB card offload keeps compile (without CUDA graphs) and turns fp8_matmul off (Qwen-Image 2.1's
    offload turns compile off too), each change logged. Data-parallel runs (several
    processes) keep the eager settings measured for them; ``QZP_COG_FAST=0`` keeps the defaults everywhere."""
    if os.environ.get(ENV_FAST, "1") == "0" or processes != 1:
        return {}
    import torch

    device = model_config().device
    if device == "cpu" or not torch.cuda.is_available():
        return {}
    index = torch.device(device).index if device.startswith("cuda") else None  # QWEN_IMAGE_DEVICE=cuda:1
    if torch.cuda.get_device_capability(index) < (8, 9):  # fp8 tensor cores: Ada and newer (fp8_matmul refuses below)
        return {}
    return {"compile": True, "compile_mode": "reduce-overhead", "fp8_matmul": True}


TRAIN_PROCESSES_ENV = "QZP_TRAIN_PROCESSES"


def train_processes() -> int:
    """How many data-parallel processes the Cog trainer starts: QZP_TRAIN_PROCESSES, else one per GPU."""
    env = os.environ.get(TRAIN_PROCESSES_ENV)
    if env:
        return max(1, int(env))
    import torch

    return max(1, torch.cuda.device_count())


def run_training(cfg: Config, dataset: Path, archive: Path) -> str:
    """Train in this process, or under torchrun with one process per GPU; returns a one-line summary."""
    import subprocess
    import sys

    import yaml

    nproc = train_processes()
    if nproc == 1:
        try:
            from qwen_zero_prior.training.run import train as core_train
        except ImportError:
            from training.run import train as core_train  # type: ignore[no-redef]
        # this process is the trainer's: the core may choose process-wide settings for the step (cuBLAS's workspace)
        result = core_train(cfg, dataset, archive, tune_process=True)
        return f"trained {result.steps} steps; final loss {result.losses[-1]:.4f}; token id {result.token_id}"
    cfg_path = archive.with_name("config.yaml")
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "train", "--config", str(cfg_path), "--dataset", str(dataset),
           "--output", str(archive)]
    try:
        from qwen_zero_prior.training.distributed import multicast_off_env
    except ImportError:
        from training.distributed import multicast_off_env  # type: ignore[no-redef]
    # relay the workers' output through this process so Cog records it in the training's logs; NVLink multicast
    # stays off in the workers (NCCL_NVLS_ENABLE=0 and friends)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=multicast_off_env())
    for line in proc.stdout:
        print(line, end="", flush=True)
    proc.wait()
    if proc.returncode != 0 or not archive.is_file():
        raise RuntimeError(f"data-parallel training with {nproc} processes failed (exit {proc.returncode}); "
                           "the log above names the failing rank")
    return f"trained with {nproc} data-parallel processes"


def _worker(argv: list[str]) -> int:
    """Entry point of each torchrun process started by :func:`run_training`."""
    import argparse
    import logging

    try:
        from qwen_zero_prior.training.run import train as core_train
    except ImportError:
        from training.run import train as core_train  # type: ignore[no-redef]
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(name)s: %(message)s")
    core_train(Config.from_yaml(a.config), a.dataset, a.output, tune_process=True)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "train":
        sys.exit(_worker(sys.argv[2:]))
    print(write_schema())
