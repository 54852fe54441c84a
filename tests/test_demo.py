"""`make demo` on the shipped shapes model: both commands run offline and write images a person can look at."""

from PIL import Image

from shapes import demo


def test_demo_writes_images(tmp_path):
    assert demo.main(str(tmp_path)) == 0
    for part in ("generate", "explain"):
        for name in ("image.png", "overlay.png"):
            with Image.open(tmp_path / part / name) as im:
                assert im.mode == "RGB" and im.size[0] >= 128
        assert len(list((tmp_path / part / "heatmaps").glob("*.png"))) == 3
    assert (tmp_path / "scene" / "true_masks" / "background.png").is_file()
