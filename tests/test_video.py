"""Video input and output: frames read from an animated GIF/WebP or a folder, decoded frames mapped to their latent
frames, and a video result written as a folder (animation, contact sheet, per-concept animations and strips)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from outputs import OutputFolder
from saliency import Settings
from video import VideoResult, latent_index, load_video, save_animation


def clip(n=9, size=(48, 32)) -> list[Image.Image]:
    return [Image.new("RGB", size, (20 * i % 255, 100, 200 - 10 * i)) for i in range(n)]


@pytest.mark.parametrize("kind", ["gif", "webp", "folder"])
def test_load_video(tmp_path, kind):
    frames = clip()
    if kind == "folder":
        (tmp_path / "frames").mkdir()
        for i, f in enumerate(frames):
            f.save(tmp_path / "frames" / f"{i:03d}.png")
        path = tmp_path / "frames"
    elif kind == "gif":
        path = tmp_path / "clip.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    else:
        path = tmp_path / "clip.webp"
        save_animation(frames, path)
    got = load_video(path)
    assert len(got) == 9 and got[0].size == (48, 32) and got[0].mode == "RGB"
    if kind != "gif":  # GIF quantises colours
        assert np.array_equal(np.asarray(got[4]), np.asarray(frames[4]))


def test_bad_videos(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_video(tmp_path / "missing.gif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no frames"):
        load_video(tmp_path / "empty")
    (tmp_path / "x.gif").write_text("not a gif")
    with pytest.raises(ValueError, match="cannot read"):
        load_video(tmp_path / "x.gif")
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (16, 8)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ValueError, match="differ in size"):
        load_video(tmp_path / "mixed")


def test_latent_frames():
    """CogVideoX: frame 0 alone, then four frames per latent frame (49 frames -> 13 latent frames)."""
    assert [latent_index(i) for i in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert latent_index(48) == 12


def test_result_folder(tmp_path):
    frames = clip(9)
    maps = torch.rand(2, 3, 2, 3, generator=torch.Generator().manual_seed(0))  # C=2, F=3 latent frames, 2 x 3 tokens
    maps = maps / maps.sum(0, keepdim=True)
    result = VideoResult(frames[0], ["cat", "sky"], maps, Settings(), {"mode": "generate"}, frames=frames)
    assert torch.equal(result.frame_maps()[:, 5], maps[:, 2]) and result.frame_mean().shape == (2, 2, 3)
    out = OutputFolder(tmp_path / "out", result.concepts).write(result)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["contact_sheet.png", "heatmaps/00_cat.png", "heatmaps/00_cat.webp", "heatmaps/01_sky.png",
                     "heatmaps/01_sky.webp", "maps.safetensors", "masks/00_cat.png", "masks/01_sky.png",
                     "settings.json", "video.webp"]  # fmt: skip
    assert len(load_video(out / "video.webp")) == 9 and len(load_video(out / "heatmaps" / "00_cat.webp")) == 9
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width == 3 * 48 and sheet.height == 8 * (32 + 14) + 30  # 8 of 9 frames x (frame, 2 concepts), a bar
    assert json.loads((out / "settings.json").read_text())["written_by"] == "concept_attention"
    assert OutputFolder(tmp_path / "out", result.concepts).replaces  # its own earlier result may be replaced


def test_long_concept_names_fit_the_file_system_as_animations_too(tmp_path):
    """heatmaps/NN_concept.webp is a byte longer than the .png the names were cut for (a 300-character concept failed
    with "File name too long" after the run)."""
    frames = clip(5)
    concepts = ["x" * 300, "chat noir \u00e9t\u00e9 " * 20]
    maps = torch.full((2, 2, 2, 3), 0.5)
    result = VideoResult(frames[0], concepts, maps, Settings(), {"mode": "generate"}, frames=frames)
    out = OutputFolder(tmp_path / "out", concepts).write(result)
    names = [p.name for p in (out / "heatmaps").iterdir()]
    assert len(names) == 4 and all(len(n.encode()) <= 255 for n in names)
