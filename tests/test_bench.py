"""CPU smoke test of the GPU benchmark's code paths (tiny models; the numbers mean nothing here)."""

import json
import re
from pathlib import Path

import pytest
import torch


def test_bench_main_and_capped_paths(tmp_path):
    from bench.bench_step import main

    out = tmp_path / "r.json"
    assert main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                 "--warmup", "1", "--iters", "1", "--fp8", "--trace", str(tmp_path), "--out", str(out)]) == 0
    all_rows = json.loads(out.read_text())["rows"]
    rows = {r["name"].split(" ")[0]: r for r in all_rows if "fp8" not in r["name"]}
    assert {"a-diffusers+peft", "b-project", "b-text-encoder", "c-inference"} <= set(rows)
    assert all(r["ms_median"] > 0 for r in all_rows)
    assert rows["b-project"]["tflop"] is not None and rows["a-diffusers+peft"]["tflop"] is not None
    te = [r for r in all_rows if r["name"].startswith("b-text-encoder")]
    assert len(te) == 3 and all(r["tflop"] is not None for r in te)
    fp8 = [r for r in all_rows if "fp8 matmuls" in r["name"]]
    assert len(fp8) == 1 and fp8[0]["tflop"] == rows["b-project"]["tflop"]  # bf16-equivalent FLOPs
    assert fp8[0]["weights_bytes"] > 0 and "weights_gib" in fp8[0]  # the frozen weights as stored (fp8 converted)
    assert rows["b-project"]["ms_steady_median"] > 0 and fp8[0]["ms_steady_median"] > 0
    assert (tmp_path / "b-fp8.json.gz").stat().st_size > 0 and "idle_ms" in fp8[0]["idle"]
    out2 = tmp_path / "c.json"
    assert main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                 "--warmup", "1", "--iters", "2", "--mode", "capped", "--prefetch-gib", "0.5", "--prefetch-share", "0",
                 "--offload-te", "fp8", "--gc-freeze", "1",
                 "--offload-budget-gib", "20", "--out", str(out2)]) == 0
    row = json.loads(out2.read_text())["rows"][0]
    assert row["ms_median"] > 0
    # on a CPU nothing is offloaded: no prefetcher, no allocator stats, and the name says what was asked
    assert row["prefetch"] is None and row["alloc_retries"] is None and "prefetch 0 GiB" in row["name"]
    # per step: wall and host milliseconds, and Python's collections while timing
    assert len(row["ms"]) == len(row["host_ms"]) == 2 and min(row["host_ms"]) > 0
    assert row["gc_freeze"] is True and len(row["gc"]["collections"]) == 3 and len(row["gc"]["ms"]) == 3
    # a full collection by hand after the timed steps: the objects it walked (the heap is still frozen) and its time
    by_hand = row["gc"]["by_hand"]
    assert by_hand["frozen"] > by_hand["walked"] > 0 and by_hand["ms"] >= 0 and by_hand["collected"] >= 0


def test_gc_timer_reports_each_full_collection():
    """GcTimer: per generation, the collections and their time; per full collection, what it walked and freed."""
    import gc

    from bench.bench_step import GcTimer

    class Cycle:
        pass

    gc.collect()  # no garbage left by earlier tests
    with GcTimer() as t:
        for _ in range(5):
            c = Cycle()
            c.me = c  # cyclic garbage only a collection frees
        del c
        gc.collect()
    rep = t.report()
    assert rep["collections"][2] == 1 and len(rep["full"]) == 1
    full = rep["full"][0]
    assert full["walked"] > 5 and full["collected"] >= 5 and full["ms"] >= 0 and full["count_ms"] >= 0


def test_gc_timer_shows_where_a_slow_full_collection_waits():
    """A finalizer that waits (here: sleeps, as one waiting for the GPU would) lets the watcher see the collecting
    thread's stack inside the collection, also where another thread collects; a collection that only walks objects
    leaves the stack empty."""
    import gc
    import threading
    import time as _time

    import torch

    from bench.bench_step import GcTimer

    class Slow:
        def __del__(self):
            _time.sleep(0.6)  # lets go of the interpreter, as a wait on a lock or the GPU does

    def slow_cycle():
        s = Slow()
        s.me = s

    def collect_in_worker():
        slow_cycle()
        gc.collect()

    gc.collect()
    with GcTimer() as t:
        t.sample_s = 0.2
        slow_cycle()
        gc.collect()
        gc.collect()  # nothing slow left: walks only
        worker = threading.Thread(target=collect_in_worker, name="worker")
        worker.start()
        worker.join()
    slow, quick, other = t.report()["full"]
    assert slow["ms"] >= 500 and slow["thread"] == "MainThread"
    assert any("__del__" in line for line in slow["stack"]), slow
    assert other["thread"] == "worker" and any("__del__" in line for line in other["stack"]), other
    assert not any("join" in line for line in other["stack"])  # the collecting thread's, not the main one's
    if quick["ms"] < t.sample_s * 1000:  # a walk shorter than the sampling delay cannot have been seen
        assert quick["stack"] == []
    if not torch.cuda.is_initialized():
        assert quick["gpu_idle"] == [None, None]
    assert t._watcher is None  # the watcher ended with the timer


