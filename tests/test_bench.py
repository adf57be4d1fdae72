"""CPU smoke test of the GPU benchmark's code paths (tiny models; the numbers mean nothing here)."""

import json


def test_bench_main_and_capped_paths(tmp_path):
    from bench.bench_step import main

    out = tmp_path / "r.json"
    assert main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                 "--warmup", "1", "--iters", "1", "--out", str(out)]) == 0
    rows = {r["name"].split(" ")[0]: r for r in json.loads(out.read_text())["rows"]}
    assert {"a-diffusers+peft", "b-project", "b-text-encoder", "c-inference"} <= set(rows)
    assert all(r["ms_median"] > 0 for r in rows.values())
    assert rows["b-project"]["tflop"] is not None and rows["a-diffusers+peft"]["tflop"] is not None
    out2 = tmp_path / "c.json"
    assert main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--res", "64", "--rank", "4",
                 "--warmup", "1", "--iters", "1", "--mode", "capped", "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["rows"][0]["ms_median"] > 0
