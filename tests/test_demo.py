"""`make demo` on the shipped shapes model: the commands run offline and write images a person can look at."""

import json

from PIL import Image

from shapes import demo


def test_demo_writes_images(tmp_path):
    assert demo.main(str(tmp_path)) == 0
    for part, count in (("generate", 3), ("explain_shapes", 4), ("explain_colours", 4)):
        for name in ("image.png", "overlay.png"):
            with Image.open(tmp_path / part / name) as im:
                assert im.mode == "RGB" and im.size[0] >= 128
        assert len(list((tmp_path / part / "heatmaps").glob("*.png"))) == count
        settings = json.loads((tmp_path / part / "settings.json").read_text())
        recipe = json.loads((demo.BUILTIN_MODEL / "recipe.json").read_text())
        assert settings["layers_used"] == recipe["layers"] and settings["layers_from"] == "recipe.json"
    shapes = json.loads((tmp_path / "explain_shapes" / "settings.json").read_text())
    colours = json.loads((tmp_path / "explain_colours" / "settings.json").read_text())
    assert shapes["concepts"] == ["circle", "square", "triangle", "background"]
    assert colours["concepts"] == ["red", "green", "blue", "background"]
    assert shapes["image"] == colours["image"] and shapes["prompt"] == colours["prompt"] != ""  # one scene, its caption
    with Image.open(tmp_path / demo.FIGURE) as im:  # two blocks of two rows of 5 tiles, a colour bar under them
        assert im.mode == "RGB" and im.width == 5 * 128 and im.height > 4 * 128
    assert (tmp_path / "scene" / "true_masks" / "background.png").is_file()