def test_trace_gaps_charges_idle_time_to_the_launching_range():
    """A hand-made trace: two kernels back to back, a 2 ms gap before a kernel launched inside "encode", a 1 ms
    gap before one launched from another thread (the autograd engine's)."""
    from bench.trace_gaps import format_report, gap_report

    def kernel(ts, dur, corr, name="k"):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def launch(ts, corr, tid=1):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 5, "tid": tid,
                "args": {"correlation": corr}}

    def annotation(ts, dur, name, tid=1):
        return {"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur, "tid": tid}

    events = [
        annotation(0, 10_000, "train_step"), annotation(2_000, 3_000, "encode"),
        launch(10, 1), kernel(100, 400, 1), launch(20, 2), kernel(500, 500, 2),  # busy 0.1 .. 1.0 ms
        launch(2_900, 3), kernel(3_000, 1_000, 3, "after_sync"),  # 2 ms idle, launched inside "encode"
        launch(4_500, 4, tid=7), kernel(5_000, 1_000, 4, "grad"),  # 1 ms idle, autograd thread
    ]
    rep = gap_report(events, min_gap_us=50)
    assert rep["busy_ms"] == 2.9 and rep["idle_ms"] == 3.0 and rep["span_ms"] == 5.9
    assert rep["by_label_ms"] == {"encode": 2.0, "backward (autograd thread)": 1.0}
    assert rep["gaps"][0] == {"ms": 2.0, "at_ms": 0.9, "label": "encode", "next_kernel": "after_sync"}
    assert "encode" in format_report(rep)
    assert rep["overlap"] == {"kernel_ms": 2.9, "copy_ms": 0.0, "both_ms": 0.0}


def test_trace_overlap_counts_copies_beside_kernels():
    """Copies on a side stream: 0.5 ms of a 1 ms copy runs beside a kernel, the second copy beside none; two
    overlapping kernels on two streams count once."""
    from bench.trace_gaps import format_report, gap_report

    def ev(cat, ts, dur, tid):
        return {"ph": "X", "cat": cat, "name": cat, "ts": ts, "dur": dur, "tid": tid, "args": {}}

    events = [ev("kernel", 0, 1_000, 7), ev("kernel", 200, 300, 9), ev("gpu_memcpy", 500, 1_000, 8),
              ev("gpu_memcpy", 2_000, 500, 8), ev("kernel", 3_000, 100, 7)]
    rep = gap_report(events, min_gap_us=50)
    assert rep["overlap"] == {"kernel_ms": 1.1, "copy_ms": 1.5, "both_ms": 0.5}
    assert "copies 1.5 ms, both at once 0.5 ms" in format_report(rep)


def test_bench_demo_reports_the_demo_time(tmp_path):
    """The demo's wall time is reported by bench/bench_demo.py (tests never assert a time)."""
    from bench.bench_demo import main

    out = tmp_path / "demo.json"
    assert main(["--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and len(result["seconds"]) == 1 and result["median_s"] > 0


def test_isolated_variants_record_failures_as_rows(tmp_path, monkeypatch):
    """``--isolate`` runs each variant in its own process: one that fails (here: an invalid setting, standing in
    for a CUDA OOM or a crash) becomes a row saying how, the others still run, and the cap is in the JSON."""
    import os

    from bench.bench_step import main

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "v.json"
    assert main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                 "--warmup", "1", "--iters", "1", "--mode", "variants", "--isolate", "--memory-cap-gib", "78",
                 "--variant", "text_prefix_cache=1 memory_cap_gib=40", "--variant", "compile_mode=reduce-overhead",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["memory_cap_gib"] == 78 and len(res["rows"]) == 2
    ok, failed = res["rows"]
    assert ok["ms_median"] > 0 and "error" not in ok
    # a variant's own cap replaces --memory-cap-gib in its process (and in what auto would plan there)
    assert ok["memory_cap_gib"] == 40 and ok["plan_capacity_gib"] == 40 and failed["memory_cap_gib"] == 78
    assert failed["error"].startswith("exit ") and "compile_mode is set but model.compile is false" in failed["log_tail"]
    # each variant's whole output beside the JSON (a failed row keeps only a tail)
    assert "compile_mode is set but model.compile is false" in (tmp_path / "v-variant-1.log").read_text()
    rows = [json.loads(line) for line in (tmp_path / "v-variant-0.log").read_text().splitlines()
            if line.startswith('{"name"')]
    assert [r["ms_median"] for r in rows] == [ok["ms_median"]]


def test_isolated_variant_that_crashes_after_writing_its_rows_keeps_them(tmp_path, monkeypatch):
    """A child that measured and wrote its rows, then died (a segmentation fault at exit), keeps its rows, marked with
    how it ended and the log's tail; a child that died before or while writing is an error row. Children run with
    faulthandler on, so a crash names the Python frames it died in."""
    import subprocess

    from bench.bench_step import main

    envs = []

    class FakePopen:  # a child that wrote (or not) its rows, then died of SIGSEGV
        def __init__(self, cmd, stdout, stderr, text, env):
            envs.append(env.get("PYTHONFAULTHANDLER"))
            stdout.write("Fatal Python error: Segmentation fault\n  File \"cudagraph_trees.py\", line 1261 in "
                         "run_graph\n")
            spec = cmd[cmd.index("--variant") + 1]
            out = Path(cmd[cmd.index("--out") + 1])
            if spec == "measured=1":
                out.write_text(json.dumps({"rows": [{"name": "b-variant measured=1", "ms_median": 301.5}]}))
            elif spec == "cut=1":  # died while writing
                out.write_text('{"rows": [{"name": ')
            self.returncode = -11

        def wait(self, timeout=None):
            return self.returncode

        def poll(self):
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr("bench.bench_step._parse_variant", lambda spec: {})
    out = tmp_path / "v.json"
    assert main(["--size", "tiny", "--device", "cpu", "--mode", "variants", "--isolate", "--variant", "measured=1",
                 "--variant", "died=1", "--variant", "cut=1", "--out", str(out)]) == 0
    kept, died, cut = json.loads(out.read_text())["rows"]
    assert kept["ms_median"] == 301.5 and kept["exit_after_rows"] == "killed by signal 11"
    assert "run_graph" in kept["exit_log_tail"]
    assert died["error"] == "killed by signal 11" and died["ms_median"] != died["ms_median"]  # NaN
    assert cut["error"] == "killed by signal 11" and cut["name"] == "b-variant cut=1"
    assert envs == ["1", "1", "1"]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:  # the field after the state: the parent's pid
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the variant's process in /proc: SKIPPED")
def test_isolated_run_stopped_by_sigterm_stops_its_variant_process(tmp_path):
    """``timeout`` (or a job's limit) sends SIGTERM to the bench; under ``--isolate`` the bench then stops the
    variant's process too, instead of leaving it running (on a GPU: holding its memory for the next command)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-m", "bench.bench_step", "--size", "tiny", "--device", "cpu",
                               "--dtype", "float32", "--res", "64", "--rank", "4", "--warmup", "1", "--iters", "100000",
                               "--mode", "variants", "--only-b", "--isolate", "--variant", "compile=0",
                               "--out", str(tmp_path / "v.json")],
                              cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = []
    try:
        deadline = time.monotonic() + 300
        while not children and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            children = _children(parent.pid)
        assert children, f"the bench started no variant process (exit {parent.poll()})"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=120) == 128 + signal.SIGTERM
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    finally:
        for pid in {parent.pid, *children, *_children(parent.pid)}:  # a child orphaned by a failure is not found again
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        parent.wait()


def test_baseline_row_keeps_its_times_when_the_flop_counter_runs_out_of_memory(tmp_path, monkeypatch):
    """The FLOP counter's extra pass holds more than a step: where it runs out of memory (the checkpointed baseline
    under a 78 GiB cap did on the H200), the row keeps the timed step and says why it has no count."""
    from bench import bench_step

    def out_of_memory(fn):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 48.00 MiB")

    monkeypatch.setattr(bench_step, "count_tflop", out_of_memory)
    out = tmp_path / "b.json"
    assert bench_step.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank",
                            "4", "--warmup", "0", "--iters", "1", "--mode", "variants", "--variant",
                            "baseline=1 gradient_checkpointing=1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ms_median"] > 0 and "error" not in row
    assert row["tflop"] is None and row["tflop_note"] == "the FLOP counter ran out of memory"


def test_variants_report_weights_and_plan_for_fp8_and_the_baseline(tmp_path):
    """``--mode variants``: each row has the frozen weights as stored and what ``memory: auto`` would plan under the
    cap; fp8_matmul's image stream is stored in one fp8 copy (fewer bytes than the same pipeline's float32/bf16
    ones); ``baseline=1`` runs the diffusers + peft step (a) in the same run."""
    from bench.bench_step import main

    out = tmp_path / "v.json"
    assert main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                 "--warmup", "1", "--iters", "1", "--mode", "variants", "--memory-cap-gib", "78",
                 "--variant", "text_prefix_cache=1", "--variant", "baseline=1", "--variant", "fp8_matmul=1",
                 "--out", str(out)]) == 0
    plain, baseline, fp8 = json.loads(out.read_text())["rows"]
    assert baseline["name"].startswith("a-variant diffusers+peft step, eager, checkpointing=False, attn=default")
    assert fp8["name"] == "b-variant fp8_matmul=1" and fp8["ms_median"] > 0
    for r in (plain, baseline, fp8):
        assert r["weights_bytes"] > 0 and r["plan_auto"] == "resident" and r["plan_capacity_gib"] == 78.0
        assert r["plan_resident_need_gib"] > 0 and r["ms_median"] > 0
    assert baseline["weights_bytes"] == plain["weights_bytes"]  # same frozen models, LoRA not counted
    from qwen_zero_prior.training import tiny
    from qwen_zero_prior.training.fp8 import IMAGE_STREAM

    tr = tiny.tiny_transformer()
    blocks = len(tr.transformer_blocks)
    shapes = [tr.transformer_blocks[0].get_submodule(n).weight.shape for n in IMAGE_STREAM]
    # float32 weights (4 bytes) become one fp8 byte + a float32 scale a row
    freed = blocks * sum(o * i * 4 - (o * i + 4 * o) for o, i in shapes)
    assert plain["weights_bytes"] - fp8["weights_bytes"] == freed


def test_capped_mode_refuses_a_cap_from_the_start():
    """--mode capped sets its cap after building the model on the GPU: a --memory-cap-gib would run the build out of
    memory (seen on an H200: exit 1 after 14 s), so the combination is refused up front."""
    from bench.bench_step import main

    with pytest.raises(SystemExit, match="drop --memory-cap-gib"):
        main(["--size", "tiny", "--device", "cpu", "--mode", "capped", "--capped-gib", "24", "--memory-cap-gib", "24"])


@pytest.mark.parametrize("flag", ["--prefetch-share", "--gc-freeze", "--block-fetch"])
@pytest.mark.parametrize("value", ["2", "yes"])
def test_zero_one_flags_refuse_garbage(flag, value, capsys):
    """--prefetch-share, --gc-freeze and --block-fetch take 0 or 1: anything else stops at the command line, naming
    the flag and the value."""
    from bench.bench_step import main

    with pytest.raises(SystemExit) as e:
        main(["--size", "tiny", "--device", "cpu", "--mode", "capped", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and value in err, err


def test_a_variant_cap_needs_its_own_process():
    from bench.bench_step import main

    with pytest.raises(SystemExit, match="memory_cap_gib needs --isolate"):
        main(["--size", "tiny", "--device", "cpu", "--mode", "variants", "--variant", "fp8_matmul=1 memory_cap_gib=78",
              "--variant", "baseline=1"])


def test_cublas_workspace_is_chosen_per_process_as_training_does(tmp_path, monkeypatch):
    """The bench chooses cuBLAS's workspace as training does (training/cublas.py), before anything runs a product:
    none for a variant compiled with CUDA graphs and fp8, PyTorch's for any other (the diffusers + peft baseline
    among them) and outside ``--mode variants``. ``--cublas-workspace none/default`` or a variant's ``cublas_ws=0/1``
    decide instead; ``cublas_ws`` takes 0 or 1 and, with several variants, needs --isolate (cuBLAS reads the size
    once a process). Rows record the setting."""
    import argparse
    import os

    from bench import bench_step
    from qwen_zero_prior.training import cublas

    for key in cublas.NO_WORKSPACE:  # restored afterwards, also where the bench sets them
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)
    fast = "compile=1 compile_mode=reduce-overhead fp8_matmul=1"

    def choose(*variants, workspace="auto", mode="variants"):
        got = bench_step._cublas_workspace(argparse.Namespace(
            cublas_workspace=workspace, mode=mode, variant=list(variants), compile=False, compile_mode=""),
            torch.device("cuda"))
        for key in cublas.NO_WORKSPACE:
            os.environ.pop(key, None)
        return got

    none, default = "CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0", "PyTorch's default"
    assert choose(fast) == none
    assert choose(fast, fast + " memory_cap_gib=78") == none
    for other in ("", "compile=1 fp8_matmul=1", "compile=1 compile_mode=reduce-overhead",
                  "baseline=1 gradient_checkpointing=0", "baseline=1 " + fast):
        assert choose(other) == default, other
    assert choose(fast, "baseline=1") == default  # one process for both: the baseline's choice
    assert choose(fast, mode="main") == default
    assert choose("", workspace="none") == none and choose(fast, workspace="default") == default
    assert choose("cublas_ws=1 " + fast) == default and choose("cublas_ws=0") == none
    with pytest.raises(SystemExit, match="cublas_ws needs --isolate"):
        choose("cublas_ws=0", fast)
    with pytest.raises(SystemExit, match="cublas_ws='2'; expected 1 or 0"):
        choose("cublas_ws=2")
    out = tmp_path / "v.json"  # a variant's key is taken before the trainer sees it; the row says the setting
    assert bench_step.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                            "--warmup", "1", "--iters", "1", "--mode", "variants", "--variant", "cublas_ws=1",
                            "--out", str(out)]) == 0
    row, = json.loads(out.read_text())["rows"]
    assert row["name"] == "b-variant cublas_ws=1" and row["cublas_workspace"] == default


def test_bench_qwen_image_21_variants_and_capped(tmp_path, monkeypatch):
    """``--family qwen-image-2.1`` on tiny 2.1 models: (a) diffusers + peft rows with and without checkpointing and
    (b) rows (defaults, fp8 matmuls), each in its own process, on the same text length and LoRA targets; the
    family is in the JSON; the capped mode records the memory plan for its capacity."""
    import os

    from bench.bench_step import main

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    common = ["--family", "qwen-image-2.1", "--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64",
              "--rank", "4", "--warmup", "1", "--iters", "1"]
    out = tmp_path / "v.json"
    assert main([*common, "--mode", "variants", "--isolate", "--variant", "baseline=1 gradient_checkpointing=0",
                 "--variant", "baseline=1 gradient_checkpointing=1", "--variant", "", "--variant", "fp8_matmul=1",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["family"] == "qwen-image-2.1" and len(res["rows"]) == 4
    a0, a1, b, fp8 = res["rows"]
    assert not any("error" in r for r in res["rows"]), res["rows"]
    assert a0["name"].startswith("a-variant diffusers+peft step, eager, checkpointing=False")
    assert a1["name"].startswith("a-variant diffusers+peft step, eager, checkpointing=True")
    assert b["name"] == "b-variant defaults" and fp8["name"] == "b-variant fp8_matmul=1"
    assert all(r["ms_median"] > 0 for r in res["rows"]) and a0["tflop"] is not None and a1["tflop"] is not None
    assert a0["text_tokens"] == b["text_tokens"] > 0  # (a) runs on (b)'s text length
    assert a0["lora_targets"] == ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj",
                                  "img_mlp.gate_layer", "img_mlp.out"]  # 2.1's default, as (b)'s
    capped = tmp_path / "c.json"
    assert main([*common, "--mode", "capped", "--capped-gib", "0.0001", "--out", str(capped)]) == 0
    res = json.loads(capped.read_text())
    assert res["family"] == "qwen-image-2.1" and res["plan"]["mode"] == "offload"
    assert res["plan"]["layout"]["text_encoder_layers"] == "stream"  # 0.1 MiB holds nothing
    row = res["rows"][0]
    assert row["ms_median"] > 0 and row["last_loss"] > 0 and "offload not applied (no GPU)" in row["name"]


def test_variants_record_the_rope_form_and_real_rope_0(tmp_path, monkeypatch):
    """With compile, a (b) row says which RoPE its compiled blocks trace: Qwen-Image's real-arithmetic rewrite by
    default, diffusers' complex form with the bench-only ``real_rope=0``, for both families."""
    import os

    import pytest

    from bench.bench_step import main

    from qwen_zero_prior.training import rope

    pytest.importorskip("torch._inductor", reason="torch without inductor: compiled bench variants SKIPPED")
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    common = ["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4", "--warmup", "0",
              "--iters", "1", "--mode", "variants"]
    try:
        out = tmp_path / "q.json"
        assert main([*common, "--variant", "compile=1", "--variant", "compile=1 real_rope=0", "--out", str(out)]) == 0
        assert [r["rope"] for r in json.loads(out.read_text())["rows"]] == ["real", "complex"]
        out = tmp_path / "q21.json"
        assert main([*common, "--family", "qwen-image-2.1", "--variant", "compile=1", "--variant",
                     "compile=1 real_rope=0 layout_cache=0", "--out", str(out)]) == 0
        assert [r["rope"] for r in json.loads(out.read_text())["rows"]] == ["real", "complex"]
    finally:
        rope.uninstall()  # this process's later tests see diffusers' own function


