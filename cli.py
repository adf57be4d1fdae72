"""qwen-zero-prior: train a zero-prior placeholder token (e.g. ``<zwx>``) and a LoRA on Qwen-Image, then use them.

Commands: ``demo`` (offline run on a tiny random model), ``train`` (images + captions -> ``weights.zip``),
``predict`` (``weights.zip`` -> image) and ``convert`` (LoRA key formats). The same ``weights.zip`` loads in the
ComfyUI nodes and the Cog predictor.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import textwrap
import threading
from pathlib import Path

DESCRIPTION = (
    "Train a fresh placeholder token (e.g. <zwx>, its embedding starting near zero so it carries no prior "
    "meaning) together with a LoRA on Qwen-Image, and generate images with the resulting weights.zip. The same "
    "weights.zip loads in the ComfyUI nodes and the Cog predictor."
)
EPILOG = """examples:
  qwen-zero-prior demo                                   offline, tiny random model, about a minute on a CPU
  qwen-zero-prior train --config config.yaml --dataset photos.zip --output run/weights.zip
  qwen-zero-prior predict --archive run/weights.zip --prompt "a photo of <zwx> on the moon"
  qwen-zero-prior convert lora.safetensors lora_kohya.safetensors

'qwen-zero-prior COMMAND --help' describes each command's options."""


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default (when it has one worth showing); in descriptions, lines that
    start with two spaces (lists, examples) are kept as they are and the others are wrapped."""

    def _fill_text(self, text, width, indent):
        return "\n".join(
            indent + line if line.startswith("  ") or not line.strip()
            else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            for line in text.splitlines()
        )

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return text
        if action.option_strings and "(default" not in text:
            text += " (default: %(default)s)"
        return text


class _TqdmLogHandler(logging.Handler):
    """Log lines through ``tqdm.write``: an open progress bar is redrawn below them instead of broken by them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except RecursionError:
            raise
        except Exception:  # logging's contract: report through handleError, never raise from emit
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler = _TqdmLogHandler()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(levelname)s {rank}%(name)s: %(message)s", handlers=[handler])
    for noisy in ("httpx", "httpx2", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- interrupting training -----------------------------------------------------------------------------


class _StopOnSignal:
    """SIGINT (Ctrl-C) / SIGTERM (schedulers, ``docker stop``) while training.

    The first asks the loop to stop after the current step; the trainer then writes a checkpoint and raises
    ``TrainingInterrupted``. Before the loop's first step there is nothing to save, so it exits at once; so does a
    second signal (and a third, with the default handlers back, kills the process outright). The previous
    handlers are restored on exit.
    """

    def __init__(self):
        self.signum: int | None = None
        self.started = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()

    def requested(self) -> bool:  # Callbacks.should_stop: called by the loop before each step
        self.started = True
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None or not self.started:
            for s in self._old:
                signal.signal(s, signal.SIG_DFL)
            why = "" if self.started else " (training had not started: nothing to save)"
            print(f"\n{name}: exiting now{why}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\n{name}: stopping after this step and writing a checkpoint (send it again to quit at once)",
              file=sys.stderr, flush=True)


def _prog() -> list[str]:
    if Path(sys.argv[0]).name in ("cli.py", "__main__.py"):  # python -m qwen_zero_prior.cli
        return [sys.executable, "-m", "qwen_zero_prior.cli"]
    return ["qwen-zero-prior"]


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """The command line that was run, with ``--resume`` pointing at ``checkpoint`` (shell-quoted)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            kept.append(a)
    return shlex.join([*_prog(), *kept, "--resume", str(checkpoint)])


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    out = []
    for d in [folder, *folder.parents]:
        if d.exists():
            break
        out.append(d)
    return out


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; a folder something was written to stays
        with contextlib.suppress(OSError):
            d.rmdir()


# ---- commands ------------------------------------------------------------------------------------------


def _cmd_demo(args) -> int:
    from .training.run import demo

    r = demo(args.output, steps=args.steps, family=args.family)
    print(f"trained token id {r.token_id}; mean loss, first vs last tenth: {r.first_loss:.4f} -> {r.last_loss:.4f}")
    print(f"archive:   {r.archive}")
    print(f"image:     {r.image}")
    print(f"loss plot: {r.loss_plot}")
    print(f"model:     {r.model_dir} (a tiny base model to train on offline: see the README)")
    print(f"done in {r.seconds:.1f} s")
    return 0


def _load_config(args):
    from .training.config import Config, apply_overrides

    if args.config:
        return Config.from_yaml(args.config, args.set)
    return Config.from_dict(apply_overrides({}, args.set), source="--set")


def _check_dataset(path: str) -> None:
    """The CLI's own check of ``--dataset``: says what the flag wants before anything is loaded or created."""
    import tarfile
    import zipfile

    from .training.data import DatasetError

    p = Path(path)
    if p.is_dir():
        return
    if not p.exists():
        raise DatasetError(f"--dataset {path}: no such folder or file")
    if not (zipfile.is_zipfile(p) or tarfile.is_tarfile(p)):
        hint = " (this looks like a config file: pass it with --config)" if p.suffix.lower() in (".yaml", ".yml") else ""
        raise DatasetError(f"--dataset {path}: not a folder, zip or tar of images with same-name .txt captions{hint}")


def _cmd_train(args) -> int:
    from .training.run import train
    from .training.trainer import Callbacks, TrainingInterrupted

    cfg = _load_config(args)
    _check_dataset(args.dataset)
    main_process = os.environ.get("RANK", "0") == "0"
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.output).parent
    created = _missing_dirs(out_dir) + _missing_dirs(Path(args.output).parent)
    # Under torchrun every rank would need to agree on the step to stop at; there the launcher owns the signals
    # and a run continues from its last periodic checkpoint.
    stop = _StopOnSignal() if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else None
    try:
        with stop if stop is not None else contextlib.nullcontext():
            result = train(cfg, args.dataset, args.output, output_dir=args.output_dir, resume=args.resume,
                           force_resume=args.force_resume, tune_process=True,
                           callbacks=Callbacks(should_stop=stop.requested) if stop is not None else None)
    except TrainingInterrupted as e:
        _remove_empty(sorted(set(created), key=lambda d: len(d.parts), reverse=True))
        if e.checkpoint is None:
            print(f"interrupted at step {e.step}: no checkpoint written", file=sys.stderr)
        else:
            print(f"interrupted at step {e.step}; checkpoint: {e.checkpoint}")
            print(f"resume with:\n  {resume_command(args.argv, e.checkpoint)}")
        return stop.exit_code if stop is not None else 130
    except BaseException:
        _remove_empty(sorted(set(created), key=lambda d: len(d.parts), reverse=True))  # no empty run folder left
        raise
    if not main_process:
        return 0
    print(f"archive: {result.archive} ({result.steps} steps, final loss {result.losses[-1]:.4f})")
    if result.loss_plot:
        print(f"loss plot: {result.loss_plot}")
    return 0


