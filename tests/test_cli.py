"""The command line: every documented file is written, and each kind of bad input gets a one-line error and exit 2.

The model is a tiny random one written in this project's own single-file layout (safetensors + a sidecar config), so
the command loads it through the same `weights` code as any other folder."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import concept_attention
from tiny import write_model_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    write_model_folder(folder)
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    code = concept_attention.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_outputs(out, concepts, size, space="output"):
    h, w = size
    assert Image.open(out / "image.png").size == (w, h)
    assert Image.open(out / "overlay.png").size[0] > w  # image + one overlay per concept, side by side
    assert len(list((out / "heatmaps").glob("*.png"))) == len(concepts)
    assert len(list((out / "masks").glob("*.png"))) == len(concepts)
    maps = load_file(out / "maps.safetensors")["maps"]
    assert maps.shape == (len(concepts), h // 16, w // 16) and torch.isfinite(maps).all()
    record = json.loads((out / "settings.json").read_text())
    assert record["concepts"] == concepts and record["settings"]["space"] == space
    return record


def test_generate_and_explain_write_every_file(model_dir, tmp_path, capsys):
    concepts = ["cat", "sky", "grass"]
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", "a cat", "--concepts", *concepts,
                         "--size", "32x48", "--num-steps", "2", "--out", tmp_path / "gen", "--grid")  # fmt: skip
    assert code == 0, err
    record = check_outputs(tmp_path / "gen", concepts, (32, 48))
    assert record["mode"] == "generate" and record["num_steps"] == 2
    assert "grid.output+softmax" in load_file(tmp_path / "gen" / "maps.safetensors")

    code, out, err = run(capsys, "explain", "--model", model_dir, "--image", tmp_path / "gen" / "image.png",
                         "--concepts", *concepts, "--samples", "2", "--space", "attention", "--layers", "1", "2",
                         "--out", tmp_path / "exp")  # fmt: skip
    assert code == 0, err
    record = check_outputs(tmp_path / "exp", concepts, (32, 48), space="attention")
    assert record["num_samples"] == 2 and record["settings"]["space"] == "attention"
    assert record["settings"]["layers"] == [1, 2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--concepts", "cat", "cat"], "duplicate concept 'cat'"),
        (["--concepts", "cat", "--size", "40"], "not a multiple of 16"),
        (["--concepts", "cat", "--layers", "9"], "double blocks"),
        (["--concepts", "cat", "--model", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_bad_generate_input(model_dir, tmp_path, capsys, argv, message):
    if "--model" not in argv:
        argv = [*argv, "--model", model_dir]
    code, _, err = run(capsys, "generate", "--prompt", "a cat", "--size", "32", "--out", tmp_path, *argv)
    print(err)
    assert code == 2 and message in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_bad_explain_input(model_dir, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    code, _, err = run(
        capsys, "explain", "--model", model_dir, "--image", broken, "--concepts", "cat", "--out", tmp_path
    )
    assert code == 2 and "broken.png" in err and err.count("\n") == 1
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", tmp_path / "missing.png", "--concepts",
                       "cat", "--out", tmp_path)  # fmt: skip
    assert code == 2 and "missing.png" in err
    odd = tmp_path / "odd.png"
    Image.new("RGB", (40, 32)).save(odd)
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", odd, "--concepts", "cat", "--out", tmp_path)
    assert code == 2 and "width 40" in err and "--size" in err


def test_no_concepts_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        concept_attention.main(["generate", "--prompt", "a cat", "--concepts", "--out", "x"])
    assert exit_info.value.code == 2 and "--concepts" in capsys.readouterr().err