def test_node_bench_inputs_are_typed_as_the_train_nodes_own():
    """bench/comfyui's per-run Train node inputs (RUNS="...:<cap>::compile=1,rank=1"): each value typed as the example
    workflow's (a 1 is True for a boolean input, 1 for an int one); malformed items are refused, naming them."""
    import pytest

    from bench.comfyui.run_node import REPO, node_inputs

    defaults = json.loads((REPO / "example_workflows" / "qwen_zero_prior_train_api.json").read_text())["4"]["inputs"]
    got = node_inputs("compile=1,rank=1,seed=0,learning_rate=1e-4,default_caption=1", defaults)
    assert got == {"compile": True, "rank": 1, "seed": 0, "learning_rate": 1e-4, "default_caption": "1"}
    assert type(got["rank"]) is int and type(got["compile"]) is bool
    with pytest.raises(SystemExit, match="compile is a boolean"):
        node_inputs("compile=yes", defaults)
    with pytest.raises(SystemExit, match="'rank' is not name=value"):
        node_inputs("rank", defaults)


def test_cond_equality_refuses_a_missing_text_encoder_file(tmp_path):
    import pytest

    from bench.comfyui import cond_equality

    with pytest.raises(SystemExit, match="no such file .*make_weights.py te"):
        cond_equality.main(["--comfyui", str(tmp_path), "--te", str(tmp_path / "absent.safetensors"),
                            "--out", str(tmp_path / "c.json")])
    assert not (tmp_path / "c.json").exists()


def test_bench_refuses_qwen_image_21_main_mode():
    import pytest

    from bench.bench_step import main

    with pytest.raises(SystemExit, match="--family qwen-image-2.1 runs in --mode variants"):
        main(["--family", "qwen-image-2.1", "--size", "tiny", "--device", "cpu"])


