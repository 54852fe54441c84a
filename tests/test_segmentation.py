"""The segmentation benchmark: readers on fixture files written here in the real formats, metrics against hand-computed
values, scikit-learn and an independent re-implementation of the official stacked-channel code, and full runs (a fake
pipeline with known answers, and the tiny random model) that resume from their cache and shard into equal numbers."""

import itertools
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from sklearn.metrics import accuracy_score, average_precision_score, jaccard_score

from segmentation import (
    PROTOCOLS,
    FolderSegmentation,
    ImageNetSegmentation,
    Method,
    VOCSegmentation,
    average_precision,
    blur3x3,
    merge,
    method_grid,
    parse_layers,
    run,
    summarize,
    two_channel_average_precision,
)
from segmentation.__main__ import main
from segmentation.cache import weights_fingerprint
from segmentation.metrics import image_stats

# ---- fixtures in the real formats ----------------------------------------------------------------------------------


def write_gtsegs(path, items):
    """A MATLAB v7.3 file laid out like gtsegs_ijcv.mat: value/{img,gt,id,target} are (N, 1) references into #refs#;
    images are stored (3, W, H), masks (W, H) behind a one-cell reference array, strings as uint16 char arrays."""
    counter = itertools.count()
    with h5py.File(path, "w") as f:
        refs, value = f.create_group("#refs#"), f.create_group("value")
        value.attrs["MATLAB_class"] = np.bytes_("struct")

        def put(array, matlab_class):
            ds = refs.create_dataset(f"r{next(counter)}", data=array)
            ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
            return ds.ref

        columns = {"img": [], "gt": [], "id": [], "target": []}
        for image, mask, ident in items:
            columns["img"].append(put(image.transpose(2, 1, 0), "uint8"))
            cell = np.array([[put(mask.T, "uint8")]], dtype=h5py.ref_dtype)
            columns["gt"].append(put(cell, "cell"))
            columns["id"].append(put(np.array([[ord(c)] for c in ident], dtype=np.uint16), "char"))
            wnid = ident.split("_")[0]
            columns["target"].append(put(np.array([[ord(c)] for c in wnid], dtype=np.uint16), "char"))
        for name, column in columns.items():
            value.create_dataset(name, data=np.array(column, dtype=h5py.ref_dtype).reshape(-1, 1))


def block_mask(h, w, top, left, bottom, right, value=1):
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[top:bottom, left:right] = value
    return mask


def bright(mask):
    """An image whose brightness is the object: the fake pipeline below then knows the answer."""
    return np.repeat(((mask != 0) & (mask != 255))[..., None] * 200 + 20, 3, axis=2).astype(np.uint8)


IMAGENET_ITEMS = [  # (mask, WordNet id): sizes and objects on a 32-pixel grid so 64 x 64 resizes stay exact
    (block_mask(64, 64, 16, 16, 48, 32), "n02105162_7406"),  # malinois
    (block_mask(128, 64, 0, 32, 64, 64), "n02123045_11"),  # tabby
    (block_mask(64, 128, 32, 0, 64, 96), "n02690373_3"),  # airliner
    (block_mask(128, 128, 64, 64, 128, 128), "n02391049_8"),  # zebra: not in our map
    (block_mask(64, 64, 0, 0, 32, 64), "n02403454_5"),  # cow
]


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("imagenet") / "gtsegs_ijcv.mat"
    rng = np.random.default_rng(0)
    items = [(bright(m) + rng.integers(0, 3, m.shape + (3,), dtype=np.uint8), m, ident) for m, ident in IMAGENET_ITEMS]
    write_gtsegs(path, items)
    return path, items


VOC_PALETTE = [0] * 768
for _i in range(256):  # the VOC colour map: class bits spread over the three colour channels
    for _j in range(8):
        for _c in range(3):
            VOC_PALETTE[3 * _i + _c] |= ((_i >> (3 * _j + _c)) & 1) << (7 - _j)


def write_voc(root, masks):
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    for name, mask in masks.items():
        Image.fromarray(bright(mask)).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
        png = Image.fromarray(mask, mode="P")
        png.putpalette(VOC_PALETTE)
        png.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(masks) + "\n")
    return base


def voc_masks():
    dog = block_mask(64, 64, 16, 16, 48, 48, 12)
    dog[15, 16:48] = 255  # boundary pixels
    person = block_mask(64, 128, 0, 32, 64, 64, 15)
    both = block_mask(64, 64, 0, 0, 32, 32, 12) + block_mask(64, 64, 32, 32, 64, 64, 15)
    return {"2007_000001": dog, "2007_000002": person, "2007_000003": both}