def _cmd_predict(args) -> int:
    from .training.archive import load_archive
    from .training.config import ModelConfig
    from .training.inference import GenerateOptions, InferenceSession, base_model_for
    from .training.models import load_pipeline

    archive = load_archive(args.archive) if args.archive else None
    base = base_model_for(archive, args.base_model)  # never downloads an archive's hub id unasked
    pipe = load_pipeline(ModelConfig(base_model=base, family=args.family, dtype=args.dtype, device=args.device),
                         progress=True)
    session = InferenceSession(pipe)
    if archive is not None:
        session.apply(archive, lora_scale=args.lora_scale)  # refuses an archive of the other model family
        if session.token_ids:
            print("token" + ("s" if len(session.token_ids) > 1 else "") + ": "
                  + ", ".join(f"{t} (id {i})" for t, i in session.token_ids.items()))
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


def _read_lora(path: str):
    """(state dict, safetensors header, name for messages) of a LoRA .safetensors or a weights archive's LoRA."""
    import tarfile
    import zipfile

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .training.archive import LORA_MEMBER, ArchiveError, load_archive
    from .training.lora import LoraError

    p = Path(path)
    if not p.is_file():
        raise LoraError(f"{path}: no such file")
    with p.open("rb") as fh:
        head = fh.read(9)
    if head[8:9] != b"{" and (zipfile.is_zipfile(p) or tarfile.is_tarfile(p)):
        arc = load_archive(p)
        if not arc.has_lora:
            raise ArchiveError(f"{path} holds no LoRA (a token-only archive): nothing to convert")
        return arc.lora_state_dict, arc.lora_metadata or {}, f"{path} ({LORA_MEMBER})"
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(p), metadata, path
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{path}: neither a LoRA .safetensors file nor a weights archive (zip/tar): {e}") from e