def test_2_1_baseline_runs_diffusers_processor_with_an_attention_backend(tmp_path, monkeypatch):
    """(a) is diffusers + peft as they are: building the project trainer that measures (b)'s text length installs
    the 2.1 training processor when an attention backend is given; the baseline step must not run it."""
    import os

    from bench import bench_step

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seen = []
    original = bench_step.baseline_step_fn

    def spy(pipe, *args, **kwargs):
        seen.append({type(b.attn.processor).__name__ for b in pipe.transformer.transformer_blocks})
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(bench_step, "baseline_step_fn", spy)
    out = tmp_path / "a.json"
    assert bench_step.main(["--family", "qwen-image-2.1", "--size", "tiny", "--device", "cpu", "--dtype", "float32",
                            "--res", "64", "--rank", "4", "--warmup", "0", "--iters", "1", "--mode", "variants",
                            "--attention-backend", "_native_math", "--variant", "baseline=1", "--variant",
                            "compile=0", "--out", str(out)]) == 0
    assert seen == [{"QwenImage21AttnProcessor"}]
    assert [r["ms_median"] > 0 for r in json.loads(out.read_text())["rows"]] == [True, True]


def test_layout_cache_key_is_refused_outside_2_1(monkeypatch):
    import os

    import pytest

    from bench.bench_step import main

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(SystemExit, match=r"^--variant 'layout_cache=0': layout_cache is Qwen-Image 2.1's"):
        main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4", "--warmup", "0",
              "--iters", "1", "--mode", "variants", "--variant", "layout_cache=0"])


def test_profiled_steps_write_their_trace_where_asked(monkeypatch, tmp_path):
    """QWEN_ZERO_PRIOR_PROFILE_TRACE=PATH: the profiled steps' Chrome trace is written there (gzip for .gz, folders
    made), in the form bench/trace_gaps.py reads (gpu_node_bench.sh TRACE=1). Profiling is a GPU's; forced on here."""
    import gzip
    import json

    import torch

    from bench.trace_gaps import gap_report, load
    from qwen_zero_prior.training import profiling

    path = tmp_path / "deep" / "steps.json.gz"
    monkeypatch.setenv(profiling.TRACE_ENV, str(path))
    prof = profiling.StepProfiler(torch.device("cpu"))
    prof.steps = 1  # (0 on a CPU device)
    prof.step(profiling.FIRST_STEP)
    torch.ones(64).cumsum(0)
    prof.step(profiling.FIRST_STEP + 1)
    assert "cumsum" in prof.table
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any("cumsum" in e.get("name", "") for e in events)
    assert gap_report(load(path))["busy_ms"] == 0.0  # no device work on a CPU: an empty report, not an error
    monkeypatch.delenv(profiling.TRACE_ENV)
    assert profiling.StepProfiler(torch.device("cpu")).trace_path is None


def test_node_kernel_profile_knob_and_its_table_in_the_bench_json(monkeypatch):
    """QWEN_ZERO_PRIOR_PROFILE_STEPS (the node's kernel profile, run_node.py --profile-steps): a number or unset,
    garbage refused naming the variable; run_node.py keeps the node's logged table, header to total line."""
    import pytest

    from bench.comfyui.run_node import kernel_table
    from qwen_zero_prior.training import profiling

    monkeypatch.delenv(profiling.ENV, raising=False)
    assert profiling.steps_from_env() == 0
    monkeypatch.setenv(profiling.ENV, "2")
    assert profiling.steps_from_env() == 2
    import torch

    assert profiling.StepProfiler(torch.device("cpu")).steps == 0  # nothing to profile on a CPU
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv(profiling.ENV, bad)
        with pytest.raises(ValueError, match=rf"^QWEN_ZERO_PRIOR_PROFILE_STEPS='{re.escape(bad)}': expected a number"):
            profiling.steps_from_env()
    log = "\n".join(["[INFO] phase times ...", "[INFO] kernels of 2 profiled steps (QWEN_ZERO_PRIOR_PROFILE_STEPS):",
                     "-----", "Name  Self CUDA", "nvjet_sm90_kernel  10.0ms", "-----",
                     "Self CPU time total: 1.0ms", "Self CUDA time total: 20.0ms", "[INFO] Prompt executed"])
    table = kernel_table(log)
    assert table[0].endswith("kernels of 2 profiled steps (QWEN_ZERO_PRIOR_PROFILE_STEPS):")
    assert table[-1] == "Self CUDA time total: 20.0ms" and "nvjet_sm90_kernel  10.0ms" in table
    assert kernel_table("[INFO] no profile here") == []
    # since session 10 the host-side table follows; both are kept, the log after them is not
    two = log.replace("[INFO] Prompt executed", "\n".join([
        "host side, by own CPU time:", "-----", "aten::mm  5.0ms", "Self CPU time total: 1.0ms",
        "Self CUDA time total: 20.0ms", "[INFO] Prompt executed"]))
    table = kernel_table(two)
    assert "aten::mm  5.0ms" in table and "nvjet_sm90_kernel  10.0ms" in table
    assert table[-1] == "Self CUDA time total: 20.0ms" and not any("Prompt executed" in line for line in table)


@pytest.mark.parametrize("family", ["qwen-image", "qwen-image-2.1"])
def test_fused_lora_key_runs_peft_alone_and_is_recorded(tmp_path, monkeypatch, family):
    """--variant "... fused_lora=0": the compiled step with each LoRA's A product on its own (as peft), recorded in
    the row; the default row records the shared-input LoRA (lora_shared.py) on: Qwen-Image's q/k/v of each stream
    (attention_qwen.py), 2.1's q/k/v and gate/proj."""
    import os

    import torch

    from bench import bench_step
    from qwen_zero_prior.training import lora_shared, rope

    pytest.importorskip("torch._inductor", reason="torch without inductor: compiled bench test SKIPPED")
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    counts = torch.zeros(2)  # shared-input calls, fused ones: mutated inside the compiled graph (no list guards)
    original = lora_shared.project

    def spy(x, layers):
        counts[0] += 1
        if lora_shared._adapter(layers) is not None:
            counts[1] += 1
        return original(x, layers)

    monkeypatch.setattr(lora_shared, "project", spy)
    out = tmp_path / "f.json"
    try:
        _run_fused_lora_variants(bench_step, counts, out, tmp_path, family)
    finally:
        rope.uninstall()  # the compiled variants routed diffusers' RoPE (training/rope.py): leave it as found
    rows = [json.loads(p.read_text())["rows"][0] for p in (out, tmp_path / "g.json")]
    assert [r["fused_lora"] for r in rows] == [False, True]


def _run_fused_lora_variants(bench_step, counts, out, tmp_path, family):
    assert bench_step.main(["--family", family, "--size", "tiny", "--device", "cpu", "--dtype", "float32",
                            "--res", "64", "--rank", "4", "--warmup", "0", "--iters", "1", "--mode", "variants",
                            "--variant", "compile=1 fused_lora=0", "--out", str(out)]) == 0
    assert counts[0] > 0 and counts[1] == 0  # every shared-input call ran peft's way
    counts.zero_()
    assert bench_step.main(["--family", family, "--size", "tiny", "--device", "cpu", "--dtype", "float32",
                            "--res", "64", "--rank", "4", "--warmup", "0", "--iters", "1", "--mode", "variants",
                            "--variant", "compile=1", "--out", str(tmp_path / "g.json")]) == 0
    assert counts[0] > 0 and counts[1] == counts[0]


def test_node_bench_refuses_a_malformed_env_item(tmp_path):
    """run_node.py --env takes NAME=VALUE: anything else is refused, naming the item, before ComfyUI starts; so is
    an emulated card given both ways (a memory blocker and a per-process cap)."""
    from bench.comfyui.run_node import main

    args = ["--comfyui", str(tmp_path), "--models", str(tmp_path), "--dit", "d", "--te", "t", "--vae", "v",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "row.json")]
    for bad in ("QWEN_ZERO_PRIOR_EXACT_TEXT", "=1"):
        with pytest.raises(SystemExit, match=f"--env: {re.escape(repr(bad))} is not NAME=VALUE"):
            main([*args, "--env", bad])
    with pytest.raises(SystemExit, match="--card-gib and --cap-gib are two ways"):
        main([*args, "--card-gib", "23.5", "--cap-gib", "24"])
    with pytest.raises(SystemExit, match=r"GiB of GPU memory \(0: off\), got -2 and 0"):
        main([*args, "--card-gib", "-2"])
    assert not (tmp_path / "work").exists() and not (tmp_path / "row.json").exists()