def test_imagenet_reader(imagenet_file):
    path, items = imagenet_file
    data = ImageNetSegmentation(path)
    assert len(data) == len(items)
    for i, (image, mask, ident) in enumerate(items):
        sample = data[i]
        np.testing.assert_array_equal(np.asarray(sample.image), image)  # exact: the .mat holds raw pixels
        np.testing.assert_array_equal(sample.mask, mask)
        assert sample.key.endswith(ident)
    assert data[0].classes == {1: "malinois"} and data[1].classes == {1: "tabby"}
    assert data[3].classes == {1: "n02391049"}  # unknown id: kept as is, the class map then names it


def test_imagenet_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gtsegs_ijcv.mat.*calvin-vision"):
        ImageNetSegmentation(tmp_path / "missing.mat")
    (tmp_path / "text.mat").write_text("MATLAB 5.0 MAT-file")
    with pytest.raises(ValueError, match="not a MATLAB v7.3"):
        ImageNetSegmentation(tmp_path / "text.mat")
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f.create_dataset("value/img", data=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="value/gt"):
        ImageNetSegmentation(tmp_path / "other.mat")


def test_voc_reader(tmp_path):
    masks = voc_masks()
    write_voc(tmp_path, masks)
    data = VOCSegmentation(tmp_path)  # finds VOCdevkit/VOC2012 below the given folder
    assert len(data) == 3 and data.class_names[12] == "dog"
    for i, mask in enumerate(masks.values()):
        sample = data[i]
        np.testing.assert_array_equal(sample.mask, mask)
        assert sample.image.size == mask.shape[::-1]
    assert data[0].classes == {12: "dog"} and data[2].classes == {12: "dog", 15: "person"}


def test_voc_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOCtrainval_11-May-2012"):
        VOCSegmentation(tmp_path)
    base = write_voc(tmp_path, {"a": block_mask(32, 32, 0, 0, 16, 16, 3)})
    Image.new("RGB", (32, 32)).save(base / "SegmentationClass" / "a.png")
    with pytest.raises(ValueError, match="a.png: mode RGB"):
        VOCSegmentation(tmp_path).label(0)
    (base / "ImageSets/Segmentation/val.txt").write_text("a\na\n")
    with pytest.raises(ValueError, match="val.txt lists a twice"):
        VOCSegmentation(tmp_path)
    (base / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        VOCSegmentation(tmp_path)


def write_folder(root, use_json=False):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    one = block_mask(64, 64, 0, 0, 32, 64, 255)  # black and white, one class: white is the object
    two = block_mask(64, 64, 0, 0, 32, 32, 1) + block_mask(64, 64, 32, 32, 64, 64, 2)
    for name, mask in (("one", one), ("two", two)):
        Image.fromarray(bright(np.where(mask == 255, 1, mask))).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    index = {"one.png": ["cat"], "two.png": ["dog", "cat"]}
    if use_json:
        (root / "concepts.json").write_text(json.dumps(index))
    else:
        (root / "concepts.csv").write_text("image,classes\none.png,cat\ntwo.png,dog;cat\n")


@pytest.mark.parametrize("use_json", [False, True])
def test_folder_reader(tmp_path, use_json):
    write_folder(tmp_path, use_json)
    data = FolderSegmentation(tmp_path)
    assert data.class_names == ("background", "cat", "dog")
    one, two = data[0], data[1]
    assert one.classes == {1: "cat"} and set(np.unique(one.mask)) == {0, 1}
    assert two.classes == {1: "cat", 2: "dog"}
    assert (two.mask[:32, :32] == 2).all() and (two.mask[32:, 32:] == 1).all()  # local k -> global index
    (tmp_path / "masks" / "two.png").unlink()
    with pytest.raises(FileNotFoundError, match="two.png"):
        data.label(1)


# ---- metrics ---------------------------------------------------------------------------------------------------------


def test_metrics_hand_computed():
    pred, label = np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 255]])
    # valid pixels: (0,0) 0/0 right, (0,1) 1/1 right, (1,0) 1/0 wrong; class 0: I 1, U 2; class 1: I 1, U 2.
    s = summarize([image_stats(0, "a", pred, label, 2)], ("bg", "fg"))
    assert s["acc"] == pytest.approx(2 / 3) and s["miou"] == pytest.approx(0.5)
    assert s["pixels"] == {"correct": 2, "labelled": 3, "ignored": 1}
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)  # a tie
    assert np.isnan(average_precision([0.3, 0.2], [0, 0]))


