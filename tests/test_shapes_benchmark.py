"""The shapes benchmark end to end on a tiny random model: both protocols through the segmentation harness, and the
trivial baselines against values computed here from the scenes' own masks."""

import json

import numpy as np
import pytest

from shapes import benchmark
from shapes.scenes import SceneConfig, held_out_seeds, make_scene
from tiny import write_model_folder


def test_benchmark_runs_and_baselines_are_right(tmp_path, capsys):
    write_model_folder(tmp_path / "model")
    code = benchmark.main(["--model", str(tmp_path / "model"), "--scenes", "3", "--size", "32", "--t", "0.5",
                           "--out", str(tmp_path / "bench")])  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert set(summary) == {"shapes-multi", "shapes-single"}
    # 4 spaces x 2 softmax x (all + 3 single layers) x 1 noise level
    assert len(summary["shapes-multi"]["methods"]) == 32 and "| output softmax" in capsys.readouterr().out

    # "all background" in the multi-class protocol: accuracy = background pixels / all pixels, mIoU = that over the
    # classes with a non-empty union (background, and every shape: predicted nowhere, present somewhere)
    scenes = [make_scene(seed, SceneConfig(size=32)) for seed in held_out_seeds(3)]
    background = sum(s.masks["background"].sum() for s in scenes) / (3 * 32 * 32)
    kinds = {kind for s in scenes for _, kind in s.shapes}
    multi = summary["shapes-multi"]["baselines"]["all background"]
    assert multi["acc"] == pytest.approx(background)
    assert multi["miou"] == pytest.approx(background / (1 + len(kinds)))
    # the binary protocol has one item per (scene, shape): all background gets each shape's IoU 0
    single = summary["shapes-single"]["baselines"]["all background"]
    per_item = [1 - s.masks[kind].mean() for s in scenes for _, kind in s.shapes]
    assert single["acc"] == pytest.approx(np.mean(per_item))


def test_layers_all_stays_every_block_when_the_recipe_names_its_own(tmp_path):
    """The harness's "layers=all" rows average every block even for a model whose recipe.json has a layer default."""
    write_model_folder(tmp_path / "model")
    argv = ["--scenes", "2", "--size", "32", "--t", "0.5"]
    assert benchmark.main(["--model", str(tmp_path / "model"), *argv, "--out", str(tmp_path / "plain")]) == 0
    recipe_file = tmp_path / "model" / "recipe.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    recipe_file.write_text(json.dumps({**recipe, "layers": [0]}))
    assert benchmark.main(["--model", str(tmp_path / "model"), *argv, "--out", str(tmp_path / "own")]) == 0
    for name in ("shapes-multi", "shapes-single"):
        plain, own = (
            json.loads((tmp_path / d / "summary.json").read_text())[name]["methods"] for d in ("plain", "own")
        )
        assert plain == own