def test_node_bench_memory_blocker_starts_reports_and_stops(monkeypatch):
    """run_node.py --card-gib's blocker process (a stand-in script here: the real one needs a GPU): its report line is
    found after other output, it exits when its stdin is closed, and a failure raises with what it printed."""
    from bench.comfyui import run_node

    monkeypatch.setattr(run_node, "BLOCKER", "import sys\nprint('a warning first')\n"
                        "print('blocker: holds 1.00 GiB, 23.50 GiB left free', flush=True)\nsys.stdin.read()\n")
    proc, line = run_node.start_blocker(23.5)
    assert line == "blocker: holds 1.00 GiB, 23.50 GiB left free" and proc.poll() is None
    run_node.stop_blocker(proc)
    assert proc.returncode == 0
    monkeypatch.setattr(run_node, "BLOCKER", "import sys\nprint('blocker: FAILED: 10.00 GiB free, less than the "
                        "23.50 GiB card asked for', flush=True)\nsys.exit(1)\n")
    with pytest.raises(RuntimeError, match=r"--card-gib 23.5 failed .*10.00 GiB free, less than the 23.50 GiB"):
        run_node.start_blocker(23.5)


def test_node_bench_run_stops_comfyui_on_its_timeout(tmp_path):
    """bench/comfyui/run_node.py under `timeout` (SIGTERM): the row is written with the stop as its error and the
    ComfyUI it started is stopped too (an orphaned server once kept the port and the GPU for the next run); --env
    reaches ComfyUI's environment and the row."""
    import os
    import signal
    import subprocess
    import sys
    import time

    fake = tmp_path / "comfyui"  # a "ComfyUI" that records its pid and environment, then never answers HTTP
    fake.mkdir()
    (fake / "main.py").write_text(
        "import json, os, time\n"
        f"open({str(tmp_path / 'child.json')!r}, 'w').write(json.dumps({{'pid': os.getpid(), "
        "'exact': os.environ.get('QWEN_ZERO_PRIOR_EXACT_TEXT')}))\n"
        "time.sleep(300)\n")
    out = tmp_path / "row.json"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, str(repo / "bench" / "comfyui" / "run_node.py"), "--comfyui", str(fake), "--models",
         str(tmp_path), "--dit", "d.safetensors", "--te", "t.safetensors", "--vae", "v.safetensors", "--work",
         str(tmp_path / "work"), "--images", "1", "--res", "64", "--port", "8787", "--timeout", "300",
         "--env", "QWEN_ZERO_PRIOR_EXACT_TEXT=e4m3", "--out", str(out)],
        cwd=repo, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    child = tmp_path / "child.json"
    deadline = time.monotonic() + 120
    while not child.exists() or not child.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "run_node.py never started its ComfyUI"
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 1
    started = json.loads(child.read_text())
    assert started["exact"] == "e4m3"
    row = json.loads(out.read_text())
    assert row["error"]["exception_type"] == "Stopped" and "signal 15" in row["error"]["exception_message"]
    assert row["env"] == {"QWEN_ZERO_PRIOR_EXACT_TEXT": "e4m3"}
    deadline = time.monotonic() + 30
    while True:  # the fake ComfyUI is gone (terminated, then reaped by run_node.py)
        try:
            os.kill(started["pid"], 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the ComfyUI process outlived run_node.py"
        time.sleep(0.2)


def test_node_rows_count_the_graphs_captured_and_failed():
    """run_node.py's row says how many CUDA-graph pairs the node captured (text encoder, DiT engine) and how many
    captures failed, from the log lines the pack writes (training/graphs.py, suffix.py)."""
    from bench.comfyui.run_node import graph_counts

    log = "\n".join([
        "[INFO] text encoder: captured forward+backward CUDA graphs for prefix/suffix bucket (64, 32)",
        "[INFO] text encoder: captured forward+backward CUDA graphs for prefix/suffix bucket (64, 64)",
        "[INFO] DiT engine: captured forward+backward CUDA graphs for input shapes [(1, 16, 1, 128, 128)]",
        "[WARNING] DiT engine: CUDA graph capture failed for shapes [(1, 16, 1, 96, 96)] (boom); running them without",
        "[WARNING] text encoder: CUDA graph capture failed for shape (32, 32) (boom); running it eagerly",
        "[INFO] something else",
    ])
    assert graph_counts(log) == {"text_graph_captures": 2, "dit_graph_captures": 1, "graph_capture_failures": 2}
    assert graph_counts("") == {"text_graph_captures": 0, "dit_graph_captures": 0, "graph_capture_failures": 0}


def test_fp8_backward_copy_variant_values(tmp_path):
    """``fp8_backward_copy``: 0, 1 (as the memory plan says), force (every block's copies whatever the plan says: to
    measure whether they fit under a cap the plan's estimate rules out) or a number of blocks; anything else is
    refused naming the accepted values. A row says how many blocks hold copies (none on a CPU: nothing fp8 there
    in this test) and whether the text encoder's unused parts are on a GPU."""
    from bench.bench_step import main

    base = ["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4", "--warmup", "1",
            "--iters", "1", "--mode", "variants", "--only-b"]
    for bad in ("sometimes", "-2", "1.5"):
        with pytest.raises(SystemExit, match=rf"fp8_backward_copy='{re.escape(bad)}'; expected 0, 1, force or a number"):
            main([*base, "--variant", f"fp8_backward_copy={bad}", "--out", str(tmp_path / "bad.json")])
    assert main([*base, "--variant", "fp8_backward_copy=force", "--variant", "fp8_backward_copy=2 park_text=0 combo_kernels=1 lora_bf16=1",
                 "--out", str(tmp_path / "ok.json")]) == 0
    rows = json.loads((tmp_path / "ok.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["ms_median"] > 0 and "error" not in r for r in rows)
    assert [r["text_parts_on_gpu"] for r in rows] == [False, False]  # a CPU run: nothing on a GPU either way


def test_fp8_text_variant_converts_the_text_stream_too(tmp_path):
    """``fp8_text=1`` (bench-only) adds Qwen-Image's six text-stream projections to fp8_matmul's layers for that
    variant: its row's frozen weights are smaller than fp8_matmul's alone by exactly those layers' savings, the
    family is as it was afterwards, and without fp8_matmul=1 it is refused."""
    from bench.bench_step import QWEN_IMAGE_TEXT_STREAM, main
    from qwen_zero_prior.training import families, tiny

    base = ["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4", "--warmup", "1",
            "--iters", "1", "--mode", "variants", "--only-b"]
    with pytest.raises(SystemExit, match="fp8_text=1 widens fp8_matmul's layers; add fp8_matmul=1"):
        main([*base, "--variant", "fp8_text=1", "--out", str(tmp_path / "bad.json")])
    out = tmp_path / "v.json"
    assert main([*base, "--variant", "fp8_matmul=1", "--variant", "fp8_matmul=1 fp8_text=1", "--out", str(out)]) == 0
    image_only, both = json.loads(out.read_text())["rows"]
    assert both["fp8_text"] is True and "fp8_text" not in image_only
    tr = tiny.tiny_transformer()
    shapes = [tr.transformer_blocks[0].get_submodule(n).weight.shape for n in QWEN_IMAGE_TEXT_STREAM]
    freed = len(tr.transformer_blocks) * sum(o * i * 4 - (o * i + 4 * o) for o, i in shapes)  # float32 -> e4m3
    assert image_only["weights_bytes"] - both["weights_bytes"] == freed
    assert families.FAMILIES[families.QWEN_IMAGE].fp8_modules == families.QWEN_IMAGE_FP8
    assert families.detect_pipeline.__name__ == "detect_pipeline"


def test_rope_halves_is_the_same_rotation_in_the_permuted_layout(tmp_path, monkeypatch):
    """``rope_halves=1`` (bench-only, speed only) computes Qwen-Image's RoPE in the halves layout: on q/k whose head
    dimensions are permuted (even ones first, then odd) it gives the real RoPE's output permuted the same way, which
    is what permuting the q/k projections' rows would make exact. The variant runs compiled and says so in its row;
    without compile it is refused."""
    import os

    import torch

    from bench.bench_step import main, rope_halves_speed_only
    from qwen_zero_prior.training import rope

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 16, generator=g)
    angles = torch.rand(7, 8, generator=g) * 6.3
    freqs = torch.polar(torch.ones_like(angles), angles)
    perm = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])
    rope.install()
    try:
        real = rope.apply_rotary_emb_qwen_real(x, freqs, use_real=False)
        halves = rope_halves_speed_only(x[..., perm], freqs, use_real=False)
        assert torch.allclose(halves, real[..., perm], atol=1e-6)
        assert not torch.allclose(rope_halves_speed_only(x, freqs, use_real=False), real, atol=1e-3)
        pytest.importorskip("torch._inductor", reason="torch without inductor: compiled bench variants SKIPPED")
        monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        common = ["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                  "--warmup", "0", "--iters", "1", "--mode", "variants", "--only-b"]
        with pytest.raises(SystemExit, match="rope_halves=1 is for Qwen-Image's compiled real RoPE"):
            main([*common, "--variant", "rope_halves=1", "--out", str(tmp_path / "bad.json")])
        out = tmp_path / "h.json"
        assert main([*common, "--variant", "compile=1 rope_halves=1", "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())["rows"]
        assert row["rope"] == "halves" and row["rope_halves"].startswith("speed only") and row["ms_median"] > 0
    finally:
        rope.uninstall()  # this process's later tests see diffusers' own function


def test_rope_tables_variant_compiles_and_says_so(tmp_path, monkeypatch):
    """``rope_tables=1``: the compiled step runs with real RoPE tables (rope.install_tables), its row says
    "tables", and the hook is gone after the variant; without compile it is refused."""
    import os

    from bench.bench_step import main
    from qwen_zero_prior.training import rope

    pytest.importorskip("torch._inductor", reason="torch without inductor: compiled bench variants SKIPPED")
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    common = ["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
              "--warmup", "0", "--iters", "1", "--mode", "variants", "--only-b"]
    hooked = []
    real = rope.install_tables
    monkeypatch.setattr(rope, "install_tables", lambda tr: hooked.append(tr) or real(tr))
    try:
        with pytest.raises(SystemExit, match="rope_tables=1 is for Qwen-Image's compiled real RoPE"):
            main([*common, "--variant", "rope_tables=1", "--out", str(tmp_path / "bad.json")])
        out = tmp_path / "t.json"
        assert main([*common, "--variant", "compile=1 rope_tables=1", "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())["rows"]
        assert row["rope"] == "tables" and row["ms_median"] > 0
        (transformer,) = hooked
        assert not rope.tables_installed(transformer)
    finally:
        rope.uninstall()


@pytest.mark.parametrize(("key", "group", "name", "on"), [("pdl", "triton", "enable_pdl", True),
                                                         ("multi_kernel", "triton", "multi_kernel", 1)])
def test_inductor_switch_patches_inductor_for_its_variant_only(key, group, name, on, tmp_path, monkeypatch):
    """``pdl=1`` / ``multi_kernel=1`` (bench-only) set their inductor setting while that variant's trainer is built
    and run, say so in its row, and leave the setting as it was for the next variant and after the run."""
    import torch._inductor.config as inductor_config

    from bench import bench_step

    settings = getattr(inductor_config, group)
    if not hasattr(settings, name):
        pytest.skip(f"this torch's inductor has no {group}.{name}: the {key}=1 switch is refused there, SKIPPED")
    before = getattr(settings, name)
    assert before != on  # else the test could not tell the switch from the default
    seen = []
    real = bench_step.project_trainer

    def spy(*args, **kwargs):
        seen.append(getattr(settings, name))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_step, "project_trainer", spy)
    out = tmp_path / f"{key}.json"
    assert bench_step.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                            "--warmup", "0", "--iters", "1", "--mode", "variants", "--only-b", "--variant",
                            f"{key}=1", "--variant", f"{key}=0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert seen == [on, before] and rows[0][key] is True and key not in rows[1]
    assert getattr(settings, name) == before


def test_inductor_switch_refused_on_a_torch_without_the_setting(tmp_path, monkeypatch):
    """A switch whose inductor setting this torch lacks is refused, naming the setting, instead of running unset."""
    import torch._inductor.config as inductor_config

    from bench import bench_step

    monkeypatch.delattr(inductor_config.triton, "multi_kernel")
    with pytest.raises(SystemExit, match=r"multi_kernel=1 needs torch._inductor.config.triton.multi_kernel"):
        bench_step.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                         "--warmup", "0", "--iters", "1", "--mode", "variants", "--only-b", "--variant",
                         "multi_kernel=1", "--out", str(tmp_path / "x.json")])


def test_persistent_max_sets_the_compiled_steps_width_for_its_variant_only(tmp_path, monkeypatch):
    """``persistent_max=N``: the width up to which its variant's compiled step makes row reductions persistent
    (training/reductions.py, default 4096; 0 leaves inductor's own); each compiled row says the width in effect, and
    inductor's choice is given back after each variant."""
    pytest.importorskip("torch._inductor", reason="torch without inductor: compiled bench variants SKIPPED")
    from bench import bench_step
    from qwen_zero_prior.training import reductions, rope

    seen = []
    real = reductions.install
    monkeypatch.setattr(reductions, "install", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    out = tmp_path / "p.json"
    try:
        assert bench_step.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank",
                                "4", "--warmup", "0", "--iters", "1", "--mode", "variants", "--only-b", "--variant",
                                "compile=1 persistent_max=0", "--variant", "compile=1", "--variant", "compile=0",
                                "--out", str(out)]) == 0
    finally:
        rope.uninstall()  # the compiled variants routed diffusers' RoPE (training/rope.py): leave it as found
    rows = json.loads(out.read_text())["rows"]
    assert seen == [0, 4096]  # the compiled trainers' installs; the eager one installs nothing
    assert [r.get("persistent_max") for r in rows] == [0, 4096, None]
    assert reductions.installed() == 0


@pytest.mark.parametrize("value", ["wide", "-5", "1.5"])
def test_persistent_max_refuses_what_is_not_a_width(value, tmp_path):
    from bench.bench_step import main

    with pytest.raises(SystemExit, match=rf"persistent_max='{value}'; expected a positive whole number"):
        main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4", "--warmup",
              "0", "--iters", "1", "--mode", "variants", "--only-b", "--variant", f"persistent_max={value}",
              "--out", str(tmp_path / "bad.json")])


