"""training/reductions.py: inductor's persistent reductions up to 4096-wide rows, keyed into its caches."""

import copy
import threading

import pytest
import sympy
import torch
from qwen_zero_prior.training import reductions, rope

inductor_config = pytest.importorskip("torch._inductor.config", reason="torch without inductor: SKIPPED")
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint


class Features:  # what inductor's heuristic reads of a kernel
    def __init__(self, width, hint=ReductionHint.INNER):
        self.reduction_numel, self.hint = width, hint

    def get_reduction_hint(self, *args):
        return self.hint


@pytest.fixture
def inductor_says_no(monkeypatch):
    """inductor's own heuristic reads the graph being compiled: here it says "no" for any kernel."""
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(lambda *a, **k: False))
    yield
    reductions.uninstall()


def _choice(width, choices=None):
    return (choices or InductorChoices()).should_use_persistent_reduction(Features(width), False)


def test_wider_persistent_takes_fixed_row_reductions_only():
    """Row-wise (INNER) reductions of a fixed width up to the limit; nothing where inductor's persistent reductions
    are off, a reduction is cooperative, along columns or of a symbolic width."""
    assert reductions.wider_persistent(Features(sympy.Integer(3072)), False, 4096)
    assert reductions.wider_persistent(Features(4096), False, 4096)
    assert not reductions.wider_persistent(Features(4097), False, 4096)
    assert not reductions.wider_persistent(Features(3072), True, 4096)
    assert not reductions.wider_persistent(Features(3072, ReductionHint.OUTER), False, 4096)
    assert not reductions.wider_persistent(Features(sympy.Symbol("s0")), False, 4096)
    with inductor_config.patch({"triton.persistent_reductions": False}):
        assert not reductions.wider_persistent(Features(3072), False, 4096)


def test_install_holds_in_every_thread_and_uninstall_gives_inductors_choice_back(inductor_says_no):
    """Installed, 3072-wide rows are persistent also from another thread (autograd compiles the backward on its
    own); 12288 stays over the limit; uninstall restores the class's method and the custom-pass setting."""
    original = InductorChoices.__dict__["should_use_persistent_reduction"]
    assert reductions.install() == reductions.PERSISTENT_MAX == 4096
    assert reductions.installed() == 4096
    other = []
    t = threading.Thread(target=lambda: other.append(_choice(3072)))
    t.start()
    t.join()
    assert (_choice(3072), other, _choice(12288)) == (True, [True], False)
    assert "persistent_reductions<=4096" in inductor_config.post_grad_custom_post_pass.uuid()
    assert reductions.install(2048) == 2048 and not _choice(3072)  # another width replaces the first
    assert reductions.uninstall() and not reductions.uninstall()
    assert InductorChoices.__dict__["should_use_persistent_reduction"] is original
    assert inductor_config.post_grad_custom_post_pass is None and not _choice(3072) and reductions.installed() == 0


def test_environment_and_limits_that_change_nothing(inductor_says_no, monkeypatch):
    """``QWEN_ZERO_PRIOR_PERSISTENT_MAX`` sets the width, 0 (or anything up to inductor's own 1024) installs
    nothing, and a value that is not a width is refused naming the variable."""
    monkeypatch.setenv(reductions.ENV, "2048")
    assert reductions.install() == 2048 and _choice(2048) and not _choice(3072)
    reductions.uninstall()
    for off in ("0", "1024"):
        monkeypatch.setenv(reductions.ENV, off)
        assert reductions.install() == 0 and not _choice(1000) and reductions.installed() == 0
    assert inductor_config.post_grad_custom_post_pass is None
    monkeypatch.setenv(reductions.ENV, "wide")
    with pytest.raises(ValueError, match=r"QWEN_ZERO_PRIOR_PERSISTENT_MAX='wide'"):
        reductions.install()


def test_another_post_grad_pass_is_left_alone(inductor_says_no):
    """Where something else already set inductor's post-grad custom pass, nothing is installed: replacing it would
    drop the user's pass, and without our key the caches could hand back kernels of the other choice."""
    theirs = object()
    # inductor's own patch, not pytest's monkeypatch: undoing a setattr deletes a config entry, which hides it
    with inductor_config.patch(post_grad_custom_post_pass=theirs):
        assert reductions.install() == 0 and not _choice(3072)
        assert inductor_config.post_grad_custom_post_pass is theirs


def test_the_choice_is_keyed_into_inductors_caches(inductor_says_no, tmp_path):
    """A function compiled again with the wider choice misses the on-disk caches, which hit without it: kernels
    compiled under one choice are never reused under the other (without the key the second compile would hit)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    x = torch.randn(4, 64)

    def compile_once() -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        torch.compile(lambda t: torch.nn.functional.layer_norm(t, (64,)) * 2)(x)
        inductor = counters["inductor"]
        hits = inductor["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
        return hits, inductor["fxgraph_cache_miss"]

    with fresh_cache(dir=str(tmp_path)), inductor_config.patch(fx_graph_cache=True):
        assert compile_once() == (0, 1)
        assert compile_once()[0] >= 1  # the same compile again: a cache hit
        reductions.install()
        assert compile_once() == (0, 1)  # another key: compiled again
        reductions.uninstall()
        assert compile_once()[0] >= 1  # the first key again
    torch._dynamo.reset()


def test_compiled_training_installs_it_and_the_backend_gives_it_back(tiny_pipe, inductor_says_no):
    """``accelerate_transformer`` (both diffusers backends and the ComfyUI node's engine) installs it with
    ``model.compile`` only; ``DiffusersBackend.close`` removes what its ``prepare`` installed and nothing else."""
    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.diffusers_backend import DiffusersBackend, accelerate_transformer

    for compile_ in (False, True):
        tr = copy.deepcopy(tiny_pipe.transformer)
        try:
            accelerate_transformer(tr, ModelConfig(compile=compile_), ())
        finally:
            rope.uninstall()
        assert reductions.installed() == (4096 if compile_ else 0)
        reductions.uninstall()

    class Prepared(DiffusersBackend):  # only what prepare records and close reads
        def __init__(self, was):
            self._reductions_were_installed = was

    reductions.install()
    Prepared(was=4096).close()
    assert reductions.installed() == 4096  # installed before this backend: left as found
    Prepared(was=0).close()
    assert reductions.installed() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: the kernel inductor writes for CUDA")
def test_a_3072_wide_layer_norm_compiles_as_a_persistent_kernel_on_the_gpu():
    """On CUDA a 3072-wide layer norm (Qwen-Image's hidden size) compiles to a persistent kernel (``triton_per_``)
    with the change and to a looped one (``triton_red_``) without it, with the same result within float rounding."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)

    def fn(t):
        return torch.nn.functional.layer_norm(t, (3072,)).float().abs().amax(dim=-1)

    out = {}
    for limit in (0, 4096):
        reductions.install(limit)
        try:
            with fresh_cache():
                torch._dynamo.reset()
                out[limit], (code,) = run_and_get_code(torch.compile(fn), x)
        finally:
            reductions.uninstall()
        assert ("triton_per_" in code) == (limit == 4096) and ("triton_red_" in code) == (limit == 0), limit
    torch.testing.assert_close(out[0], out[4096])