def test_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    stats, preds, labels = [], [], []
    for i in range(6):
        label = rng.integers(0, 4, (12, 10))
        label[rng.random(label.shape) < 0.1] = 255
        pred = np.where(rng.random(label.shape) < 0.6, label % 255, rng.integers(0, 4, label.shape))
        stats.append(image_stats(i, str(i), pred, label, 4))
        preds.append(pred[label != 255]), labels.append(label[label != 255])
    ours = summarize(stats[::-1], ("a", "b", "c", "d"))  # any order: summarize sorts by index
    p, y = np.concatenate(preds), np.concatenate(labels)
    ref_iou = jaccard_score(y, p, labels=[0, 1, 2, 3], average=None)
    print(
        "acc",
        ours["acc"],
        accuracy_score(y, p),
        "max IoU error",
        np.abs(np.array(list(ours["iou"].values())) - ref_iou).max(),
    )
    assert ours["acc"] == pytest.approx(accuracy_score(y, p), abs=1e-12)  # exact counts: float rounding only
    np.testing.assert_allclose(list(ours["iou"].values()), ref_iou, atol=1e-12)
    assert ours["miou"] == pytest.approx(jaccard_score(y, p, average="macro"), abs=1e-12)
    for k in range(20):
        scores = np.round(rng.random(200), 1 + k % 3)  # coarse values: many ties
        truth = rng.random(200) < 0.3
        assert average_precision(scores, truth) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)
    scores, truth = rng.random((8, 8)), (rng.random((8, 8)) < 0.4).astype(np.uint8)
    stacked = average_precision_score(
        np.r_[1 - truth.ravel(), truth.ravel()], np.r_[1 - scores.ravel(), scores.ravel()]
    )
    assert two_channel_average_precision(scores, truth) == pytest.approx(stacked, abs=1e-12)


def test_multiclass_map_is_mean_per_class_ap():
    rng = np.random.default_rng(3)
    label = rng.integers(0, 3, (10, 12))
    label[0, :4] = 255
    scores = {1: rng.random(label.shape), 2: rng.random(label.shape), 4: rng.random(label.shape)}  # 4: listed, absent
    stats = image_stats(0, "a", np.zeros_like(label), label, 5, scores)
    valid = label != 255
    expected = np.mean([average_precision_score(label[valid] == c, scores[c][valid]) for c in (1, 2)])
    assert stats.ap == pytest.approx(expected, abs=1e-12) and stats.ap_two_channel is None


def official_stacked(masks, labels):
    """The official ImageNet / VOC single-class code, re-done here: stacked (1 - m, m) channels, +1 shift, histograms
    with 2 bins over [1, 2], labels -1 where ignored. Returns (accuracy, mIoU)."""
    inter, union, correct, labelled = np.zeros(2), np.zeros(2), 0, 0
    for m, y in zip(masks, labels, strict=True):
        y = np.where(y == 255, -1, y).astype(np.int64)
        pr, tg = np.stack([1 - m, m]) + 1, np.stack([1 - y, y]) + 1
        labelled += (tg > 0).sum()
        correct += ((pr == tg) * (tg > 0)).sum()
        pr = pr * (tg > 0)
        hit = pr * (pr == tg)
        a_i = np.histogram(hit, bins=2, range=(1, 2))[0]
        a_p, a_l = np.histogram(pr, bins=2, range=(1, 2))[0], np.histogram(tg, bins=2, range=(1, 2))[0]
        inter, union = inter + a_i, union + a_p + a_l - a_i
    return correct / labelled, (inter / union).mean()


def test_paper_figures_match_official_stacked_code():
    rng = np.random.default_rng(2)
    masks = [(rng.random((16, 16)) < 0.2).astype(np.int64) for _ in range(5)]  # a small object: the two
    # definitions of mIoU then differ clearly
    labels = [np.where(rng.random((16, 16)) < 0.7, m, 1 - m) for m in masks]
    pairs = list(zip(masks, labels, strict=True))
    ours = summarize([image_stats(i, "", m, y, 2) for i, (m, y) in enumerate(pairs)], ("b", "f"), ("miou_acc",))
    acc, miou = official_stacked(masks, labels)
    print("paper mIoU", ours["paper_miou"], "official stacked", miou, "correct two-class mIoU", ours["miou"])
    assert ours["acc"] == pytest.approx(acc, abs=1e-12) and ours["paper_miou"] == pytest.approx(miou, abs=1e-12)
    assert abs(ours["miou"] - miou) > 1e-3  # the correct mIoU is a different number
    for y in labels:  # VOC: ignored pixels count as labelled and wrong in one of the two stacked channels
        y[rng.random(y.shape) < 0.1] = 255
    ours = summarize([image_stats(i, "", m, y, 2) for i, (m, y) in enumerate(pairs)], ("b", "f"), ("acc_stacked",))
    assert ours["paper_acc"] == pytest.approx(official_stacked(masks, labels)[0], abs=1e-12)


def test_blur_matches_scipy():
    maps = torch.rand(3, 7, 9, dtype=torch.float64)
    # scipy's 'mirror' = torch's 'reflect'; truncate=1 gives the 3-tap kernel of sigma 1
    ref = np.stack([gaussian_filter(m, sigma=1.0, truncate=1.0, mode="mirror") for m in maps.numpy()])
    print("blur max abs error", np.abs(blur3x3(maps).numpy() - ref).max())
    np.testing.assert_allclose(blur3x3(maps).numpy(), ref, atol=1e-12)