@pytest.mark.parametrize("key", ["fp8_text", "rope_halves", "fused_lora", "park_text", "combo_kernels", "lora_bf16",
                                 "real_rope", "layout_cache", "pdl", "rope_tables",
                                 "multi_kernel", "gelu_fused", "norm_rope", "lora_fp32_grad", "lora_addmm",
                                 "attn_bshd", "kernel_pieces"])
def test_bench_only_switches_refuse_garbage(key, tmp_path):
    """A bench-only on/off key takes 1 or 0: "maybe" is refused naming the key, not read as on."""
    from bench.bench_step import main

    with pytest.raises(SystemExit, match=rf"{key}='maybe'; expected 1 or 0"):
        main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4", "--warmup",
              "0", "--iters", "1", "--mode", "variants", "--only-b", "--variant", f"fp8_matmul=1 {key}=maybe",
              "--out", str(tmp_path / "bad.json")])


def test_rope_forms_agree_and_a_wrong_form_is_caught(tmp_path, monkeypatch):
    """bench/rope_forms.py: the interleaved forms (``flip``, ``tab``) equal training's real RoPE, ``halves`` equals
    it on permuted head dimensions (with the norm weights permuted too), each form gets a row; a form that rotates
    the wrong pairs makes the run fail instead of timing it."""
    from bench import rope_forms

    out = tmp_path / "rope.json"
    small = ["--device", "cpu", "--image-tokens", "32", "--text-tokens", "8", "--heads", "2", "--iters", "1",
             "--no-compile"]
    assert rope_forms.main([*small, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["max_diff_vs_real"] == {"flip": 0.0, "tab": 0.0, "halves": 0.0}
    assert [r["form"] for r in res["rows"]] == ["real", "flip", "tab", "halves"]
    assert all(r["forward_cpu_us"] > 0 and r["forward_backward_cpu_us"] > 0 for r in res["rows"])
    monkeypatch.setitem(rope_forms.FORMS, "flip", rope_forms.rope_halves)  # the halves rotation, unpermuted: wrong
    assert rope_forms.main([*small, "--out", str(tmp_path / "bad.json")]) == 1
    assert not (tmp_path / "bad.json").exists()
    monkeypatch.undo()
    pytest.importorskip("torch._inductor", reason="torch without inductor: the compiled rope_forms run SKIPPED")
    compiled = tmp_path / "compiled.json"  # the path a GPU run takes (compiled), one form to keep it short
    assert rope_forms.main([*small[:-1], "--forms", "tab", "--out", str(compiled)]) == 0
    assert [r["form"] for r in json.loads(compiled.read_text())["rows"]] == ["tab"]
    with pytest.raises(SystemExit):
        rope_forms.main([*small, "--forms", "tab,spiral"])


def test_gelu_quant_reference_forms_agree_and_a_wrong_derivative_is_caught(tmp_path, monkeypatch):
    """bench/gelu_quant.py: the written-out GELU derivative it compiles is autograd's (quantized, the same fp8 codes);
    a derivative off by a constant makes the run fail instead of timing it."""
    from bench import gelu_quant

    out = tmp_path / "gelu.json"
    assert gelu_quant.main(["--rows", "32", "--width", "768", "--device", "cpu", "--out", str(out)]) == 0
    check = json.loads(out.read_text())["checks"][0]
    assert check["form"] == "formula backward vs autograd" and check["max_diff_in_steps"] <= 1
    real = gelu_quant.gelu_derivative_formula
    monkeypatch.setattr(gelu_quant, "gelu_derivative_formula", lambda dg, h, b: real(dg, h, b) * 1.2)
    assert gelu_quant.main(["--rows", "32", "--width", "768", "--device", "cpu"]) == 1


def test_norm_rope_kernels_bench_checks_each_setting_against_the_default(tmp_path, monkeypatch):
    """bench/norm_rope_kernels.py on the CPU (the operators' reference code): a row per setting, each within one bf16
    rounding of the default launch's outputs and gradients, the module's settings given back; a setting whose
    numbers are off makes the run fail."""
    from bench import norm_rope_kernels
    from qwen_zero_prior.training import norm_rope

    small = ["--image-tokens", "16", "--text-tokens", "4", "--heads", "3", "--head-dim", "8", "--device", "cpu"]
    out = tmp_path / "nr.json"
    assert norm_rope_kernels.main([*small, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(r["exact"] and r["within_one_bf16_rounding"] for r in rows)
    assert (norm_rope.HEADS_PER_PROGRAM, norm_rope.NUM_WARPS) == (8, None)
    calls = {"n": 0}
    ops = norm_rope._ops()

    def off(grad, *rest):  # each call's gradients scaled more: no setting matches the default's any more
        calls["n"] += 1
        return tuple(g * (1 + calls["n"]) for g in ops[1](grad, *rest))

    monkeypatch.setattr(norm_rope, "_ops", lambda: (ops[0], off))
    assert norm_rope_kernels.main(small) == 1


def test_gelu_fused_off_takes_the_mlps_off_the_kernels_for_its_variant(tmp_path, monkeypatch):
    """``gelu_fused=0`` (bench-only): where the trainer routed the fp8 MLPs through gelu_fp8 (the default), that
    variant's steps run without it and its row says 0 blocks; the default row says how many are routed."""
    from bench import bench_step
    from qwen_zero_prior.training import gelu_fp8

    routed = {"n": 3}
    monkeypatch.setattr(bench_step, "_mlps_fused", lambda tr: routed["n"])
    calls = []
    monkeypatch.setattr(gelu_fp8, "uninstall", lambda tr: calls.append("uninstall") or routed.update(n=0))
    monkeypatch.setattr(gelu_fp8, "install", lambda tr: calls.append("install") or routed.update(n=3))
    out = tmp_path / "g.json"
    assert bench_step.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                            "--warmup", "0", "--iters", "1", "--mode", "variants", "--only-b", "--variant",
                            "fp8_matmul=1 gelu_fused=0", "--variant", "fp8_matmul=1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["gelu_fused_blocks"] for r in rows] == [0, 3]
    assert calls == ["uninstall", "install"]  # given back after its variant


def test_kernel_pieces_off_launches_session_35s_kernels_for_its_variant_only(tmp_path, monkeypatch):
    """``kernel_pieces=0`` (bench-only): that variant's steps launch the GELU and norm/RoPE kernels with padded rows
    (gelu_fp8.PIECES off, norm_rope.HEADS_PER_PROGRAM None), seen by its own steps and in its row; the next variant
    and the process after it get the defaults back."""
    from bench import bench_step
    from qwen_zero_prior.training import gelu_fp8, norm_rope

    seen = []
    real = bench_step.project_trainer

    def spy(*a, **kw):
        seen.append((gelu_fp8.PIECES, norm_rope.HEADS_PER_PROGRAM))
        return real(*a, **kw)

    monkeypatch.setattr(bench_step, "project_trainer", spy)
    out = tmp_path / "k.json"
    assert bench_step.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                            "--warmup", "0", "--iters", "1", "--mode", "variants", "--only-b", "--variant",
                            "fp8_matmul=1 kernel_pieces=0", "--variant", "fp8_matmul=1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel_pieces"] for r in rows] == [
        {"gelu_3_pieces": False, "norm_rope_heads_per_program": None},
        {"gelu_3_pieces": True, "norm_rope_heads_per_program": 8}]
    assert seen == [(False, None), (True, 8)]
    assert (gelu_fp8.PIECES, norm_rope.HEADS_PER_PROGRAM) == (True, 8)


def test_norm_rope_off_takes_the_attention_off_the_operator_for_its_variant(tmp_path, monkeypatch):
    """``norm_rope=0`` (bench-only): where the trainer routed the compiled attention through norm_rope's operator
    (the default with compile), that variant's steps run without it and its row says 0 blocks; the default row says
    how many are routed, and the routing is given back after the variant."""
    from bench import bench_step
    from qwen_zero_prior.training import norm_rope

    routed = {"n": 2}
    monkeypatch.setattr(norm_rope, "installed", lambda tr: routed["n"])
    calls = []
    monkeypatch.setattr(norm_rope, "uninstall", lambda tr: calls.append("uninstall") or routed.update(n=0))
    monkeypatch.setattr(norm_rope, "install", lambda tr: calls.append("install") or routed.update(n=2))
    from qwen_zero_prior.training import rope

    pytest.importorskip("torch._inductor", reason="torch without inductor: compiled bench variants SKIPPED")
    out = tmp_path / "n.json"
    try:
        assert bench_step.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank",
                                "4", "--warmup", "0", "--iters", "1", "--mode", "variants", "--only-b", "--variant",
                                "compile=1 norm_rope=0", "--variant", "compile=1", "--out", str(out)]) == 0
    finally:
        rope.uninstall()  # the compiled variants routed diffusers' RoPE (training/rope.py): leave it as found
    rows = json.loads(out.read_text())["rows"]
    assert [r["norm_rope_blocks"] for r in rows] == [0, 2]
    # each compiled trainer installs it; the first variant takes it off and gives it back after its steps
    assert calls == ["install", "uninstall", "install", "install"]