def _cmd_convert(args) -> int:
    from safetensors.torch import save

    from .training import lora
    from .training.archive import atomic_write_bytes

    sd, metadata, where = _read_lora(args.input)
    parsed = lora.parse_lora(sd, metadata, where)
    if args.to:
        target = lora.KEY_STYLES[args.to]
    elif parsed.style != lora.DIFFUSERS:
        target = lora.DIFFUSERS
    else:  # back to what `convert` made this file from, else kohya
        target = parsed.recorded_style or lora.KEY_STYLES["kohya"]
    alpha = args.alpha
    if alpha is not None and target.pair != "down/up":
        raise lora.LoraError(f"--alpha: {target.describe()} keys carry no alpha (it is folded into the weights); "
                             "use it with --to kohya, lycoris, comfyui or lightning")
    if alpha is None and parsed.recorded_style == target:
        alpha = parsed.recorded_alphas
    out = lora.write_lora(parsed, target, alpha)
    header = {"format": "pt"}
    if target == lora.DIFFUSERS:  # remember the source's keys and alphas, so converting back restores them
        header[lora.SOURCE_METADATA_KEY] = (metadata[lora.SOURCE_METADATA_KEY] if parsed.recorded_style
                                            else lora.source_record(parsed))
    atomic_write_bytes(args.output, save({k: v.contiguous() for k, v in out.items()}, metadata=header))
    name = next((n for n, st in lora.KEY_STYLES.items() if st == target), target.describe())
    note = "; alpha from the lora_adapter_metadata header" if parsed.alpha_from_header else ""
    print(f"wrote {len(out)} tensors ({name} keys, from {parsed.style_name} keys{note}) to {args.output}")
    return 0