# ---- full runs -------------------------------------------------------------------------------------------------------


class FakeResult:
    def __init__(self, brightness, concepts, noise):
        self.brightness, self.concepts, self.noise = brightness, concepts, noise
        self.layers = None  # the blocks recorded (a real result: every block); these maps do not depend on them

    def select(self, space=None, softmax=None, layers=None, steps=None):
        """output: the class concept is the image brightness (an oracle); value: its negative; attention: noise."""
        c = len(self.concepts)
        maps = torch.full((c, *self.brightness.shape), 0.5)
        target = next(i for i, w in enumerate(self.concepts) if w not in self.background) if self.has_class else 0
        maps[target] = {"output": self.brightness, "value": -self.brightness, "attention": self.noise}.get(
            space, self.noise
        ) + 0.001 * (0 if layers is None else len(layers))
        return maps.softmax(0) if softmax else maps


class FakePipeline:
    """The ConceptAttentionPipeline interface (explain + select) with answers a test can know."""

    def __init__(self, background, fail_after=None):
        self.background, self.calls, self.fail_after = set(background), 0, fail_after

    def explain(self, image, concepts, prompt="", t=0.5, num_samples=1, seed=0, settings=None, keep_grid=False,
                size=None, progress=True):  # fmt: skip
        assert keep_grid and image.width % 16 == 0 and image.height % 16 == 0 and size == image.size[::-1]
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # an interrupted run
        self.calls += 1
        pixels = torch.tensor(np.asarray(image.convert("L")), dtype=torch.float32) / 255
        brightness = torch.nn.functional.avg_pool2d(pixels[None], 16)[0]
        g = torch.Generator().manual_seed(int(pixels.sum() * 1000) + int(t * 100))
        result = FakeResult(brightness, concepts, torch.rand(brightness.shape, generator=g))
        result.background = self.background
        result.has_class = any(w not in self.background for w in concepts)
        return result


SMALL = dict(resize=((64, "nearest"),), label_size=32, num_samples=1)
CLASS_MAP = {"malinois": "dog", "tabby": "cat", "airliner": "plane", "n02391049": "zebra", "cow": "cow"}


def small_imagenet_protocol():
    return PROTOCOLS["paper-imagenet"].with_overrides(**SMALL)


