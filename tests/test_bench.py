"""CPU smoke test of the GPU benchmark's code paths (tiny models; the numbers mean nothing here)."""

import json


def test_bench_main_and_capped_paths(tmp_path):
    from bench.bench_step import main

    out = tmp_path / "r.json"
    assert main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                 "--warmup", "1", "--iters", "1", "--fp8", "--out", str(out)]) == 0
    all_rows = json.loads(out.read_text())["rows"]
    rows = {r["name"].split(" ")[0]: r for r in all_rows if "fp8" not in r["name"]}
    assert {"a-diffusers+peft", "b-project", "b-text-encoder", "c-inference"} <= set(rows)
    assert all(r["ms_median"] > 0 for r in all_rows)
    assert rows["b-project"]["tflop"] is not None and rows["a-diffusers+peft"]["tflop"] is not None
    te = [r for r in all_rows if r["name"].startswith("b-text-encoder")]
    assert len(te) == 3 and all(r["tflop"] is not None for r in te)
    fp8 = [r for r in all_rows if "fp8 matmuls" in r["name"]]
    assert len(fp8) == 1 and fp8[0]["tflop"] == rows["b-project"]["tflop"]  # bf16-equivalent FLOPs
    out2 = tmp_path / "c.json"
    assert main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                 "--warmup", "1", "--iters", "1", "--mode", "capped", "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["rows"][0]["ms_median"] > 0
