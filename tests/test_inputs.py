"""Bad and unusual input without a model: image files in every mode Pillow reads, tensor input, the automatic size and
the memory estimate, Settings and concept checks, the text warnings and the output folder.

Expected pixels come from the definition of each format (16-bit: v * 255 / 65535; float: v * 255; alpha: the
compositing formula over white; EXIF orientation 6: a quarter turn clockwise), computed here with numpy."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imaging
import outputs
import saliency
from checks import text_warnings
from outputs import OutputFolder
from saliency import ConceptResult, Settings, check_concepts


def one_line(err: Exception) -> bool:
    return "\n" not in str(err)


def test_16_bit_png_is_scaled_not_white(tmp_path):
    data = (np.arange(24 * 40).reshape(24, 40) * 68).astype(np.uint16)  # 0 .. 65212
    Image.fromarray(data).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = np.asarray(imaging.load_image(tmp_path / "deep.png")).astype(int)
    want = np.round(data.astype(np.float64) * 255 / 65535).astype(int)
    print("16-bit max abs error", np.abs(got - want[..., None]).max())
    assert got.shape == (24, 40, 3) and np.abs(got - want[..., None]).max() == 0


def test_float_tiff_is_scaled_or_refused(tmp_path):
    data = np.linspace(0, 1, 16 * 32, dtype=np.float32).reshape(16, 32)
    Image.fromarray(data).save(tmp_path / "float.tif")
    got = np.asarray(imaging.load_image(tmp_path / "float.tif")).astype(int)
    assert np.abs(got - np.round(data * 255)[..., None]).max() <= 1 and got.max() == 255  # not all black
    Image.fromarray(data * 300).save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match=r"hdr.tif: float image with values in \[0, 300\]") as err:
        imaging.load_image(tmp_path / "hdr.tif")
    assert one_line(err.value)


def test_exif_orientation_is_applied(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)  # as the camera wrote it: 32 wide, 16 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: show the stored pixels turned a quarter clockwise
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    got = np.asarray(imaging.load_image(tmp_path / "phone.png"))
    assert got.shape == (32, 16, 3) and (got == np.rot90(stored, k=-1)).all()


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 64  # a faint red
    rgba[:8, :, 3] = 0  # the top half fully transparent (its colour must not show)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    got = np.asarray(imaging.load_image(tmp_path / "alpha.png")).astype(int)
    a = 64 / 255
    want = np.round([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])
    assert (got[:8] == 255).all() and np.abs(got[8:] - want).max() <= 1
    Image.fromarray(rgba[..., [0, 3]], mode="LA").save(tmp_path / "la.png")
    assert (np.asarray(imaging.load_image(tmp_path / "la.png"))[:8] == 255).all()


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(imaging, "MAX_PIXELS", 1000)
    with pytest.raises(ValueError, match="40 x 30 pixels, above the 1000") as err:
        imaging.load_image(tmp_path / "big.png")
    assert one_line(err.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own refusal, above twice its limit
    monkeypatch.setattr(imaging, "MAX_PIXELS", 10**9)
    with pytest.raises(ValueError, match="big.png") as err:
        imaging.load_image(tmp_path / "big.png")
    assert one_line(err.value)


def test_tensor_input_takes_0_to_1_and_refuses_the_rest():
    x = torch.rand(3, 16, 32)
    image = imaging.tensor_to_image(x)
    assert np.abs(np.asarray(image).astype(int) - np.round(x.permute(1, 2, 0).numpy() * 255)).max() <= 1
    for bad, message in [(x * 2 - 1, r"values lie in \[-"), (x[None], r"shape \[1, 3, 16, 32\]"),
                         (x.clone().fill_(float("nan")), "NaN")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            imaging.tensor_to_image(bad)


def test_auto_size():
    assert imaging.auto_size(32, 48, 1024) == (32, 48)  # valid and small: kept
    h, w = imaging.auto_size(3024, 4032, 1024)  # a phone photo
    assert (h, w) == (768, 1024) and h % 16 == 0 and w % 16 == 0
    h, w = imaging.auto_size(1000, 333, 1024)  # not multiples of 16, never enlarged
    assert (h, w) == (1008, 336) and abs(w / h - 333 / 1000) < 8 / 333
    assert imaging.auto_size(5, 7, 128) == (16, 16)


def test_memory_estimate_refuses_huge_sizes():
    cpu = torch.device("cpu")
    small = imaging.estimate_memory(128, 128, cpu, torch.float32, 32, 128, 32)
    big = imaging.estimate_memory(8192, 8192, cpu, torch.float32, 128, 3072, 256)
    assert max(big.values()) > 1000 * max(small.values())
    imaging.check_memory(128, 128, cpu, torch.float32, 32, 128, 32)
    with pytest.raises(ValueError, match=r"size 8192x8192 needs about [\d.]+ GB on cpu") as err:
        imaging.check_memory(8192, 8192, cpu, torch.float32, 128, 3072, 256)
    assert one_line(err.value) and "--size" in str(err.value)


def test_settings_and_concepts_refuse_what_would_be_misread():
    with pytest.raises(ValueError, match="'12'"):
        Settings(layers="12")  # would have become (1, 2)
    assert Settings(layers=12).layers == (12,) and Settings(layers=(np.int64(3),)).layers == (3,)
    for bad in [(), (1.5,), (True,), (3, 3), (-1,)]:
        with pytest.raises(ValueError, match="Settings.steps"):
            Settings(steps=bad)
    with pytest.raises(ValueError, match="Settings.softmax"):
        Settings(softmax="no")
    with pytest.raises(ValueError, match="must be a string"):
        check_concepts(["cat", 3])
    with pytest.raises(ValueError, match="list of strings"):
        check_concepts({"cat"})


class FakeTokenizer:
    """Words it knows are one piece each; every other word is <unk> (id 2); EOS is 1."""

    def __init__(self, known):
        self.known = {w: i + 3 for i, w in enumerate(known)}
        self.backend = self

    def token_to_id(self, token):
        return {"<unk>": 2}.get(token)

    def encode(self, text):
        return [self.known.get(w, 2) for w in text.split()] + [1]


def test_text_warnings():
    tok = FakeTokenizer(["a", "cat", "on", "mat"])
    assert text_warnings(tok, 8, "a cat on a mat", ["cat", "mat"], softmax=True) == []
    notes = text_warnings(tok, 4, "a cat on a mat", ["cat", "zebra", "okapi"], softmax=True)
    assert len(notes) == 2 and "only the first 4" in notes[0] and "'zebra', 'okapi'" in notes[1]
    notes = text_warnings(tok, 8, "", ["cat"], softmax=True)
    assert len(notes) == 1 and "background" in notes[0] and "--no-softmax" in notes[0]
    assert text_warnings(tok, 8, "", ["cat"], softmax=False) == []


def fake_result(concepts, value=0.0) -> ConceptResult:
    maps = torch.full((len(concepts), 2, 2), value) + torch.arange(4.0).reshape(2, 2)
    return ConceptResult(Image.new("RGB", (32, 32)), concepts, maps, Settings(), {"mode": "test"})


def test_output_folder_replaces_an_earlier_result_whole(tmp_path):
    out = tmp_path / "out"
    fake_result(["cat", "sky", "grass"]).save(out)
    folder = OutputFolder(out, ["dog"])
    assert folder.replaces
    folder.write(fake_result(["dog"]))
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["00_dog.png"]  # no map of the first run is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder either


def test_output_folder_refusals(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    cases = [
        (tmp_path, "holds files that are not a result of this program (notes.txt)"),
        (tmp_path / "notes.txt", "is a file"),
        ("", "name is empty"),
        (tmp_path / "notes.txt" / "out", "cannot write"),
    ]
    for out, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            OutputFolder(out, ["cat"])
        assert one_line(err.value)
    fake_result(["cat"]).save(tmp_path / "result")
    with pytest.raises(ValueError, match="lies inside the output folder"):
        OutputFolder(tmp_path / "result", ["cat"], inputs=(tmp_path / "result" / "image.png",))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_long_and_odd_concept_names_fit_the_file_system(tmp_path):
    concepts = ["x" * 300, "a b", "a_b", "chat noir \u00e9t\u00e9 " * 20]
    out = fake_result(concepts).save(tmp_path / "out")
    names = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert len(names) == 4 and all(len(n.encode()) <= 255 for n in names)
    assert names[1].startswith("01_a_b") and names[2].startswith("02_a_b")


def test_interrupted_save_leaves_the_earlier_result(tmp_path, monkeypatch):
    out = tmp_path / "out"
    fake_result(["cat"], value=1.0).save(out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saliency.ConceptResult, "overlay", fail)
    with pytest.raises(KeyboardInterrupt):
        fake_result(["dog"], value=2.0).save(out)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_runs_into_one_folder_never_mix(tmp_path):
    out = tmp_path / "out"
    first, second = OutputFolder(out, ["cat", "sky"]), OutputFolder(out, ["dog"])  # both started before either ends
    second.write(fake_result(["dog"]))
    first.write(fake_result(["cat", "sky"]))  # the last to finish wins, whole
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["00_cat.png", "01_sky.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["00_cat.png", "01_sky.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_native_size_comes_from_the_model(tmp_path):
    from concept_attention import BUILTIN_MODEL, NATIVE_SIZE, native_size

    assert native_size(BUILTIN_MODEL) == 128  # the built-in model's recipe: trained on 128 px scenes
    assert native_size(tmp_path) == NATIVE_SIZE == 1024  # FLUX.1's, for any other model


# ---- issue 24: nothing of the user's is ever deleted or overwritten -------------------------------------------------
def tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_users_folder_with_result_names_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "label_1.png").write_text("x")
    Image.new("RGB", (8, 8), "red").save(out / "image.png")
    (out / "settings.json").write_text('{"mine": 1}')
    before = tree(out)
    for attempt in (lambda: OutputFolder(out, ["cat"]), lambda: fake_result(["cat"]).save(out)):
        with pytest.raises(ValueError, match="not a result of this program") as err:
            attempt()
        assert one_line(err.value) and "nothing was changed" in str(err.value)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("change", ["added", "changed", "replaced settings"])
def test_an_earlier_result_the_user_changed_is_not_replaced(tmp_path, change):
    out = fake_result(["cat", "sky"]).save(tmp_path / "out")
    if change == "added":
        (out / "masks" / "label_1.png").write_text("mine")
    elif change == "changed":
        Image.new("RGB", (8, 8), "red").save(out / "image.png")
    else:
        (out / "settings.json").write_text("{}")
    before = tree(out)
    with pytest.raises(ValueError, match="not a result of this program"):
        fake_result(["dog"]).save(out)
    assert tree(out) == before


def test_save_never_replaces_the_explained_image(tmp_path):
    out = fake_result(["cat"]).save(tmp_path / "out")  # an earlier result, whose image.png is then explained
    image = imaging.load_image(out / "image.png")
    result = ConceptResult(image, ["cat"], torch.rand(1, 2, 2), Settings(), {"mode": "explain"})
    before = tree(out)
    with pytest.raises(ValueError, match="lies inside the output folder"):
        result.save(out)
    assert tree(out) == before
    saved = json.loads((result.save(tmp_path / "other") / "settings.json").read_text())
    assert saved["image"] == str((out / "image.png").resolve())  # the input's path is recorded


def test_a_symlinked_output_folder_is_followed_and_nothing_is_left_behind(tmp_path):
    target = fake_result(["cat"]).save(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    fake_result(["dog"]).save(link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert sorted(p.name for p in (target / "heatmaps").iterdir()) == ["00_dog.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]  # no hidden .link.*.old


def test_the_current_folder_is_refused(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", here, tmp_path):
        with pytest.raises(ValueError, match="is the current folder or holds it") as err:
            OutputFolder(out, ["cat"])
        assert one_line(err.value)
    assert here.is_dir() and Path.cwd() == here and not list(here.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_a_mount_point_is_refused_before_the_run(tmp_path, monkeypatch):
    volume = tmp_path / "volume"
    volume.mkdir()
    monkeypatch.setattr(outputs.os.path, "ismount", lambda p: Path(p) == volume)
    with pytest.raises(ValueError, match="is a mount point") as err:
        OutputFolder(volume, ["cat"])
    assert one_line(err.value) and str(volume / "result") in str(err.value)
    assert not list(tmp_path.glob(".*"))


def test_an_unreadable_result_folder_is_refused_in_one_line(tmp_path):
    out = fake_result(["cat"]).save(tmp_path / "out")
    (out / "masks").chmod(0)
    try:
        if os.access(out / "masks", os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ValueError) as err:
            fake_result(["dog"]).save(out)
        assert one_line(err.value)
    finally:
        (out / "masks").chmod(0o755)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["00_cat.png"]


def test_concepts_that_read_the_same_are_duplicates():
    pairs = (["cat", "ca\u200bt"], ["cat", "\uff43\uff41\uff54"], ["black cat", "black  cat"], ["cat", "cat\u00ad"])
    for concepts in pairs:
        with pytest.raises(ValueError, match="duplicate concept") as err:
            check_concepts(concepts)
        assert one_line(err.value)
    with pytest.raises(ValueError, match="invisible"):
        check_concepts(["cat", "\u200b\u200d"])
    assert check_concepts(["Cat", "cat"]) == ["Cat", "cat"]  # T5 is case-sensitive: two maps


def test_a_concept_beyond_the_token_limit_is_warned_about_as_a_prompt_is():
    tok = FakeTokenizer(["a", "cat"])
    notes = text_warnings(tok, 4, "a cat", ["cat", "a cat a cat a cat"], softmax=True)
    assert len(notes) == 1 and "'a cat a cat a cat' is 7 T5 tokens" in notes[0] and "only the first 4" in notes[0]


def test_api_arguments_of_the_wrong_type_are_value_errors():
    from checks import check_number

    tok = FakeTokenizer(["a", "cat"])
    for prompt in (5, None, ["a cat"]):
        with pytest.raises(ValueError, match="prompt"):
            text_warnings(tok, 8, prompt, ["cat", "sky"], softmax=True)
    result = fake_result(["cat", "sky"])
    result.grid = {"output+softmax": torch.rand(1, 1, 2, 4), "output": torch.rand(1, 1, 2, 4)}
    result.layers = (0,)
    calls = [
        lambda: result.select(softmax="no"),  # was read as True
        lambda: result.select(softmax=None, space=5),
        lambda: result.upsample((0, 0)),
        lambda: result.upsample("big"),
        lambda: result.masks(size=(16,)),
        lambda: result.overlay(alpha="x"),
        lambda: result.overlay(alpha=float("nan")),
        lambda: result.save(5),
        lambda: result.save(None),
        lambda: saliency.MapCollector(Settings(), (0,), torch.zeros(2, dtype=torch.long), 2, keep_grid="no"),
        lambda: check_number(float("inf"), "guidance"),
    ]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        assert one_line(err.value)


def test_more_api_arguments_of_the_wrong_type_are_value_errors():
    from saliency import family_settings
    from sampling import check_size
    from weights.find import locate

    calls = [
        lambda: family_settings(None, "flux"),
        lambda: family_settings({"space": "output"}, "flux"),
        lambda: check_size(32),  # explain(size=(32,))
        lambda: locate(5, "flux"),
    ]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        assert one_line(err.value)


def test_a_dtype_given_as_a_string_and_a_tilde_image_path(tmp_path, monkeypatch):
    import weights

    with pytest.raises(ValueError, match="give a torch dtype") as err:
        weights.resolve_device_dtype("flux", "cpu", "float32")
    assert one_line(err.value)
    monkeypatch.setenv("HOME", str(tmp_path))
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "x.png")
    assert imaging.load_image("~/x.png").size == (16, 16)  # expanded, as --out is
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        imaging.load_image("~")


def test_offload_must_be_a_bool():
    from concept_attention import memory_mode

    with pytest.raises(ValueError, match="offload = 'yes'"):
        memory_mode("full", "yes")
    assert memory_mode("full", True) == "offload"


def test_a_result_written_meanwhile_is_replaced_and_said_to_be(tmp_path):
    """Two runs into one new folder: the later one replaces the result the other put there while it computed (a
    result of this program), and says so (it said "wrote", as for a new folder)."""
    first, second = OutputFolder(tmp_path / "out", ["cat"]), OutputFolder(tmp_path / "out", ["dog"])
    assert not first.replaces and not second.replaces  # the folder did not exist when either began
    first.write(fake_result(["cat"], value=1.0))
    second.write(fake_result(["dog"], value=2.0))
    assert second.replaces and (tmp_path / "out" / "heatmaps" / "00_dog.png").exists()
    assert not (tmp_path / "out" / "heatmaps" / "00_cat.png").exists()