def test_run_resume_and_shards(imagenet_file, tmp_path):
    path, items = imagenet_file
    data = ImageNetSegmentation(path)
    protocol = small_imagenet_protocol()
    methods = method_grid(["output", "value", "attention"], [True, False], [(14, 15, 16, 17)], [0.5, 0.25], [False])
    (tmp_path / "map.json").write_text(json.dumps(CLASS_MAP))
    class_map = str(tmp_path / "map.json")
    with pytest.raises(ValueError, match="n02391049"):  # the shipped ImageNet map does not name a zebra
        run(FakePipeline(protocol.background), data, protocol, methods, tmp_path / "x", class_map="imagenet")

    pipe = FakePipeline(protocol.background, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run(pipe, data, protocol, methods, tmp_path / "one", class_map=class_map, progress=False)
    pipe.fail_after = None
    one = run(pipe, data, protocol, methods, tmp_path / "one", class_map=class_map, progress=False)
    assert pipe.calls == len(items) * 2  # one forward per image and t, shared by 6 methods; the 3 cached kept
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["config"]["protocol"]["t"] == 0.5 and results["config"]["selected"] == len(items)
    assert set(results["definitions"]) >= {"acc", "miou", "map", "paper_miou", "paper_map"}
    table = (tmp_path / "one" / "results.md").read_text()
    assert "paper mIoU = Acc/(2-Acc)" in table and "output softmax layers=14-17 t=0.5" in table
    by_name = {m["name"]: m["metrics"] for m in one["methods"]}
    oracle, inverse = by_name["output softmax layers=14-17 t=0.5"], by_name["value layers=14-17 t=0.5"]
    print("oracle", oracle["acc"], oracle["miou"], oracle["map"], "inverse", inverse["acc"], inverse["miou"])
    assert oracle["acc"] == 1 and oracle["miou"] == 1 and oracle["map"] == 1 and oracle["paper_miou"] == 1
    assert inverse["acc"] == 0 and inverse["miou"] == 0
    noise = by_name["attention softmax layers=14-17 t=0.25"]
    assert 0.2 < noise["acc"] < 0.8 and noise["paper_miou"] == pytest.approx(noise["acc"] / (2 - noise["acc"]))

    again = run(pipe, data, protocol, methods, tmp_path / "one", class_map=class_map, progress=False)
    assert pipe.calls == len(items) * 2  # resumed entirely from the cache: no forward
    assert [m["metrics"] for m in again["methods"]] == [m["metrics"] for m in one["methods"]]

    shard_pipe = FakePipeline(protocol.background)
    first = run(shard_pipe, data, protocol, methods, tmp_path / "two", rank=0, world_size=2, class_map=class_map)
    assert first is None and not (tmp_path / "two" / "results.json").exists()
    second = run(shard_pipe, data, protocol, methods, tmp_path / "two", rank=1, world_size=2, class_map=class_map)
    assert shard_pipe.calls == len(items) * 2
    assert [m["metrics"] for m in second["methods"]] == [m["metrics"] for m in one["methods"]]
    assert [m["metrics"] for m in merge(tmp_path / "two")["methods"]] == [m["metrics"] for m in one["methods"]]


def test_voc_runs(tmp_path):
    write_voc(tmp_path, voc_masks())
    data = VOCSegmentation(tmp_path)
    single = PROTOCOLS["paper-voc-single"].with_overrides(**SMALL)
    methods = method_grid(["output"], [False], [None], [single.t], [False])
    out = run(FakePipeline(single.background), data, single, methods, tmp_path / "s", progress=False)
    metrics = out["methods"][0]["metrics"]
    assert out["config"]["selected"] == 2 and metrics["acc"] == 1  # the dog + person image is not single-class
    multi = PROTOCOLS["paper-voc-multi"].with_overrides(**{**SMALL, "label_size": 4})
    out = run(FakePipeline(multi.background), data, multi, methods, tmp_path / "m", progress=False)
    metrics = out["methods"][0]["metrics"]
    assert out["config"]["selected"] == 3 and set(metrics["iou"]) == {"background", "dog", "person"}


def test_command_line(tmp_path, monkeypatch):
    write_folder(tmp_path / "data")
    pipes = []

    def fake_build(args):
        pipes.append(FakePipeline(PROTOCOLS[args.protocol].background))
        return pipes[-1]

    monkeypatch.setattr("segmentation.__main__.build_pipeline", fake_build)
    argv = ["run", "--dataset", "folder", "--data", str(tmp_path / "data"), "--protocol", "paper-voc-multi",
            "--methods", "output", "attention", "--softmax", "on", "off", "--layers", "0-2", "all", "--limit", "2",
            "--out", str(tmp_path / "out"), "--no-progress", "--model", "shapes"]  # fmt: skip
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["methods"]) == 8 and results["world_size"] == 2 and sum(p.calls for p in pipes) == 2
    assert results["config"]["dataset"]["classes"] == ["background", "cat", "dog"]
    assert main(["merge", "--out", str(tmp_path / "out")]) == 0


def test_tiny_model_run(imagenet_file, tmp_path):
    """The real pipeline on a tiny random model: documented results, resume without a forward, equal shards."""
    tiny = pytest.importorskip("tiny")
    tiny.train_spiece(tmp_path / "tok", vocab_size=60)
    pipe = tiny.tiny_pipeline(tmp_path / "tok")
    calls = []
    explain = pipe.explain
    pipe.explain = lambda *a, **k: calls.append(1) or explain(*a, **k)
    path, items = imagenet_file
    data = ImageNetSegmentation(path)
    (tmp_path / "map.json").write_text(json.dumps(CLASS_MAP))
    protocol = small_imagenet_protocol().with_overrides(layers=(1, 2))
    methods = method_grid(["output", "attention", "value", "cross_attention"], [True, False], [(1, 2), (0,)],
                          [0.5], [True])  # fmt: skip
    kw = dict(limit=2, class_map=str(tmp_path / "map.json"), model="tiny", progress=False)
    one = run(pipe, data, protocol, methods, tmp_path / "one", **kw)
    assert len(calls) == 2 and len(one["methods"]) == 16
    for m in one["methods"]:
        assert 0 <= m["metrics"]["acc"] <= 1 and 0 <= m["metrics"]["map"] <= 1, m
    run(pipe, data, protocol, methods, tmp_path / "one", **kw)
    assert len(calls) == 2  # resumed from the cache
    for rank in (0, 1):
        two = run(pipe, data, protocol, methods, tmp_path / "two", rank=rank, world_size=2, **kw)
    assert len(calls) == 4
    assert [m["metrics"] for m in two["methods"]] == [m["metrics"] for m in one["methods"]]


# ---- bad input: one-line errors before the model loads, caches that never mix ----------------------------------------


def no_model(args):
    raise AssertionError("the model was loaded before the input was checked")


