"""TEST-ONLY ComfyUI patch (installed into a sandbox's custom_nodes/ by the test harness, never by the pack).

ComfyUI hard-codes Qwen-Image's sizes (24 heads x 128, text width 3584, a 7B Qwen2.5-VL text encoder, a
96-wide Wan VAE) and Qwen3-VL-8B's (Qwen-Image 2.1's text encoder, ComfyUI >= 0.33). This module makes it build
the tiny test models from the weights' shapes instead, and adds output nodes that dump tensors for equivalence
checks. Shapes do not reveal attention head size, so the tiny models' fixed HEAD_DIM is assumed.
"""

import contextlib
import logging
import os

import torch

import comfy.ldm.wan.vae
import comfy.model_detection
import comfy.model_management
import comfy.sd
import comfy.text_encoders.llama as llama
import comfy.text_encoders.qwen_vl as qwen_vl
import folder_paths
from safetensors.torch import load_file, save_file

HEAD_DIM = 16
log = logging.getLogger("tiny_qwen_patch")

# ---- text encoder -------------------------------------------------------------------------------------
_OrigTECfg = llama.Qwen25_7BVLI_Config
_te_sizes: dict = {}


def _te_config(**kw):
    cfg = _OrigTECfg(**{**_te_sizes, **kw})
    if _te_sizes:
        cfg.head_dim = HEAD_DIM
        cfg.rope_dims = [2, 3, 3]
    return cfg


_orig_detect_te = comfy.sd.detect_te_model

# ---- Qwen3-VL text encoder (ComfyUI >= 0.33: comfy/text_encoders/qwen3vl.py; absent from 0.3.64) ---------
try:
    import comfy.text_encoders.qwen3vl as qwen3vl
except ImportError:
    qwen3vl = None
_q3_sizes: dict = {}
# training/tiny.py's tiny Qwen3-VL vision tower (ComfyUI builds Qwen3-VL-8B's from constants)
_Q3_TINY_VISION = dict(hidden_size=16, intermediate_size=16, depth=1, deepstack_visual_indexes=[0], num_heads=2,
                       num_position_embeddings=64)


