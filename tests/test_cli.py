"""The command line: every documented file is written, and each kind of bad input gets a one-line error and exit 2.

The model is a tiny random one written in this project's own single-file layout (safetensors + a sidecar config), so
the command loads it through the same `weights` code as any other folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import concept_attention
import outputs
import saliency
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
        capsys, "explain", "--model", model_dir, "--image", broken, "--concepts", "cat", "--out", tmp_path / "o"
    )
    assert code == 2 and "broken.png" in err and err.count("\n") == 1
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", tmp_path / "missing.png", "--concepts",
                       "cat", "--out", tmp_path / "o")  # fmt: skip
    assert code == 2 and "missing.png" in err
    assert not (tmp_path / "o").exists()


def test_explain_picks_a_size_says_so_and_records_it(model_dir, tmp_path, capsys):
    odd = tmp_path / "odd.png"
    Image.new("RGB", (1000, 333), "orange").save(odd)  # neither side a multiple of 16
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", odd, "--concepts", "cat", "sky", "--out",
                       tmp_path / "out")  # fmt: skip
    assert code == 0, err
    assert "333x1000" in err and "336x1008" in err and "--size" in err
    record = check_outputs(tmp_path / "out", ["cat", "sky"], (336, 1008))
    assert record["input_size"] == [333, 1000] and record["size_rule"].startswith("auto")
    assert odd.is_file()


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the weights fails the test: everything below must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the arguments were checked")

    monkeypatch.setattr(concept_attention.ConceptAttentionPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layers", "3"], "--layers [3]: this model has 3 double blocks"),
        (["--samples", "2", "--steps-used", "2"], "only 2 noise samples"),
        (["--t", "1.5"], "t = 1.5"),
        (["--samples", "0"], "--samples = 0"),
        (["--seed", "-1"], "seed = -1"),
        (["--seed", str(2**63 - 1), "--samples", "2"], "must lie in 0 .. 2^63 - 1"),
        (["--dtype", "float16"], "float16"),
        (["--device", "gpu"], "is not a device"),
        (["--size", "8192"], "size 8192x8192 needs about"),
        (["--size", "40"], "not a multiple of 16"),
        (["--out", ""], "output folder name is empty"),
    ],
)
def test_explain_arguments_are_checked_before_loading(model_dir, tmp_path, capsys, no_loading, argv, message):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(image)
    if "--out" not in argv:
        argv = [*argv, "--out", tmp_path / "out"]
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", image, "--concepts", "cat", "sky", *argv)
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_absent_devices_are_one_line_errors(model_dir, tmp_path, capsys, no_loading, device):
    present = torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()
    if present:
        pytest.skip(f"this machine has {device}")
    code, _, err = run(capsys, "generate", "--model", model_dir, "--prompt", "a cat", "--concepts", "cat", "sky",
                       "--device", device, "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and f"device {device}" in err and err.count("\n") == 1


def test_generate_bounds_num_steps_before_loading(model_dir, tmp_path, capsys, no_loading):
    code, _, err = run(capsys, "generate", "--model", model_dir, "--prompt", "a cat", "--concepts", "cat", "sky",
                       "--num-steps", "1000000000000", "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and "--num-steps = 1000000000000: give a number from 1 to 1000" in err


def test_output_folder_is_checked_before_loading(model_dir, tmp_path, capsys, no_loading):
    result = tmp_path / "result"
    result.mkdir()
    image = result / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", image, "--concepts", "cat", "sky", "--out",
                       result)  # fmt: skip
    assert code == 2 and "lies inside the output folder" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", image, "--concepts", "cat", "sky", "--out",
                       tmp_path / "file")  # fmt: skip
    assert code == 2 and "is a file" in err
    assert image.is_file() and (tmp_path / "file").read_text() == "x"


def test_rerun_replaces_the_earlier_result_and_warns_on_text(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--model", model_dir, "--prompt", "a cat", "--size", "32", "--num-steps", "1", "--out", out]
    code, stdout, err = run(capsys, *argv, "--concepts", "cat", "sky", "grass")
    assert code == 0 and stdout.startswith("wrote") and "warning" not in err
    code, stdout, err = run(capsys, *argv, "--concepts", "dog")
    assert code == 0 and stdout.startswith("replaced the earlier result in")
    assert "warning: a single concept ('dog')" in err and "--no-softmax" in err
    check_outputs(out, ["dog"], (32, 32))  # the first run's three maps are gone
    code, stdout, err = run(capsys, *argv, "--concepts", "cat", "zzz", "--prompt", "a cat " * 20)
    assert code == 0 and "only the first 16" in err and "'zzz'" in err and err.count("warning:") == 2


def test_no_concepts_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        concept_attention.main(["generate", "--prompt", "a cat", "--concepts", "--out", "x"])
    assert exit_info.value.code == 2 and "--concepts" in capsys.readouterr().err


def test_a_model_recipe_sets_the_default_sampling_steps_and_schedule(model_dir, tmp_path, capsys):
    # a folder without recipe.json samples as schnell does: 4 unshifted steps
    argv = ["generate", "--prompt", "a cat", "--concepts", "cat", "sky", "--size", "32"]
    code, _, err = run(capsys, *argv, "--model", model_dir, "--out", tmp_path / "plain")
    assert code == 0, err
    record = json.loads((tmp_path / "plain" / "settings.json").read_text())
    assert record["num_steps"] == 4 and record["timesteps"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    # the same model with a recipe asking for 6 shifted steps: its schedule is dev's shifted one, not schnell's
    own = tmp_path / "own"
    own.mkdir()
    for f in model_dir.iterdir():
        (own / f.name).symlink_to(f)
    (own / "recipe.json").write_text(json.dumps({"size": 32, "sample_steps": 6, "sample_shift": True}))
    code, _, err = run(capsys, *argv, "--model", own, "--out", tmp_path / "shifted")
    assert code == 0, err
    record = json.loads((tmp_path / "shifted" / "settings.json").read_text())
    assert record["num_steps"] == 6 and len(record["timesteps"]) == 7
    assert record["timesteps"][3] > 0.5  # shifted towards noise: the midpoint of 6 steps lies above 0.5
    code, _, err = run(capsys, *argv, "--model", own, "--num-steps", "3", "--out", tmp_path / "three")
    assert code == 0, err
    assert json.loads((tmp_path / "three" / "settings.json").read_text())["num_steps"] == 3  # the user's choice wins


# ---- issue 24: interruptions, what settings.json records, recipe and preset messages ---------------------------------
ROOT = Path(concept_attention.__file__).resolve().parent


def start_long_run(out: Path) -> subprocess.Popen:
    """The built-in model sampling 1000 steps into `out`, in its own process; returns once its temporary folder
    exists (the run is then computing)."""
    command = [sys.executable, str(ROOT / "concept_attention.py"), "generate", "--model", "shapes", "--prompt", "x",
               "--concepts", "circle", "background", "--num-steps", "1000", "--size", "32",
               "--out", str(out)]  # fmt: skip
    # a suite started in the background (`make test &`) ignores SIGINT, and so would the run: give it the default back
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while not list(out.parent.glob(f".{out.name}.*.partial")):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # into the sampling loop
    return process


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_so_in_one_line_and_leaves_nothing(tmp_path, signum, code):
    process = start_long_run(tmp_path / "out")
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    last = err.strip().splitlines()[-1]  # the progress bar comes before it
    assert process.returncode == code and last.startswith("error: interrupted") and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no result, no temporary folder


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    process = start_long_run(tmp_path / "out")
    process.kill()  # SIGKILL: nothing of the run can clean up
    process.communicate(timeout=60)
    assert len(list(tmp_path.glob(".out.*.partial"))) == 1
    alive = tmp_path / f".out.{outputs.HOST}-{os.getpid()}.abcdefgh.partial"  # a running process's: kept
    alive.mkdir()
    folder = outputs.OutputFolder(tmp_path / "out", ["cat"])
    folder.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]


def test_settings_record_the_device_dtype_memory_and_input(model_dir, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(image)
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", image, "--concepts", "cat", "sky",
                       "--device", "cpu", "--memory", "offload", "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert record["device"] == "cpu" and record["dtype"] == "float32" and record["memory"] == "offload"
    assert record["image"] == str(image.resolve())


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("{not json", "is not valid JSON"),
        ("[128]", "holds a list"),
        ('{"size": "128"}', "size = '128'"),
        ('{"size": 100}', "size = 100"),
        ('{"sample_steps": 0}', "sample_steps = 0"),
        ('{"sample_steps": 4.5}', "sample_steps = 4.5"),
        ('{"sample_shift": "yes"}', "sample_shift = 'yes'"),
    ],
)
def test_a_damaged_recipe_is_an_error_that_names_it(model_dir, tmp_path, capsys, no_loading, recipe, message):
    own = tmp_path / "own"
    own.mkdir()
    for f in model_dir.iterdir():
        (own / f.name).symlink_to(f)
    (own / "recipe.json").write_text(recipe)
    code, _, err = run(capsys, "generate", "--model", own, "--prompt", "a cat", "--concepts", "cat", "sky", "--out",
                       tmp_path / "out")  # fmt: skip
    assert code == 2 and str(own / "recipe.json") in err and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_presets_choice_that_does_not_fit_names_the_preset(model_dir, tmp_path, capsys, no_loading):
    argv = ["generate", "--model", model_dir, "--prompt", "a cat", "--concepts", "cat", "sky", "--out", tmp_path / "o"]
    code, _, err = run(capsys, *argv, "--preset", "official")
    assert code == 2 and "the preset 'official' averages blocks [15, 16, 17, 18]" in err and "--layers [" not in err
    code, _, err = run(capsys, *argv, "--preset", "official-demo", "--layers", "0", "--num-steps", "2")
    assert code == 2 and "the preset 'official-demo' uses steps [2, 3]" in err and "--steps-used [" not in err


def test_a_one_token_map_gives_an_empty_mask_not_scattered_pixels():
    result = saliency.ConceptResult(Image.new("RGB", (16, 16)), ["cat", "sky"], torch.tensor([[[0.3]], [[0.7]]]),
                                    saliency.Settings(), {})  # fmt: skip
    assert not result.masks("mean").any()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-steps", "x"], "argument --num-steps: invalid int value: 'x'"),
        (["--layers", "-3"], "argument --layers: -3 is below 0"),
        (["--steps-used", "-1"], "argument --steps-used: -1 is below 0"),
        (["--space", "rainbow"], "argument --space: invalid choice: 'rainbow'"),
    ],
)
def test_usage_errors_are_one_line_too(model_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        concept_attention.main(["generate", "--model", str(model_dir), "--prompt", "a cat", "--concepts", "cat", "sky",
                                "--out", str(tmp_path / "out"), *argv])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_too_many_samples_name_the_samples_not_only_the_seed(model_dir, tmp_path, capsys, no_loading):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(image)
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", image, "--concepts", "cat", "sky",
                       "--samples", str(10**20), "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and "--samples = 100000000000000000000: give a number from 1 to 1000" in err, err


def test_frames_are_refused_for_an_image_model(tmp_path, capsys):
    """--frames is CogVideoX's; given to an image model it is an error (it was silently ignored), before any load."""
    code, _, err = run(capsys, "generate", "--model", "shapes", "--prompt", "x", "--concepts", "circle", "background",
                       "--frames", "5", "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and "--frames is for CogVideoX (video); shapes is an image model (flux)" in err
    assert not (tmp_path / "out").exists()


def test_samples_are_bounded_before_anything_loads(tmp_path, capsys):
    """explain --samples 10000000000 ran (for ever) where 1000 noise draws are already far past any use."""
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    code, _, err = run(capsys, "explain", "--model", "shapes", "--image", tmp_path / "in.png", "--concepts", "circle",
                       "background", "--samples", "10000000000", "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and "--samples = 10000000000: give a number from 1 to 1000" in err and "sample/s" not in err
    from segmentation.protocols import PROTOCOLS

    with pytest.raises(ValueError, match="give 1 to 1000 noise samples"):
        PROTOCOLS["paper-imagenet"].with_overrides(num_samples=1001)
