"""The pictures of a result cannot mislead: every heatmap on the result's one scale, a colour bar under the overlay,
a warning in numbers when every map is flat, and the layer x concept grid as grid.png."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import imaging
from concept_attention import main
from saliency import ConceptResult, Settings
from tiny import tiny_pipeline, train_spiece


def result(maps: torch.Tensor, softmax: bool = True) -> ConceptResult:
    image = Image.new("RGB", (maps.shape[-1] * 16, maps.shape[-2] * 16), "gray")
    return ConceptResult(image, [f"c{i}" for i in range(len(maps))], maps, Settings(softmax=softmax), {})


def test_heatmaps_share_one_scale():
    """After the softmax every map is drawn on [0, 1]: a map between 0.30 and 0.31 stays dark; it is not stretched
    to the palette's ends as a per-map min-max would do. Without the softmax the scale is shared by all maps."""
    low = torch.full((2, 2), 0.30)
    low[0, 0] = 0.31
    r = result(torch.stack((low, 1 - low)))
    heat = np.asarray(r.heatmaps()[0].resize((2, 2), Image.NEAREST))
    expected = np.asarray(imaging.colorize(low, 0.0, 1.0))
    assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 2
    assert heat.max() < 200  # per-map min-max would put pale yellow (252, 255, 164) at 0.31
    raw = result(torch.stack((low, 3 * low)), softmax=False)
    assert r.scale() == (0.0, 1.0) and raw.scale() == pytest.approx((0.30, 0.93))


def test_overlay_has_a_colour_bar():
    r = result(torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)))
    grid = imaging.captioned_grid([r.image] * 3, ["image", "c0", "c1"])
    overlay = r.overlay()
    assert overlay.width == grid.width and overlay.height == grid.height + 30  # the bar strip
    bar = np.asarray(overlay)[grid.height + 5, :, :].astype(int)
    assert (np.abs(np.diff(bar, axis=0)).sum(axis=1) > 0).sum() > overlay.width // 3  # a colour ramp, not blank


def test_flat_maps_are_named_in_numbers():
    flat = torch.stack((torch.full((3, 3), 0.332), torch.full((3, 3), 0.333), torch.full((3, 3), 0.335)))
    flat[0, 0, 0] = 0.334
    note = result(flat).flat_note()
    assert note is not None and "0.002" in note and "0 to 1" in note
    sharp = torch.stack((torch.eye(3), 1 - torch.eye(3)))
    assert result(sharp).flat_note() is None
    assert result(torch.stack((100 + 0.01 * torch.eye(3), 100 - 0.01 * torch.eye(3))), softmax=False).flat_note()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_spiece(folder)
    return tiny_pipeline(folder)


def test_grid_picture(pipe, tmp_path):
    """keep_grid: one row per block, one column per concept, tiles on one scale, with the colour bar."""
    r = pipe.generate("a red circle", ["circle", "background"], 32, 48, 2, keep_grid=True, progress=False)
    picture = r.grid_image(tile=32)
    rows, columns = len(r.layers), 2
    assert picture.width == columns * 48 and picture.height == rows * (32 + 14) + 30
    assert result(r.maps).grid_image() is None


def test_cli_writes_grid_png_and_warns_on_flat_maps(tmp_path, capsys):
    args = ["generate", "--model", "shapes", "--prompt", "a red circle", "--concepts", "circle", "square",
            "--num-steps", "2", "--device", "cpu", "--size", "64"]  # fmt: skip
    assert main([*args, "--grid", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "grid.png").is_file() and "grid.png" in capsys.readouterr().out
    for space in ("attention", "output"):  # attention weights after the softmax over concepts are often flat here
        out = tmp_path / space
        assert main([*args, "--space", space, "--out", str(out)]) == 0
        maps = load_file(out / "maps.safetensors")["maps"]
        warned = "nearly flat" in capsys.readouterr().err
        assert warned == (result(maps).flat_note() is not None), space


def test_words_the_built_in_model_never_saw_are_warned(tmp_path, capsys):
    args = ["generate", "--model", "shapes", "--prompt", "a red circle", "--num-steps", "1", "--device", "cpu",
            "--size", "32"]  # fmt: skip
    assert main([*args, "--concepts", "cat", "circle", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "never saw 'cat'" in err and "circle" not in err.split("never saw")[1].split(";")[0]
    assert main([*args, "--concepts", "red circle", "background", "--out", str(tmp_path / "b")]) == 0
    assert "never saw" not in capsys.readouterr().err


def test_api_records_where_it_ran_and_checks_its_arguments(pipe):
    r = pipe.generate("a red circle", ["circle", "square"], 32, 32, 1, progress=False)
    assert (r.record["device"], r.record["dtype"], r.record["memory"]) == ("cpu", "float32", "full")
    with pytest.raises(ValueError, match="progress"):
        pipe.generate("a red circle", ["circle", "square"], 32, 32, 1, progress="no")
    with pytest.raises(ValueError, match="size = 32"):
        pipe.explain(r.image, ["circle", "square"], size=32, progress=False)
    with pytest.raises(ValueError, match="model source 5"):
        import weights

        weights.family(5)
