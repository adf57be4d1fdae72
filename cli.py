"""Command line: ``qwen-zero-prior {demo,train,predict,convert}``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _setup_logging(verbose: bool) -> None:
    import os

    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(levelname)s {rank}%(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_demo(args) -> int:
    from .training.run import demo

    r = demo(args.output, steps=args.steps, family=args.family)
    print(f"trained token id {r.token_id}; mean loss, first vs last tenth: {r.first_loss:.4f} -> {r.last_loss:.4f}")
    print(f"archive:   {r.archive}")
    print(f"image:     {r.image}")
    print(f"loss plot: {r.loss_plot}")
    print(f"done in {r.seconds:.1f} s")
    return 0


def _load_config(args):
    from .training.config import Config, apply_overrides

    if args.config:
        return Config.from_yaml(args.config, args.set)
    return Config.from_dict(apply_overrides({}, args.set), source="--set")


def _cmd_train(args) -> int:
    from .training.run import train

    cfg = _load_config(args)
    import os

    result = train(cfg, args.dataset, args.output, output_dir=args.output_dir, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"archive: {result.archive} ({result.steps} steps, final loss {result.losses[-1]:.4f})")
    if result.loss_plot:
        print(f"loss plot: {result.loss_plot}")
    return 0


def _cmd_predict(args) -> int:
    from .training.archive import load_archive
    from .training.config import ModelConfig
    from .training.inference import GenerateOptions, InferenceSession
    from .training.models import load_pipeline

    archive = load_archive(args.archive) if args.archive else None
    base = args.base_model or (archive.meta.base_model if archive else None)
    if not base:
        raise SystemExit("predict: give --base-model (or an archive whose meta.json names one)")
    session = InferenceSession(load_pipeline(ModelConfig(base_model=base, family=args.family, dtype=args.dtype,
                                                         device=args.device)))
    if archive is not None:
        session.apply(archive, lora_scale=args.lora_scale)  # refuses an archive of the other model family
    fam = session.family  # unset --steps / --guidance: the family's defaults (2.1: 40 steps, no CFG)
    steps = fam.default_steps if args.steps is None else args.steps
    guidance = fam.default_guidance if args.guidance is None else args.guidance
    img = session.generate(GenerateOptions(args.prompt, args.negative_prompt, steps, guidance,
                                           args.width, args.height, args.seed))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    print(f"image: {out}")
    return 0


def _cmd_convert(args) -> int:
    from safetensors.torch import load_file, save_file

    from .training.lora import diffusers_to_kohya, kohya_to_diffusers

    sd = load_file(args.input)
    kohya = any(k.startswith(("lora_unet_", "diffusion_model.")) for k in sd)
    target = args.to or ("diffusers" if kohya else "kohya")
    if target == "diffusers":
        out = kohya_to_diffusers(sd) if kohya else sd
    else:
        out = sd if kohya else diffusers_to_kohya(sd, alpha=args.alpha)
    save_file({k: v.contiguous() for k, v in out.items()}, args.output, metadata={"format": "pt"})
    print(f"wrote {len(out)} tensors ({target} format) to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-zero-prior", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="offline demo on a tiny random Qwen-Image (no downloads)")
    d.add_argument("--output", default="demo-output")
    d.add_argument("--steps", type=int, default=150)
    d.add_argument("--family", default="qwen-image", choices=["qwen-image", "qwen-image-2.1"],
                   help="which tiny model family to train (default: qwen-image)")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train LoRA (+ zero-prior token) and write weights.zip")
    t.add_argument("--config", help="YAML config with model:, train:, sample:, debug: sections")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=500 (repeatable)")
    t.add_argument("--dataset", required=True, help="folder or zip of images with same-name .txt captions")
    t.add_argument("--output", default="weights.zip", help="archive to write")
    t.add_argument("--output-dir", help="checkpoints/, samples/ (default: the archive's folder)")
    t.add_argument("--resume", help="checkpoint folder (or run folder) to continue from")
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("predict", help="generate an image with a weights.zip")
    r.add_argument("--archive", help="weights.zip / .tar / .tar.gz from training")
    r.add_argument("--base-model", help="Qwen-Image folder or hub id (default: the archive's base_model)")
    r.add_argument("--prompt", required=True)
    r.add_argument("--negative-prompt", default=" ")
    r.add_argument("--family", default="auto", choices=["auto", "qwen-image", "qwen-image-2.1"],
                   help="model family of the base model (default: from its model_index.json)")
    r.add_argument("--steps", type=int, help="denoising steps (default: the family's, 30 or 2.1's 40)")
    r.add_argument("--guidance", type=float, help="true-CFG scale, 1 disables CFG (default: 4, 2.1: 1)")
    r.add_argument("--width", type=int, default=1024)
    r.add_argument("--height", type=int, default=1024)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--lora-scale", type=float, default=1.0)
    r.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    r.add_argument("--device", default="auto")
    r.add_argument("--output", default="output.png")
    r.set_defaults(func=_cmd_predict)

    c = sub.add_parser("convert", help="convert a LoRA between kohya and diffusers key formats")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", choices=["kohya", "diffusers"], help="default: the other format")
    c.add_argument("--alpha", type=float, help="alpha to write into a kohya file (default: rank)")
    c.set_defaults(func=_cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    from .training.archive import ArchiveError
    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError
    from .training.data import DatasetError
    from .training.distributed import RankLostError
    from .training.lora import LoraError
    from .training.models import ModelLoadError
    from .training.token import TokenError

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, ArchiveError, DatasetError, TokenError, LoraError, ModelLoadError, CheckpointError,
            RankLostError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