def folder_argv(tmp_path, *extra):
    return ["run", "--dataset", "folder", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--model", "shapes", "--layers", "0-2", "--no-progress", *extra]  # fmt: skip


BAD_ARGUMENTS = [  # (extra arguments, a piece of the message)
    (["--layers", "17-14"], "runs downwards"),
    (["--layers", ""], "not a block index"),
    (["--layers", "3,1-3"], "block 3 is named twice"),
    (["--layers", "14-17"], "has 4 double blocks"),  # the built-in model, checked from its config: no load
    (["--limit", "0"], "--limit: 0 is below 1"),
    (["--limit", "-3"], "--limit: -3 is below 1"),
    (["--samples", "0"], "--samples: 0 is below 1"),
    (["--seed", "-1"], "--seed: -1 is below 0"),
    (["--t", "1.5"], "t = 1.5: the noise level must lie in [0, 1]"),
    (["--rank", "2", "--world-size", "2"], "rank 2 is outside world size 2"),
    (["--device", "nonsense"], "is not a device"),
    (["--dtype", "float16"], "float16"),
    (["--class-map", "missing.json"], "class map 'missing.json'"),
    (["--protocol", "paper-imagenet", "--methods", "rainbow"], "invalid choice: 'rainbow'"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((["--device", "cuda"], "no usable CUDA device"))


@pytest.mark.parametrize(("extra", "message"), BAD_ARGUMENTS)
def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys, extra, message):
    write_folder(tmp_path / "data")
    monkeypatch.setattr("segmentation.__main__.build_pipeline", no_model)
    argv = folder_argv(tmp_path, *extra)
    if "--layers" in extra:
        argv.remove("0-2")
        argv.remove("--layers")
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_command_line_file_errors(tmp_path, monkeypatch, capsys):
    write_folder(tmp_path / "data")
    monkeypatch.setattr("segmentation.__main__.build_pipeline", no_model)
    (tmp_path / "file").write_text("not a folder")
    cases = [
        (folder_argv(tmp_path)[:5] + ["--out", str(tmp_path / "file")] + folder_argv(tmp_path)[7:], "is a file"),
        (folder_argv(tmp_path)[:5] + ["--out", ""] + folder_argv(tmp_path)[7:], "output folder is empty"),
        (["run", "--dataset", "folder", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "images/"),
        (["run", "--dataset", "imagenet", "--data", str(tmp_path / "file"), "--out", str(tmp_path / "o")], "HDF5"),
        (["merge", "--out", str(tmp_path / "empty")], "no shard files"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_layer_ranges():
    assert parse_layers("0-2,5") == (0, 1, 2, 5) and parse_layers("all") is None and parse_layers(" 18 ") == (18,)
    for text in ("17-14", "", "a-b", "-1", "3,3"):
        with pytest.raises(ValueError, match=f"layers {text!r}"):
            parse_layers(text)
    with pytest.raises(ValueError, match="at least one double block"):
        Method(layers=())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Method(t=-0.1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,classes\none.png\ntwo.png,dog;cat\n", "line 2 .*has no classes"),
        ("image,classes\none.png,cat\n,dog\n", "line 3 .*has no image"),
        ("image,classes\none.png,cat\ntwo.png,dog,cat\n", "line 3 has 3 fields .*separated by ';'"),
        ("image,classes\none.png,cat\n\ntwo.png,dog;cat\none.png,cat\n", r"one.png twice \(lines 2 and 5\)"),
        ("image,classes\none.png,cat\ntwo.png,dog;dog\n", "line 3: class dog is listed twice"),
        ("name,labels\none.png,cat\n", "must name the columns image,classes"),
        ('{"one.png": ["cat"], "two.png": ["dog"], "one.png": ["dog"]}', "one.png twice"),
        ('{"one.png": ["cat"], "two.png": [1, 2]}', "list of class names"),
    ],
)
def test_folder_index_errors(tmp_path, text, message):
    write_folder(tmp_path)
    (tmp_path / "concepts.csv").unlink()
    (tmp_path / ("concepts.json" if text.startswith("{") else "concepts.csv")).write_text(text)
    with pytest.raises(ValueError, match=message):
        FolderSegmentation(tmp_path)


def test_folder_index_byte_order_mark_and_shared_masks(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "concepts.csv").write_bytes("\ufeffImage, Classes\r\none.png,cat\r\ntwo.png, dog ; cat\r\n".encode())
    data = FolderSegmentation(tmp_path)  # a byte-order mark, CRLF, spaces and capitals in the header: all fine
    assert data.items == [("one.png", ["cat"]), ("two.png", ["dog", "cat"])]
    Image.fromarray(bright(block_mask(64, 64, 0, 0, 8, 8))).save(tmp_path / "images" / "one.jpg")
    (tmp_path / "concepts.csv").write_text("image,classes\none.png,cat\none.jpg,dog\n")
    with pytest.raises(ValueError, match="one.png and one.jpg would share one mask, masks/one.png"):
        FolderSegmentation(tmp_path)


def write_lookalikes(root, swap=False):
    """Two images whose names sanitise alike, with their objects in different places (swapped with swap=True)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    top, bottom = block_mask(64, 64, 0, 0, 32, 64), block_mask(64, 64, 32, 0, 64, 64)
    for name, mask in (("a b", bottom if swap else top), ("a_b", top if swap else bottom)):
        Image.fromarray(bright(mask)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "concepts.csv").write_text("image,classes\na b.png,cat\na_b.png,cat\n")


def test_cache_entries_are_unique_and_record_what_made_them(tmp_path, capsys):
    write_lookalikes(tmp_path / "data")
    protocol = small_imagenet_protocol()
    methods = method_grid(["output"], [True], [None], [0.5], [False])
    pipe = FakePipeline(protocol.background)
    pipe.dtype = torch.float32

    def oracle_acc():
        data = FolderSegmentation(tmp_path / "data")
        return run(pipe, data, protocol, methods, tmp_path / "out", class_map="none", progress=False)["methods"][0][
            "metrics"
        ]["acc"]

    assert oracle_acc() == 1 and pipe.calls == 2  # each image its own entry: the oracle is right on both
    assert len(list((tmp_path / "out" / "cache").glob("*/*.pt"))) == 2
    assert oracle_acc() == 1 and pipe.calls == 2  # resumed
    pipe.dtype = torch.bfloat16  # another dtype: another forward, recomputed
    assert oracle_acc() == 1 and pipe.calls == 4
    write_lookalikes(tmp_path / "data", swap=True)  # same names, other pictures: recomputed, still right
    assert oracle_acc() == 1 and pipe.calls == 6
    assert "made from another image" in capsys.readouterr().err
    entry = sorted((tmp_path / "out" / "cache").glob("*/*.pt"))[-1]
    entry.write_bytes(entry.read_bytes()[:100])  # an interrupted copy
    assert oracle_acc() == 1 and pipe.calls == 7
    err = capsys.readouterr().err
    assert f"cache file {entry} is damaged" in err and "recomputing it" in err


def test_weights_fingerprint(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder / "vae").mkdir(parents=True)
        (tmp_path / folder / "vae" / "config.json").write_text("{}")
        (tmp_path / folder / "big.safetensors").write_bytes(bytes(range(256)) * 20000)  # 5 MB: head and tail read
    assert weights_fingerprint(str(tmp_path / "a")) == weights_fingerprint(str(tmp_path / "b"))  # paths may differ
    data = bytearray((tmp_path / "b" / "big.safetensors").read_bytes())
    data[-1] ^= 1  # retrained: the tail of the data changes
    (tmp_path / "b" / "big.safetensors").write_bytes(bytes(data))
    assert weights_fingerprint(str(tmp_path / "a")) != weights_fingerprint(str(tmp_path / "b"))
    assert weights_fingerprint("no-such/repo-here") is None


def test_checks_before_any_forward(tmp_path):
    """An image whose mask has another size, a class missing from the map, or no qualifying image: errors before the
    first forward (they used to stop a run midway)."""
    write_folder(tmp_path / "data")
    Image.fromarray(block_mask(32, 32, 0, 0, 16, 16, 1)).save(tmp_path / "data" / "masks" / "two.png")
    multi = PROTOCOLS["paper-voc-multi"].with_overrides(**{**SMALL, "label_size": 4})
    methods = method_grid(["output"], [False], [None], [multi.t], [False])
    pipe = FakePipeline(multi.background)
    with pytest.raises(ValueError, match=r"is \(64, 64\) \(H, W\) and its mask \(32, 32\)"):
        run(pipe, FolderSegmentation(tmp_path / "data"), multi, methods, tmp_path / "out", class_map="none")
    assert pipe.calls == 0
    write_folder(tmp_path / "other")
    (tmp_path / "map.json").write_text(json.dumps({"dog": "dog"}))
    with pytest.raises(ValueError, match="'cat' has no concept in the .*map.json class map"):
        run(pipe, FolderSegmentation(tmp_path / "other"), multi, methods, tmp_path / "out",
            class_map=str(tmp_path / "map.json"))  # fmt: skip
    with pytest.raises(ValueError, match="limit = 0"):
        run(pipe, FolderSegmentation(tmp_path / "other"), multi, methods, tmp_path / "out", limit=0)
    assert pipe.calls == 0


def test_stale_shards_are_not_merged(tmp_path):
    write_folder(tmp_path / "data")
    data = FolderSegmentation(tmp_path / "data")
    multi = PROTOCOLS["paper-voc-multi"].with_overrides(**{**SMALL, "label_size": 4})
    old, new = (method_grid([s], [False], [None], [multi.t], [False]) for s in ("attention", "output"))
    pipe = FakePipeline(multi.background)
    kw = dict(world_size=2, class_map="none", progress=False)
    assert run(pipe, data, multi, old, tmp_path / "out", rank=1, **kw) is None  # an earlier run, left unfinished
    assert run(pipe, data, multi, new, tmp_path / "out", rank=0, **kw) is None  # not merged with the old shard
    results = run(pipe, data, multi, new, tmp_path / "out", rank=1, **kw)
    assert [m["name"] for m in results["methods"]] == [new[0].name]
    assert results["config_hash"] == json.loads((tmp_path / "out" / "results.json").read_text())["config_hash"]


# ---- average precision on runs of equal scores (issue 17: the metrics' fast path) ----------------------------------


def test_average_precision_on_runs_matches_sklearn():
    """AP merges runs of equal neighbouring scores before sorting. It must equal scikit-learn's (tolerance 1e-12: exact
    counts, float rounding only) on maps upsampled from a token grid (runs of 16 whose labels change inside a run), on
    the same pixels shuffled (each tied score spread over many runs), on coarse and continuous scores, and on one
    score only; and it must not depend on the pixel order."""
    rng = np.random.default_rng(17)
    y, x = np.mgrid[0:128, 0:128]
    disc = np.hypot(x - 50.5, y - 70.5) < 23  # boundaries that do not follow the 16 x 16 cells
    upsampled = np.kron(rng.random((8, 8)), np.ones((16, 16)))
    order = rng.permutation(disc.size)
    cases = {
        "token grid": (upsampled, disc),
        "token grid shuffled": (upsampled.ravel()[order], disc.ravel()[order]),
        "coarse": (np.round(rng.random(5000), 2), rng.random(5000) < 0.2),
        "continuous": (rng.random(3000), rng.random(3000) < 0.5),
        "one score": (np.full(100, 0.3), rng.random(100) < 0.3),
        "one pixel": (np.array([0.7]), np.array([True])),
    }
    errors = {}
    for name, (scores, truth) in cases.items():
        errors[name] = abs(average_precision(scores, truth) - average_precision_score(truth.ravel(), scores.ravel()))
    print("AP max abs error against sklearn:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-12
    assert average_precision(upsampled, disc) == pytest.approx(average_precision(*cases["token grid shuffled"]))
    # one tie split over two runs counts as one threshold: (2 pixels, 1 positive) -> precision 1/2 at recall 1
    assert average_precision([0.5, 0.2, 0.5], [1, 0, 0]) == pytest.approx(0.5)
    assert average_precision([0.5, 0.2, 0.5], [0, 0, 1]) == pytest.approx(0.5)


def test_a_users_results_files_are_never_overwritten(imagenet_file, tmp_path, capsys):
    """Issue 24: OUT's results.json and results.md are replaced only when they are an earlier merge's, unchanged."""
    path, _ = imagenet_file
    data = ImageNetSegmentation(path)
    protocol = small_imagenet_protocol()
    methods = method_grid(["output"], [True], [None], [0.5], [False])
    (tmp_path / "map.json").write_text(json.dumps(CLASS_MAP))
    kwargs = dict(class_map=str(tmp_path / "map.json"), progress=False)
    for name in ("results.md", "results.json"):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text("my own notes\n")
        with pytest.raises(ValueError, match="did not write") as err:
            run(FakePipeline(protocol.background), data, protocol, methods, out, **kwargs)
        assert "\n" not in str(err.value)
        assert (out / name).read_text() == "my own notes\n"
    out = tmp_path / "ours"
    run(FakePipeline(protocol.background), data, protocol, methods, out, **kwargs)
    run(FakePipeline(protocol.background), data, protocol, methods, out, **kwargs)  # an earlier merge is replaced
    (out / "results.md").write_text("edited by hand\n")
    assert main(["merge", "--out", str(out)]) == 2 and "did not write" in capsys.readouterr().err
    assert (out / "results.md").read_text() == "edited by hand\n"


def test_mask_errors_name_the_files_and_an_all_ignore_mask_is_refused(tmp_path, monkeypatch, capsys):
    write_folder(tmp_path / "data")
    monkeypatch.setattr("segmentation.__main__.build_pipeline", no_model)
    masks = tmp_path / "data" / "masks"
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(masks / "two.png")  # the image is 64 x 64
    assert main(folder_argv(tmp_path, "--protocol", "paper-voc-multi")) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "data" / "images" / "two.png") in err, err
    assert "is (64, 64) (H, W) and its mask (32, 64)" in err, err
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "two.png")  # every pixel ignored: nothing to score
    assert main(folder_argv(tmp_path, "--protocol", "paper-voc-multi")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two.png" in err and "every pixel of its mask is 255" in err, err


@pytest.mark.parametrize("shard", ["{}", "[]", '{"config": {}}', "null"])
def test_merging_a_damaged_shard_is_one_line(tmp_path, capsys, shard):
    (tmp_path / "out" / "shards").mkdir(parents=True)
    (tmp_path / "out" / "shards" / "rank-0-of-1.json").write_text(shard)
    assert main(["merge", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "rank-0-of-1.json is damaged" in err, err
