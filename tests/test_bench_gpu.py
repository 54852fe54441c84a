"""benchmarks/bench_gpu.py in its CPU mode at the tiny configs, so the device benchmark cannot rot: every section runs,
and what it measures besides time is checked (our Flux against diffusers' on the same weights, the streamed and
offloaded images against the resident one, fp8's maps against bf16's)."""

import importlib.util
import json
from pathlib import Path

from mmdit.memory import MEMORY_MODES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_cpu_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--tiny", "--device", "cpu", "--repeats", "1", "--generate-repeats", "1",
                          "--out", str(tmp_path)])  # fmt: skip
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "| fp8 |" in (tmp_path / "results.md").read_text()
    # diffusers' transformer holds views of our weights (converted by the loader's table, run backwards): float32
    # round-off only, the tolerance of tests/test_mmdit.py's comparison
    assert set(results["step"]) == {"32", "64"}
    for r in results["step"].values():
        assert r["agreement"]["max_abs"] < 1e-4 and r["agreement"]["ref_max_abs"] > 0.1
        assert r["ours"]["seconds"] > 0 and r["diffusers"]["seconds"] > 0
    assert list(results["concepts"]) == ["plain", "1 concepts, output", "5 concepts, output", "10 concepts, output",
                                         "10 concepts, keep_grid", "explain (stop after double)"]  # fmt: skip
    modes = results["modes"]
    assert list(modes) == list(MEMORY_MODES)
    for mode in ("offload", "stream"):  # the same kernels on the same weights
        assert modes[mode]["image_equal_to_first"] and modes[mode]["maps"]["max_abs"] == 0.0
    assert modes["fp8"]["maps"]["correlation"] > 0.99
    # SD3.5: diffusers' SD3 transformer on views of our weights (its own single-file converter): round-off only
    for r in results["sd3"]["step"].values():
        assert r["agreement"]["max_abs"] < 1e-4 and r["agreement"]["ref_max_abs"] > 0.1
    assert list(results["sd3"]["concepts"]) == ["plain", "1 concepts, output", "5 concepts, output",
                                                "10 concepts, output", "10 concepts, keep_grid"]  # fmt: skip