def _detect_qwen3vl(sd) -> bool:
    """A tiny Qwen3-VL in transformers' layout (Qwen3VLForConditionalGeneration.state_dict()): record its sizes."""
    emb = sd.get("model.language_model.embed_tokens.weight")
    if qwen3vl is None or emb is None or "model.visual.deepstack_merger_list.0.norm.weight" not in sd \
            or emb.shape[1] >= 2560:
        _q3_sizes.clear()
        return False
    pre = "model.language_model.layers."
    _q3_sizes.clear()
    _q3_sizes.update(
        vocab_size=emb.shape[0], hidden_size=emb.shape[1],
        intermediate_size=sd[pre + "0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=1 + max(int(k[len(pre):].split(".")[0]) for k in sd if k.startswith(pre)),
        num_attention_heads=sd[pre + "0.self_attn.q_proj.weight"].shape[0] // HEAD_DIM,
        num_key_value_heads=sd[pre + "0.self_attn.k_proj.weight"].shape[0] // HEAD_DIM,
    )
    log.info("tiny Qwen3-VL text encoder from weight shapes: %s", _q3_sizes)
    return True


if qwen3vl is not None:
    _OrigQ3Config = qwen3vl.QWEN3VL_CONFIGS["qwen3vl_8b"]
    _OrigQ3Vision = qwen3vl.Qwen3VLVisionModel

    def _q3_config(**kw):
        cfg = _OrigQ3Config(**{**_q3_sizes, **kw})
        if _q3_sizes:
            cfg.head_dim = HEAD_DIM
            cfg.rope_dims = [2, 3, 3]  # training/tiny.py's mrope_section (interleaved, as the 8B's)
        return cfg

    def _q3_vision(config, *args, **kw):
        return _OrigQ3Vision({**config, **_Q3_TINY_VISION} if _q3_sizes else config, *args, **kw)

    qwen3vl.QWEN3VL_CONFIGS["qwen3vl_8b"] = _q3_config
    qwen3vl.Qwen3VLVisionModel = _q3_vision


def _detect_te(sd):
    emb = sd.get("model.embed_tokens.weight")
    if emb is not None and "model.layers.0.self_attn.k_proj.bias" in sd and emb.shape[1] < 3584:
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
        _te_sizes.clear()
        _te_sizes.update(
            vocab_size=emb.shape[0], hidden_size=emb.shape[1],
            intermediate_size=sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
            num_hidden_layers=layers,
            num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // HEAD_DIM,
            num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // HEAD_DIM,
        )
        log.info("tiny Qwen2.5-VL text encoder from weight shapes: %s", _te_sizes)
        _q3_sizes.clear()
        return comfy.sd.TEModel.QWEN25_7B
    _te_sizes.clear()
    _detect_qwen3vl(sd)
    return _orig_detect_te(sd)


_OrigVision = qwen_vl.Qwen2VLVisionTransformer


def _vision(*args, **kw):
    if _te_sizes:  # the tiny text encoder carries no vision weights; keep the tower tiny too
        kw.update(hidden_size=16, intermediate_size=16, num_heads=2, num_layers=1)
    return _OrigVision(*args, **kw)


# ---- DiT ----------------------------------------------------------------------------------------------
_orig_detect_unet = comfy.model_detection.detect_unet_config


def _detect_unet(state_dict, key_prefix, metadata=None):
    cfg = _orig_detect_unet(state_dict, key_prefix, metadata=metadata)
    if cfg and cfg.get("image_model") == "qwen_image":
        inner = state_dict[f"{key_prefix}img_in.weight"].shape[0]
        if inner < 3072:
            head = state_dict[f"{key_prefix}transformer_blocks.0.attn.norm_q.weight"].shape[0]
            cfg.update(attention_head_dim=head, num_attention_heads=inner // head,
                       joint_attention_dim=state_dict[f"{key_prefix}txt_in.weight"].shape[1],
                       out_channels=state_dict[f"{key_prefix}proj_out.weight"].shape[0] // 4,
                       axes_dims_rope=(head // 2, head // 4, head // 4))
            log.info("tiny Qwen-Image DiT from weight shapes: %s", cfg)
    return cfg


# ---- VAE ----------------------------------------------------------------------------------------------
_OrigWanVAE = comfy.ldm.wan.vae.WanVAE
_vae_dim: list = []
_orig_vae_init = comfy.sd.VAE.__init__


def _vae_init(self, sd=None, *args, **kw):
    w = (sd or {}).get("encoder.conv1.weight")
    _vae_dim[:] = [w.shape[0]] if w is not None and w.shape[0] < 96 else []
    return _orig_vae_init(self, sd, *args, **kw)


def _wan_vae(*args, **kw):
    if _vae_dim:
        kw["dim"] = _vae_dim[0]
    return _OrigWanVAE(*args, **kw)


llama.Qwen25_7BVLI_Config = _te_config
qwen_vl.Qwen2VLVisionTransformer = _vision
comfy.sd.detect_te_model = _detect_te
comfy.model_detection.detect_unet_config = _detect_unet
comfy.sd.VAE.__init__ = _vae_init
comfy.ldm.wan.vae.WanVAE = _wan_vae


# ---- test-only output nodes ---------------------------------------------------------------------------
class ZPTestSaveConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "filename": ("STRING", {"default": "cond.safetensors"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, conditioning, filename):
        cond, extra = conditioning[0]
        tensors = {"cond": cond.detach().float().cpu().contiguous()}
        if extra.get("attention_mask") is not None:
            tensors["attention_mask"] = extra["attention_mask"].float().cpu().contiguous()
        save_file(tensors, os.path.join(folder_paths.get_output_directory(), os.path.basename(filename)))
        return {}


class ZPTestTokens:
    """The CLIP's token list for a prompt: ids (-1 where an entry is a tensor, i.e. a registered token's vector)
    and those vectors, in order."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"default": ""}),
                             "filename": ("STRING", {"default": "tokens.safetensors"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, clip, text, filename):
        tokens = clip.tokenize(text)
        pairs = next(v for v in tokens.values() if isinstance(v, list))[0]
        ids = [int(e[0]) if isinstance(e[0], int) else -1 for e in pairs]
        vectors = [e[0].detach().float().reshape(-1) for e in pairs if isinstance(e[0], torch.Tensor)]
        out = {"ids": torch.tensor(ids, dtype=torch.int64)}
        if vectors:
            out["vectors"] = torch.stack(vectors).contiguous()
        save_file(out, os.path.join(folder_paths.get_output_directory(), os.path.basename(filename)))
        return {}


class ZPTestModelForward:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "inputs": ("STRING", {"default": "forward_in.safetensors"}),
                             "filename": ("STRING", {"default": "forward_out.safetensors"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, model, inputs, filename):
        data = load_file(os.path.join(folder_paths.get_input_directory(), os.path.basename(inputs)))
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        dm = model.model.diffusion_model
        dev = comfy.model_management.get_torch_device()
        dtype = model.model.get_dtype()
        with torch.no_grad():
            x = data["x"].to(dev, dtype)
            out = dm(x[:, :, None] if x.ndim == 4 else x, data["t"].to(dev, dtype), data["context"].to(dev, dtype))
            if x.ndim == 4:
                out = out[:, :, 0]
        save_file({"out": out.float().cpu().contiguous()},
                  os.path.join(folder_paths.get_output_directory(), os.path.basename(filename)))
        return {}


class _KeepVisionTokenizer:
    """A ComfyUI tokenizer whose token dict also holds a non-list entry, as ComfyUI >= 0.37's Qwen-Image 2.1
    tokenizer adds ``out["keep_vision"] = keep_vision`` (comfy/text_encoders/qwen_image21.py)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        out = self.inner.tokenize_with_weights(text, return_word_ids, **kwargs)
        out["keep_vision"] = False
        return out


class ZPTestKeepVisionTokenizer:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, clip):
        out = clip.clone()
        out.tokenizer = _KeepVisionTokenizer(clip.tokenizer)
        return (out,)


class ZPTestNonQwenClip:
    """A CLIP object whose text encoder is not Qwen-Image's (stands in for an SD/Flux CLIP)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self):
        import comfy.model_patcher

        clip = comfy.sd.CLIP(no_init=True)
        clip.cond_stage_model = torch.nn.Linear(4, 4)
        # a patcher as every real CLIP has: ComfyUI 0.33's cache scan after the prompt asks it (without one, the
        # prompt worker thread died and every later prompt of the server hung)
        cpu = torch.device("cpu")
        clip.patcher = comfy.model_patcher.ModelPatcher(clip.cond_stage_model, load_device=cpu, offload_device=cpu)
        return (clip,)


@contextlib.contextmanager
def _comfy_in_training():
    """``comfy.model_management.in_training`` set as the training node sets it (ComfyUI's differentiable RoPE), where
    the version has the flag; restored afterwards."""
    was = getattr(comfy.model_management, "in_training", None)
    if was is not None:
        comfy.model_management.in_training = True
    try:
        yield
    finally:
        if was is not None:
            comfy.model_management.in_training = was


def _pack_module(name: str):
    """A submodule of the zero-prior pack as ComfyUI loaded it from custom_nodes/ (whatever the folder name)."""
    import importlib
    import sys

    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None) or ""
        if f.endswith("__init__.py") and hasattr(mod, "comfy_entrypoint") and hasattr(mod, "WEB_DIRECTORY") \
                and os.path.isfile(os.path.join(os.path.dirname(f), "nodes", "comfy_text.py")):
            return importlib.import_module(f"{mod.__name__}.{name}")
    raise RuntimeError("zero-prior pack not loaded")


class ZPTestTrainingConditioning:
    """The conditioning the training node trains against (the pack's own decoder over ComfyUI's modules) for a
    prompt with the archive's tokens and vectors, and each vector's gradient of its sum (autograd must work):
    ``grad`` for the first token, ``grad_1``, ``grad_2``, ... for further ones."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "archive": ("ZERO_PRIOR_ARCHIVE",), "text": ("STRING", {"default": ""}),
                             "filename": ("STRING", {"default": "train_cond.safetensors"})},
                "optional": {"exact": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, clip, archive, text, filename, exact=False):
        import copy

        comfy_text = _pack_module("nodes.comfy_text")
        token_mod = _pack_module("training.token")
        backend = _pack_module("nodes.comfy_backend")
        with torch.inference_mode(False), torch.enable_grad():
            comfy.model_management.load_models_gpu([clip.patcher], force_full_load=True)
            backend._ordinary_tensors(comfy_text.qwen_decoder(clip))
            tok = copy.deepcopy(clip.tokenizer)
            sd_tok = getattr(tok, tok.clip)
            device = clip.patcher.load_device
            vectors = {token_mod.ensure_token(sd_tok.tokenizer, t): torch.nn.Parameter(v.detach().clone().to(device))
                       for t, v in archive.vectors.items()}
            if len(vectors) == 1:  # the one-token form of the encoder's arguments
                (token_id, vector), = vectors.items()
                enc = comfy_text.ComfyPromptEncoder(clip, tok, device, token_id=token_id, vector=vector, exact=exact)
            else:
                enc = comfy_text.ComfyPromptEncoder(clip, tok, device, vectors=vectors, exact=exact)
            cond, mask = enc.encode([text], torch.float32, torch.device("cpu"))
            cond.sum().backward()
        out = {"cond": cond.detach().float().cpu().contiguous(), "exact_linears": torch.tensor([len(enc.exact)]),
               "recompute": torch.tensor([int(enc.suffix.recompute)])}
        for i, v in enumerate(vectors.values()):
            out["grad" if i == 0 else f"grad_{i}"] = v.grad.detach().float().cpu()
        save_file(out, os.path.join(folder_paths.get_output_directory(), os.path.basename(filename)))
        return {}


class ZPTestCastLinear:
    """Every per-use-casting Linear of the MODEL's DiT (an fp8-stored one) through the training node's
    :class:`CastLinear` vs ComfyUI's own forward under autograd: outputs and input gradients, and the bytes autograd
    saves for the backward (ComfyUI's keeps the cast weight, CastLinear nothing weight-sized)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "filename": ("STRING", {"default": "cast_linear.json"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, model, filename):
        import json

        backend = _pack_module("nodes.comfy_backend")
        report = {"layers": 0, "max_abs_out": 0.0, "max_abs_grad": 0.0, "saved_comfy": 0, "saved_cast": 0,
                  "weight_bytes": 0, "storage": None}
        with torch.inference_mode(False), torch.enable_grad():
            comfy.model_management.load_models_gpu([model], force_full_load=True)
            dm = model.model.diffusion_model
            backend._ordinary_tensors(dm)
            g = torch.Generator().manual_seed(0)
            for name, m in dm.transformer_blocks.named_modules():
                if not (backend._plain_cast_linear(m) and m.comfy_cast_weights):
                    continue
                report["layers"] += 1
                report["storage"] = str(m.weight.dtype)
                dtype = model.model.manual_cast_dtype or torch.float32
                x = torch.randn(3, 5, m.in_features, generator=g).to(m.weight.device, dtype)
                dy = torch.randn(3, 5, m.out_features, generator=g).to(m.weight.device, dtype)
                results = []
                for key, fn in (("saved_comfy", lambda t: m.forward_comfy_cast_weights(t)),
                                ("saved_cast", lambda t: backend.CastLinear.apply(t, m))):
                    saved = []

                    def pack(t):
                        saved.append(t.numel() * t.element_size())
                        return t

                    xi = x.clone().requires_grad_(True)
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        y = fn(xi)
                    y.backward(dy)
                    report[key] = max(report[key], max(saved, default=0))
                    results.append((y.detach().float(), xi.grad.float()))
                report["weight_bytes"] = max(report["weight_bytes"], m.out_features * m.in_features * dtype.itemsize)
                report["max_abs_out"] = max(report["max_abs_out"], float((results[0][0] - results[1][0]).abs().max()))
                report["max_abs_grad"] = max(report["max_abs_grad"], float((results[0][1] - results[1][1]).abs().max()))
        with open(os.path.join(folder_paths.get_output_directory(), os.path.basename(filename)), "w") as f:
            json.dump(report, f)
        return {}


class ZPTestUntrackWeights:
    """What ComfyUI does to weights it loaded (under inference mode) when it moves them to a GPU for training
    (``module.to(device)`` outside inference mode sets ``param.data``): every DiT and text-encoder parameter keeps
    its inference-made ``TensorImpl`` with ordinary data, so it reports ``is_inference() == False`` yet has no version
    counter. Same values; on CPU nothing else would produce this state."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",)}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model, clip):
        n = 0
        with torch.inference_mode(False):
            for p in [*model.model.diffusion_model.parameters(), *clip.cond_stage_model.parameters()]:
                if p.is_inference():
                    p.data = p.data.clone()
                    n += 1
        logging.info("ZPTestUntrackWeights: %d parameters now without a version counter", n)
        return (model, clip)