def test_kernel_summary_sorts_kernels_by_kind_per_step():
    """bench_step.kernel_summary: per-step kernel counts and times by kind from the profiler's averages; host-side
    ops (no device time of their own) are not counted as kernels."""
    from types import SimpleNamespace as E

    from bench.bench_step import kernel_summary

    events = [E(key="nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT", self_device_time_total=2000.0,
                count=24),
              E(key="cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma", self_device_time_total=1000.0, count=4),
              E(key="triton_poi_fused__to_copy_3", self_device_time_total=30.0, count=10),
              E(key="triton_poi_fused_add_7", self_device_time_total=50.0, count=6),
              E(key="void cublasLt::splitKreduce_kernel<32, 16>", self_device_time_total=8.0, count=4),
              E(key="aten::mm", self_device_time_total=0.0, count=100)]
    s = kernel_summary(events, steps=2)
    assert s["kernels_per_step"] == 24.0 and s["busy_ms"] == 1.54
    assert list(s["by_kind"]) == ["fp8 matmul", "attention", "inductor pointwise", "split-K reduce"]
    assert s["by_kind"]["fp8 matmul"] == {"ms": 1.0, "calls": 12.0}
    assert s["by_kind"]["inductor pointwise"] == {"ms": 0.04, "calls": 8.0}
    assert s["most_launched"][0]["calls"] == 12.0 and "aten::mm" not in {r["name"] for r in s["most_launched"]}