# ---- parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    kw = dict(formatter_class=_HelpFormatter, allow_abbrev=False)
    p = argparse.ArgumentParser(prog="qwen-zero-prior", description=DESCRIPTION, epilog=EPILOG, **kw)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")

    d = sub.add_parser("demo", help="offline demo: trains token + LoRA on a tiny random Qwen-Image, no downloads",
                       description="Builds a tiny random Qwen-Image (the real model classes) and a 4-image dataset, "
                       "trains the token and a LoRA on the CPU, writes weights.zip and generates an image with it. "
                       "Nothing is downloaded. The tiny model stays in OUTPUT/tiny-qwen-image for offline training.",
                       **kw)
    d.add_argument("--output", default="demo-output", help="folder for the model, dataset, archive and image")
    d.add_argument("--steps", type=int, default=150, help="training steps")
    d.add_argument("--family", default="qwen-image", choices=["qwen-image", "qwen-image-2.1"],
                   help="which tiny model family to train")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train a LoRA (+ the zero-prior token) and write weights.zip",
                       description="Trains on a folder or zip of images with same-name .txt captions. Settings come "
                       "from --config and --set (see the README's Config section). Ctrl-C (or SIGTERM) stops after "
                       "the current step, writes a checkpoint and prints the command that resumes it; a second one "
                       "quits at once.", **kw)
    t.add_argument("--config", help="YAML config with model:, train:, sample:, debug: sections (default: built-in "
                   "defaults, base model Qwen/Qwen-Image)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=500 (repeatable)")
    t.add_argument("--dataset", required=True, help="folder, zip or tar of images with same-name .txt captions")
    t.add_argument("--output", default="weights.zip", help="archive to write")
    t.add_argument("--output-dir", help="where checkpoints/ and samples/ go (default: the archive's folder)")
    t.add_argument("--resume", help="checkpoint folder (checkpoints/step-NNNNNN) or run folder (its newest "
                   "checkpoint) to continue from, to the same train.steps")
    t.add_argument("--force-resume", action="store_true",
                   help="resume even if the checkpoint was trained with another seed or dataset (default: refused)")
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("predict", help="generate an image with a weights.zip",
                       description="Loads the base model named in the archive's meta.json (or --base-model), "
                       "registers the archive's token(s), applies the LoRA and writes one image.", **kw)
    r.add_argument("--archive", help="weights.zip / .tar / .tar.gz from training (default: none, the base model)")
    r.add_argument("--base-model", help="Qwen-Image folder or hub id (default: the archive's base_model if that is "
                   "a local folder; a hub id is only ever downloaded when given here)")
    r.add_argument("--prompt", required=True, help="text prompt; write the token(s) as trained, e.g. <zwx>")
    r.add_argument("--negative-prompt", default=" ",
                   help="negative prompt, used when --guidance > 1 (default: a single space, as Qwen-Image's pipeline)")
    r.add_argument("--family", default="auto", choices=["auto", "qwen-image", "qwen-image-2.1"],
                   help="model family of the base model (auto: from its model_index.json)")
    r.add_argument("--steps", type=int, help="denoising steps (default: the family's, 30; Qwen-Image 2.1: 40)")
    r.add_argument("--guidance", type=float, help="true-CFG scale, 1 disables CFG (default: 4; Qwen-Image 2.1: 1)")
    r.add_argument("--width", type=int, default=1024, help="image width in pixels")
    r.add_argument("--height", type=int, default=1024, help="image height in pixels")
    r.add_argument("--seed", type=int, default=0, help="random seed")
    r.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength; 0 turns it off")
    r.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (on a CPU, float32 is much faster)")
    r.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda:1, ...")
    r.add_argument("--output", default="output.png", help="image file to write")
    r.set_defaults(func=_cmd_predict)

    from .training.lora import KEY_STYLES

    styles = "\n".join(f"  {n:<13} {st.describe()}" for n, st in KEY_STYLES.items())
    c = sub.add_parser(
        "convert", help="convert a Qwen-Image LoRA between key formats (kohya, diffusers, LyCORIS, ...)",
        description="Reads a LoRA .safetensors (or the LoRA in a weights.zip) in any of these key styles and "
        f"writes it in another with the same effect:\n{styles}\nPer-module alpha keys, and the alpha diffusers' "
        "dreambooth script stores in the lora_adapter_metadata header, are applied. Without --to: other styles "
        "become diffusers keys, and a diffusers file becomes the style convert made it from (else kohya). LoKr, "
        "LoHa, DoRA and diff/diff_b weights are not LoRA pairs and are refused.", **kw)
    c.add_argument("input", help="LoRA .safetensors, or a weights.zip/.tar/.tar.gz with a LoRA")
    c.add_argument("output", help=".safetensors file to write")
    c.add_argument("--to", choices=list(KEY_STYLES), metavar="STYLE",
                   help=f"key style to write: {', '.join(KEY_STYLES)} (default: see above)")
    c.add_argument("--alpha", type=float, help="alpha to write into lora_down/lora_up styles (default: the source's "
                   "alpha, else the rank); lora_up is rescaled so the effect is unchanged")
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
    from .training.outputs import OutputError
    from .training.token import TokenError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help(sys.stderr)
        return 2
    args.argv = argv
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, ArchiveError, DatasetError, TokenError, LoraError, ModelLoadError, CheckpointError,
            RankLostError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