class ZPTestTrainingAttention:
    """The DiT's forward (and its input gradient) with the training node's attention override
    (``nodes/comfy_attention.py`` as ``transformer_options["optimized_attention_override"]``) vs ComfyUI's own
    attention: the largest differences, and how many calls took the override's own SDPA path."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "inputs": ("STRING", {"default": "forward_in.safetensors"}),
                             "filename": ("STRING", {"default": "training_attention.json"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, model, inputs, filename):
        import json

        import torch.nn.functional as F

        attention = _pack_module("nodes.comfy_attention")
        data = load_file(os.path.join(folder_paths.get_input_directory(), os.path.basename(inputs)))
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        dm = model.model.diffusion_model
        dev = comfy.model_management.get_torch_device()
        dtype = model.model.get_dtype()
        own = {"n": 0, "fallback": 0}
        sdpa = F.scaled_dot_product_attention

        def counted_sdpa(*args, **kwargs):  # the override's own call (ComfyUI's goes through comfy.ops)
            own["n"] += 1
            return sdpa(*args, **kwargs)

        def override(func, *args, **kwargs):
            before = own["n"]
            out = attention.training_attention(func, *args, **kwargs)
            own["fallback"] += own["n"] == before
            return out

        results = []
        with _comfy_in_training():
            self._compare(dm, dev, dtype, data, override, counted_sdpa, sdpa, attention, results)
        (ref, ref_grad), (got, got_grad) = results
        report = {"calls": own["n"], "fallback": own["fallback"], "blocks": len(dm.transformer_blocks),
                  "max_abs_out": float((got - ref).abs().max()), "max_abs_grad": float((got_grad - ref_grad).abs().max()),
                  "out_scale": float(ref.abs().max()), "grad_scale": float(ref_grad.abs().max())}
        with open(os.path.join(folder_paths.get_output_directory(), os.path.basename(filename)), "w") as f:
            json.dump(report, f)
        return {}

    @staticmethod
    def _compare(dm, dev, dtype, data, override, counted_sdpa, sdpa, attention, results):
        with torch.inference_mode(False), torch.enable_grad():
            _pack_module("nodes.comfy_backend")._ordinary_tensors(dm)  # as the training node does
            for options in ({}, {"optimized_attention_override": override}):
                x = data["x"].to(dev, dtype).clone()
                x = (x[:, :, None] if x.ndim == 4 else x).requires_grad_(True)
                attention.F.scaled_dot_product_attention = counted_sdpa if options else sdpa
                try:
                    out = dm(x, data["t"].to(dev, dtype).clone(), data["context"].to(dev, dtype).clone(),
                             transformer_options=options)
                finally:
                    attention.F.scaled_dot_product_attention = sdpa
                out.square().sum().backward()
                results.append((out.detach().float(), x.grad.detach().float()))


class ZPTestDiffusersEngine:
    """The training node's diffusers engine (``nodes/comfy_engine.py``) built over a loaded MODEL vs ComfyUI's own DiT
    forward, at latent sizes with even and odd patch grids: largest differences of the prediction and of the
    input's gradient, and how many of the engine's weights are ComfyUI's own tensors (shared, not copied)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "filename": ("STRING", {"default": "engine.json"}),
                             "fp8_matmul": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, model, filename, fp8_matmul):
        import json

        comfy.model_management.load_models_gpu([model], force_full_load=True)
        dm = model.model.diffusion_model
        dev = comfy.model_management.get_torch_device()
        dtype = getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()
        report = {"blockers": None, "sizes": []}
        with _comfy_in_training():
            self._compare(model, dm, dev, dtype, fp8_matmul, report)
        with open(os.path.join(folder_paths.get_output_directory(), os.path.basename(filename)), "w") as f:
            json.dump(report, f)
        return {}

    @staticmethod
    def _graphs(engine, engine_mod, dm, dev, dtype, gen, report):
        """The engine's whole-step CUDA graphs (under cudaMallocAsync on a GPU; emulated here, training/graphs.py):
        the prediction and the gradients of the conditioning and of the LoRA equal the engine's without them, one
        capture per patch grid; ComfyUI's offload streams are off while graphs are captured, and back afterwards."""
        import comfy.model_management as mm

        emu = _pack_module("training.graphs").EmulatedCapture()
        before = mm.NUM_STREAMS
        mm.NUM_STREAMS = 2  # as on an Nvidia GPU (a CPU run has none)
        try:
            with engine_mod.comfy_offload_streams_off():
                report["streams_inside"] = mm.NUM_STREAMS
            report["streams_after"] = mm.NUM_STREAMS
        finally:
            mm.NUM_STREAMS = before
        lora = [p for _, p in engine.named_lora_parameters()]
        cache = engine.make_graphs(capture=emu)
        worst = {"out": 0.0, "ctx_grad": 0.0, "lora_grad": 0.0, "scale": 0.0}
        for h, w in ((8, 8), (6, 10), (8, 8)):
            x = torch.randn(1, 16, 1, h, w, generator=gen).to(dev, dtype)
            t = torch.tensor([0.4]).to(dev)
            ctx = torch.randn(1, 5, dm.txt_in.weight.shape[1], generator=gen).to(dev, dtype)
            runs = []
            for graphs in (None, cache, cache):  # a new shape runs eagerly, is captured at the next step's start
                engine.graphs = graphs
                engine.step_begin()
                for p in lora:
                    p.grad = None
                c = ctx.clone().requires_grad_(True)
                out = engine.predict(x, t, c, None)
                out.float().square().sum().backward()
                runs.append((out.detach().float().cpu(), c.grad.float().cpu(),
                             torch.cat([p.grad.flatten() for p in lora]).float().cpu()))
            (o0, c0, l0), *cached = runs
            for o1, c1, l1 in cached:
                worst["out"] = max(worst["out"], float((o1 - o0).abs().max()))
                worst["ctx_grad"] = max(worst["ctx_grad"], float((c1 - c0).abs().max()))
                worst["lora_grad"] = max(worst["lora_grad"], float((l1 - l0).abs().max()))
            worst["scale"] = max(worst["scale"], float(o0.abs().max()), float(l0.abs().max()))
        engine.graphs = cache  # kept: the engine's close() frees the pairs' captured buffers (graphs.release)
        report["graphs"] = dict(worst, captures=emu.captures, forward_replays=emu.forward_replays,
                                backward_replays=emu.backward_replays, guarded=emu.guarded)
        return [t for pair in cache._graphs.values() for t in (pair.cap.static_out, *pair.cap.static_grads)
                if t is not None]

    @staticmethod
    def _compare(model, dm, dev, dtype, fp8_matmul, report):
        engine_mod = _pack_module("nodes.comfy_engine")
        config = _pack_module("training.config")
        with torch.inference_mode(False), torch.enable_grad():
            _pack_module("nodes.comfy_backend")._ordinary_tensors(dm)
            dm.requires_grad_(False)
            report["blockers"] = engine_mod.blockers(model, dm, dev)
            gen = torch.Generator().manual_seed(5)
            names = [n for n, m in dm.named_modules() if n.endswith("attn.to_q")]
            init = {n: torch.randn(2, dm.get_submodule(n).weight.shape[1], generator=gen) / 2 for n in names}
            m = config.ModelConfig(fp8_matmul=bool(fp8_matmul))
            engine = engine_mod.DiffusersEngine(dm, m, ["to_q"], 2, 2.0, init, dev, dtype, recompute=False)
            comfy_ptrs = {p.data_ptr() for p in dm.parameters()}
            stored = [p for p in engine.transformer.parameters() if not p.requires_grad]
            linears = [m.weight for m in engine.transformer.modules()
                       if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
            report["shared"] = sum(p.data_ptr() in comfy_ptrs for p in stored)
            report["frozen"] = len(stored)
            report["linears_shared"] = sum(p.data_ptr() in comfy_ptrs for p in linears)
            report["linears"] = len(linears)
            report["storage"] = str(dm.transformer_blocks[0].attn.to_q.weight.dtype)
            report["fp8_layers"] = engine.fp8_layers
            for h, w in ((8, 8), (6, 10)):  # patch grids 4x4 and 3x5
                x = torch.randn(1, 16, 1, h, w, generator=gen)
                t = torch.tensor([0.55])
                ctx = torch.randn(1, 5, dm.txt_in.weight.shape[1], generator=gen)
                outs = []
                for which in ("comfy", "engine"):
                    xi = x.to(dev, dtype).clone().requires_grad_(True)
                    if which == "comfy":
                        out = dm(xi, t.to(dev, dtype), ctx.to(dev, dtype), transformer_options={})
                    else:
                        out = engine.predict(xi, t.to(dev), ctx.to(dev, dtype), None)
                    out.float().square().sum().backward()
                    outs.append((out.detach().float().cpu(), xi.grad.detach().float().cpu()))
                (ref, ref_g), (got, got_g) = outs
                report["sizes"].append({"hw": [h, w], "max_abs_out": float((got - ref).abs().max()),
                                        "out_scale": float(ref.abs().max()),
                                        "max_abs_grad": float((got_g - ref_g).abs().max()),
                                        "grad_scale": float(ref_g.abs().max())})
            captured = ZPTestDiffusersEngine._graphs(engine, engine_mod, dm, dev, dtype, gen, report)
            # a LoRA that is not zero: ComfyUI's own forward with the engine's LoRA hooked on (what previews sample
            # through) predicts what the engine predicts, and the hooks are gone afterwards
            with torch.no_grad():
                for _, mod in engine_mod._lora_layers(engine.transformer):
                    w = mod.lora_B["zero_prior"].weight
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
                x = torch.randn(1, 16, 1, 8, 8, generator=gen).to(dev, dtype)
                ctx = torch.randn(1, 5, dm.txt_in.weight.shape[1], generator=gen).to(dev, dtype)
                t = torch.tensor([0.7]).to(dev)
                plain = dm(x, t.to(dtype), ctx, transformer_options={}).float()
                want = engine.predict(x, t, ctx, None).float()
                with engine.on_comfy_modules():
                    hooked = dm(x, t.to(dtype), ctx, transformer_options={}).float()
                after = dm(x, t.to(dtype), ctx, transformer_options={}).float()
            report["lora_hooked_vs_engine"] = float((hooked - want).abs().max())
            report["lora_effect"] = float((want - plain).abs().max())
            report["after_hooks_vs_plain"] = float((after - plain).abs().max())
            report["lora_scale"] = float(want.abs().max())
            for mod in dm.modules():  # new parameter objects, as ComfyUI reloading the DiT leaves them
                for pname, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[pname] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            report["rebound"] = engine.rebind()
            new_ptrs = {p.data_ptr() for p in dm.parameters()}
            report["rebound_shared"] = sum(m.weight.data_ptr() in new_ptrs for m in engine.transformer.modules()
                                           if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
            with torch.no_grad(), engine.on_comfy_modules():
                again = dm(x, t.to(dtype), ctx, transformer_options={}).float()
            with torch.no_grad():
                report["after_rebind_max_abs"] = float((engine.predict(x, t, ctx, None).float() - again).abs().max())
            report["graph_buffers"] = len(captured)
            engine.close()
            report["graph_buffers_freed"] = sum(t.untyped_storage().nbytes() == 0 for t in captured)


class ZPTestSetEnv:
    """Sets (or with an empty value, removes) an environment variable of the server process, for switches the pack
    reads when a node runs (e.g. QWEN_ZERO_PRIOR_EXACT_TEXT)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": ""}), "value": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, name, value):
        return float("nan")  # always runs

    def run(self, name, value):
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
        return {}


class ZPTestPatchModel:
    """A clone of the MODEL with a ``post_input`` patch (``ModelPatcher.set_model_patch``): what a node changing
    Qwen-Image's forward adds; here it leaves the values as they are."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model):
        m = model.clone()
        m.set_model_patch(lambda args: {k: args[k] for k in ("img", "txt", "img_ids", "txt_ids")}, "post_input")
        return (m,)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    ZPTestUntrackWeights, ZPTestCastLinear, ZPTestSaveConditioning, ZPTestTokens, ZPTestModelForward, ZPTestNonQwenClip,
    ZPTestKeepVisionTokenizer, ZPTestTrainingConditioning, ZPTestTrainingAttention, ZPTestDiffusersEngine, ZPTestSetEnv, ZPTestPatchModel)}
