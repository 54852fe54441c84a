"""Issue 24: every file of a model folder missing, empty, damaged or of the wrong type is a one-line error that names
the file and says what to do (never a traceback, never `hf download --local-dir` into the user's folder), found before
the model runs; NaN weights at the run's first check, before anything is written. The folder is a copy of the built-in
shapes model."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import concept_attention

BUILTIN = concept_attention.BUILTIN_MODEL


@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN, folder)
    return folder


def generate(capsys, model, out) -> tuple[int, str]:
    argv = ["generate", "--model", str(model), "--prompt", "a red circle", "--concepts", "circle", "background",
            "--num-steps", "1", "--size", "32", "--out", str(out)]  # fmt: skip
    code = concept_attention.main(argv)
    return code, capsys.readouterr().err


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


CASES = {
    "hidden_size as a string": ("flux_config.json", lambda p: edit_json(p, lambda c: {**c, "hidden_size": "128"}),
                                "hidden_size = '128' is not a whole number"),
    "a list as the config": ("t5_config.json", lambda p: p.write_text("[1, 2]"), "is a JSON list"),
    "axes_dim of strings": ("flux_config.json", lambda p: edit_json(p, lambda c: {**c, "axes_dim": ["8", "12", "12"]}),
                            "axes_dim"),
    "a garbage spiece.model": ("tokenizer_2/spiece.model", lambda p: p.write_text("garbage"),
                               "is not a SentencePiece model"),
    "an empty spiece.model": ("tokenizer_2/spiece.model", lambda p: p.write_bytes(b""),
                              "is not a SentencePiece model"),
    "a damaged tokenizer_config.json": ("tokenizer_2/tokenizer_config.json", lambda p: p.write_text("{bad"),
                                        "tokenizer_config.json"),
    "model_max_length a string": ("tokenizer_2/tokenizer_config.json",
                                  lambda p: p.write_text('{"model_max_length": "x"}'), "model_max_length"),
    "a list as tokenizer_config.json": ("tokenizer_2/tokenizer_config.json", lambda p: p.write_text("[]"),
                                        "tokenizer_config.json"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_model_file_is_one_line_that_names_it(model, tmp_path, capsys, case):
    name, damage, message = CASES[case]
    damage(model / name)
    code, err = generate(capsys, model, tmp_path / "out")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and Path(name).name in err, err
    assert not (tmp_path / "out").exists()


def damage_tensor(file: Path, name: str, value: float) -> None:
    state = load_file(file)
    state[name] = state[name].clone()
    state[name].view(-1)[7] = value
    save_file(state, file)


def explain(capsys, model, out, image) -> tuple[int, str]:
    argv = ["explain", "--model", str(model), "--image", str(image), "--concepts", "circle", "background",
            "--size", "32", "--out", str(out)]  # fmt: skip
    code = concept_attention.main(argv)
    return code, capsys.readouterr().err


# the tensor, and which check meets it first: the first step's prediction (transformer, T5), the decoded image or,
# in explain, the maps (the autoencoder's encoder)
NAN_CASES = {
    "transformer": ("flux.safetensors", "double_blocks.1.img_attn.qkv.weight", "generate"),
    "T5": ("t5.safetensors", "encoder.final_layer_norm.weight", "generate"),
    "decoder": ("ae.safetensors", "decoder.conv_out.weight", "generate"),
    "encoder": ("ae.safetensors", "encoder.conv_in.weight", "explain"),
}


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_weights_are_named_by_file_and_tensor_before_anything_is_written(model, tmp_path, capsys, case):
    file, name, command = NAN_CASES[case]
    damage_tensor(model / file, name, float("nan"))
    if command == "generate":
        code, err = generate(capsys, model, tmp_path / "out")
    else:
        image = tmp_path / "in.png"
        Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
        code, err = explain(capsys, model, tmp_path / "out", image)
    *bar, last = err.strip().splitlines()  # the run stops at its first check; its progress bar comes before
    assert code == 2 and last.startswith("error: ") and name in last and "NaN" in last, err
    assert all("denoising" in line for line in bar) and str(model / file) in last, err
    assert "intact copy" in last and not (tmp_path / "out").exists()


def test_an_overflow_with_finite_weights_is_said_to_be_one(model, tmp_path, capsys):
    damage_tensor(model / "flux.safetensors", "img_in.weight", 3e38)  # finite, but its products overflow float32
    code, err = generate(capsys, model, tmp_path / "out")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "every weight is finite" in last and "overflowed" in last, err
    assert not (tmp_path / "out").exists()


def test_finite_check_costs_one_reduction_per_tensor():
    from checks import check_finite

    module = torch.nn.Linear(4, 4)
    check_finite(module, "x")  # finite: no error
    with torch.no_grad():
        module.bias[2] = float("inf")
    with pytest.raises(ValueError, match="x: bias holds NaN or infinite values"):
        check_finite(module, "x")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_check_sees_nan_in_every_dtype_and_no_overflow_in_float16(dtype):
    from checks import check_finite

    module = torch.nn.Linear(256, 512).to(dtype)  # 131,072 weights
    with torch.no_grad():
        module.weight.fill_(1.0)  # sums to 131,072: past float16's 65,504, so a float16 sum would be inf
    check_finite(module, "x")
    with torch.no_grad():
        module.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="x: weight holds NaN"):
        check_finite(module, "x")


@pytest.mark.parametrize("missing", ["t5.safetensors", "tokenizer_2"])
def test_a_missing_file_never_suggests_a_download_into_the_folder(model, tmp_path, capsys, missing, monkeypatch):
    path = model / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    code, err = generate(capsys, model, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "--local-dir" not in err, err
    assert f"{model} is a local folder: copy the" in err
    import weights.find

    monkeypatch.setattr(weights.find, "BUILTIN", model.resolve())  # the same folder as the built-in model
    code, err = generate(capsys, model, tmp_path / "out")
    assert code == 2 and "--local-dir" not in err and "git checkout -- shapes/weights" in err, err


@pytest.mark.parametrize("name", ["ae_config.json", "flux_config.json", "t5_config.json"])
def test_a_lost_sidecar_config_is_not_replaced_by_flux_presets(model, tmp_path, capsys, name):
    """Without its config a single file would be read as a BFL file, with FLUX.1's RoPE axes or latent scale: wrong
    maps and images, no error."""
    (model / name).unlink()
    code, err = generate(capsys, model, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and name in err, err


def test_integer_tensors_where_weights_go_are_refused(model, tmp_path, capsys):
    state = load_file(model / "t5.safetensors")
    save_file({k: v.to(torch.int32) for k, v in state.items()}, model / "t5.safetensors")
    code, err = generate(capsys, model, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "expected floating-point values, found int32" in err, err


def test_a_recipe_json_that_is_a_folder_is_refused(model, tmp_path, capsys):
    (model / "recipe.json").unlink()
    (model / "recipe.json").mkdir()
    code, err = generate(capsys, model, tmp_path / "out")
    assert code == 2 and "recipe.json is not a file" in err, err


def test_a_list_as_any_components_config_is_named(tmp_path):
    """The loaders of every family (SD3.5, CogVideoX too) read config.json through `read_config`."""
    from weights.errors import CheckpointError
    from weights.files import read_config
    from weights.find import Found, Layout

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("[1, 2]")
    found = Found(tmp_path, Layout("folder", "transformer", "diffusion_pytorch_model"), ("transformer/config.json",))
    with pytest.raises(CheckpointError, match="config.json is a JSON list, not an object of settings") as err:
        read_config(found)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("memory", ["stream", "fp8", "offload"])
def test_nan_weights_are_named_in_every_memory_mode(model, tmp_path, capsys, memory):
    """Streamed blocks keep their weights in host memory, outside the module's parameters: the scan reads them there
    (it said "every weight is finite" in the "stream" mode)."""
    name = "double_blocks.1.img_attn.qkv.weight"
    damage_tensor(model / "flux.safetensors", name, float("nan"))
    argv = ["generate", "--model", str(model), "--prompt", "a red circle", "--concepts", "circle", "background",
            "--num-steps", "1", "--size", "32", "--memory", memory, "--out", str(tmp_path / "out")]  # fmt: skip
    assert concept_attention.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"flux.safetensors: {name} holds NaN" in last, last