def test_fp8_gemm_checks_its_shapes_on_the_cpu(tmp_path):
    """bench/fp8_gemm.py without CUDA: its operands are laid out as CUDA's row-scaled ``_scaled_mm`` takes them
    (fp8 both, the first row-major, the second column-major, float32 scales [M, 1] and [1, N]), one row a shape, and
    --rows that _scaled_mm cannot take is refused."""
    from bench import fp8_gemm

    out = tmp_path / "g.json"
    assert fp8_gemm.main(["--rows", "32", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["k"], r["n"]) for r in rows] == [(k, n) for _, k, n in fp8_gemm.SHAPES]
    aq, sa, bq, sb = fp8_gemm.operands(32, 64, 48, torch.device("cpu"))
    assert aq.dtype == bq.dtype == torch.float8_e4m3fn and aq.stride() == (64, 1) and bq.stride() == (1, 64)
    assert sa.shape == (32, 1) and sb.shape == (1, 48) and sa.dtype == sb.dtype == torch.float32
    with pytest.raises(SystemExit, match="multiple of 16"):
        fp8_gemm.main(["--rows", "30", "--device", "cpu"])


def test_fp8_fast_accum_variants_set_and_report_each_layers_accumulation(tmp_path):
    """The model settings ``fp8_fast_accum`` / ``fp8_fast_accum_backward`` reach every fp8 layer of their variant, and
    each row reports what the layers ran with."""
    from bench import bench_step

    out = tmp_path / "f.json"
    base = ["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4", "--warmup", "0",
            "--iters", "1", "--mode", "variants", "--only-b"]
    got = []
    for spec in ("fp8_matmul=1", "fp8_matmul=1 fp8_fast_accum=0", "fp8_matmul=1 fp8_fast_accum_backward=0"):
        # one bench each: variants in one process share the pipe, converted by the first (the GPU runs --isolate)
        assert bench_step.main([*base, "--variant", spec, "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())["rows"]
        got.append((row["fp8_fast_accum"], row["fp8_fast_accum_backward"]))
    assert got == [(True, True), (False, True), (True, False)]


@pytest.mark.parametrize("key, spied, default", [("lora_fp32_grad", "lora_product", False),
                                                 ("lora_addmm", "lora_delta", True)])
def test_compiled_lora_switch_changes_the_products_for_its_variant_only(key, spied, default, tmp_path, monkeypatch):
    """The bench-only LoRA switches of the compiled step, each for its variant only (a tensor counter spies on the
    function it routes the products through): ``lora_fp32_grad=1`` runs them through ``lora_product`` (off by
    default); ``lora_addmm=0`` stops adding each B product into its base output through ``lora_delta`` (on by
    default). The row says which ran, the next variant is back to the default, and a switch without compile is
    refused, as ``attn_bshd``'s."""
    pytest.importorskip("torch._inductor", reason="torch without inductor: compiled bench variants SKIPPED")
    from bench import bench_step
    from qwen_zero_prior.training import fp8, lora_shared, rope

    # a tensor counter: dynamo keeps its in-place add in the graph (a Python list's append would be a guard on its
    # length, recompiling every step)
    calls = torch.zeros(())
    real = getattr(lora_shared, spied)
    monkeypatch.setattr(lora_shared, spied, lambda *a: (calls.add_(1), real(*a))[1])
    base = ["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4", "--warmup", "0",
            "--iters", "1", "--mode", "variants", "--only-b"]
    out = tmp_path / "l.json"
    flipped = int(not default)
    got = []
    try:
        for spec in (f"compile=1 {key}={flipped}", "compile=1"):
            calls.zero_()
            assert bench_step.main([*base, "--variant", spec, "--out", str(out)]) == 0
            (row,) = json.loads(out.read_text())["rows"]
            got.append((row[key], calls.item() > 0))
    finally:
        rope.uninstall()
    assert got == [(not default, not default), (default, default)]
    assert lora_shared.FLOAT32_WEIGHT_GRADS is False
    assert lora_shared.FUSED_DELTA is True and fp8.BIAS_IN_PRODUCT is True
    with pytest.raises(SystemExit, match=f"{key}={flipped} changes the compiled step's LoRA products; add compile=1"):
        bench_step.main([*base, "--variant", f"{key}={flipped}"])
    with pytest.raises(SystemExit, match="attn_bshd=0 changes the compiled step's attention call; add compile=1"):
        bench_step.main([*base, "--variant", "attn_bshd=0"])


def test_lora_grad_forms_agree_on_the_cpu():
    """bench/lora_grad.py: the hand-split form is the same gradient as today's (within bf16 rounding), CUDA's
    float32-out product is reported as unavailable off CUDA instead of failing, and an unknown form is refused."""
    from bench import lora_grad

    rows = lora_grad.run(torch.device("cpu"), reps=1)
    by_form = {}
    for r in rows:
        by_form.setdefault(r["form"], []).append(r)
    assert all(r["max_rel_err"] < 1e-2 and r["dtype"] == "float32" for f in ("bf16+cast", "split_bmm")
               for r in by_form[f])
    assert len(by_form["bf16+cast"]) == len(lora_grad.SHAPES)
    assert all("error" in r or r["max_rel_err"] < 1e-5 for r in by_form["mm_fp32_out"])
    with pytest.raises(ValueError, match="unknown form 'fp64'"):
        lora_grad.grad("fp64", torch.ones(4, 2), torch.ones(4, 3))


def test_fp8_grad_quality_compares_the_same_training_sample_on_the_cpu(tmp_path):
    """bench/fp8_grad_quality.py on the tiny model: the three variants see the same LoRA, token and sample (the fp8
    losses differ from bf16's by fp8's rounding only), every group of gradients is compared, fp8's gradients differ
    from bf16's, and off CUDA (no fast accumulation there) the fast-backward variant is the fp8 one exactly."""
    from bench import fp8_grad_quality

    out = tmp_path / "q.json"
    assert fp8_grad_quality.main(["--size", "tiny", "--device", "cpu", "--res", "64", "--seeds", "2",
                                  "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["seed"] for r in res["rows"]] == [0, 1]
    for r in res["rows"]:
        loss = r["loss"]
        assert loss["fp8"] == loss["fp8_fast_backward"]
        assert loss["fp8"] != loss["bf16"] and abs(loss["fp8"] - loss["bf16"]) < 0.05 * loss["bf16"]
        assert set(r["fp8_vs_bf16"]) == set(fp8_grad_quality.GROUPS)
        for group, m in r["fp8_vs_bf16"].items():
            assert 0 < m["rel_err"] < 0.5 and m["cosine"] > 0.9, (group, m)
        assert all(m["rel_err"] == 0 for m in r["fast_vs_fp8"].values())
    assert {g: s["ratio_max"] for g, s in res["summary"].items()} == {g: 1.0 for g in fp8_grad_quality.GROUPS}
    with pytest.raises(SystemExit):
        fp8_grad_quality.main(["--size", "tiny", "--device", "cpu", "--seeds", "0"])


def test_thin_gemm_forms_agree_on_the_cpu(tmp_path, monkeypatch):
    """bench/thin_gemm.py: every split over K is the same product as the step's (within bf16 rounding), for the
    forward (the weight read transposed) and the input gradient (the weight as it lies), and reads the weight through
    views; a K the split does not divide and an unknown form are refused. The bench leaves the environment as it
    found it, and its JSON says the workspace setting."""
    from bench import thin_gemm
    from qwen_zero_prior.training import cublas

    for key in cublas.NO_WORKSPACE:
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)
    monkeypatch.setattr(thin_gemm, "SHAPES", (("fwd", 8, 512, 96, "fwd"), ("bwd", 8, 1024, 64, "bwd")))
    out = tmp_path / "t.json"
    assert thin_gemm.main(["--device", "cpu", "--workspace", "default", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["workspace"] == "PyTorch's default"
    forms = [(r["shape"], r["form"]) for r in res["rows"]]
    assert forms == [("fwd", "mm"), ("fwd", "split2"), ("bwd", "mm"), ("bwd", "split2"), ("bwd", "split4")]
    assert all(r["max_rel_err"] < 2e-2 for r in res["rows"])
    x, w = thin_gemm.operands(4, 512, 32, "fwd", "cpu")
    assert torch.equal(thin_gemm.product("split2", x, w, "fwd"), thin_gemm.product("split2", x, w.clone(), "fwd"))
    with pytest.raises(ValueError, match="K=512 is not a multiple of 3"):
        thin_gemm.product("split3", x, w, "fwd")
    with pytest.raises(ValueError, match="unknown form 'mv'"):
        thin_gemm.product("mv", x, w, "fwd")
