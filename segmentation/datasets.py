"""Readers for the real files of the two benchmarks and for a user's own folder of masks.

Every reader gives, per image, a `Sample`: the RGB image, an integer mask (0 = background, 255 = ignored, any other
value = the class named in `Sample.classes`), and a stable `key` (used to name cache files and to shard). Labels can be
read without decoding the image (`label(i)`), so a protocol can pick its subset cheaply.

- `ImageNetSegmentation`: `gtsegs_ijcv.mat` (Guillaumin et al., IJCV 2014; MATLAB v7.3, i.e. HDF5). Its struct
  `value` holds four (N, 1) arrays of object references: `img` -> uint8 (3, W, H) (MATLAB is column-major, so an
  image is read transposed to (H, W, 3)), `gt` -> a cell of references whose first entry -> uint8 (W, H) mask in
  {0, 1}, `id` and `target` -> uint16 character arrays (`n02105162_7406`, `n02105162`). Follows the layout the
  official ConceptAttention and Chefer et al. loaders read; differs in: the class name comes from our WordNet table
  (`imagenet_names.py`), not NLTK, and nothing is converted to PNG first.
- `VOCSegmentation`: `VOCdevkit/VOC2012` with `JPEGImages/`, `SegmentationClass/` (palette PNGs, 0 = background,
  1..20 = classes, 255 = boundary) and `ImageSets/Segmentation/<split>.txt`.
- `FolderSegmentation`: `images/`, `masks/<image stem>.png` and `concepts.csv` (columns `image,classes`, classes
  separated by `;`; UTF-8, with or without a byte-order mark) or `concepts.json` (`{"image.jpg": ["cat", "dog"]}`);
  mask value k = the k-th listed class. A row with a missing field or an extra one (a `,` where `;` separates
  classes), an image listed twice, and two images that would share one mask file are errors naming the line.

Cache keys are unique per image: the ImageNet index, the VOC name, or for a folder the sanitised name plus a hash of
the exact file name (`a b.png` and `a_b.png` sanitise alike; `Cat.png` and `cat.png` meet on a case-insensitive disk).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .imagenet_names import WNID_NAMES

IMAGENET_SOURCE = (
    "download gtsegs_ijcv.mat (Guillaumin et al., 'ImageNet auto-annotation with segmentation propagation', IJCV "
    "2014) from http://calvin-vision.net/bigstuff/proj-imagenet/data/gtsegs_ijcv.mat"
)
VOC_SOURCE = (
    "download VOCtrainval_11-May-2012.tar from the PASCAL VOC 2012 page "
    "(http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and unpack it; the folder holds VOCdevkit/VOC2012"
)
FOLDER_LAYOUT = (
    "expected DIR/images/NAME.jpg|png, DIR/masks/NAME.png (0 = background, k = the k-th class listed for the image, "
    "255 = ignore) and DIR/concepts.csv (columns image,classes; classes separated by ';') or DIR/concepts.json "
    '({"NAME.jpg": ["cat", "dog"]})'
)
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")  # fmt: skip


@dataclass
class Sample:
    key: str
    image: Image.Image  # RGB
    mask: np.ndarray  # (H, W) uint8: 0 background, 255 ignore, other values -> classes
    classes: dict[int, str]  # mask value -> class name, for the values present


def safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def unique_key(name: str) -> str:
    """A file-name-safe key for `name`, distinct for distinct names: its readable part plus a hash of the exact name."""
    return f"{safe_key(name)[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


def check_mask(mask: np.ndarray, allowed: set[int], path: str) -> np.ndarray:
    if mask.ndim != 2:
        raise ValueError(f"{path}: a mask must be one channel of class indices, got shape {mask.shape}")
    bad = sorted(set(np.unique(mask).tolist()) - allowed)
    if bad:
        raise ValueError(f"{path}: mask values {bad[:8]} are not class indices (allowed: {sorted(allowed)})")
    return mask.astype(np.uint8)


class ImageNetSegmentation:
    """The 4,276 binary-mask images of `gtsegs_ijcv.mat`; each image's class is the WordNet first lemma of its id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "gtsegs_ijcv.mat"
        if not self.path.is_file():
            raise FileNotFoundError(f"ImageNet-Segmentation file {self.path} not found; {IMAGENET_SOURCE}")
        try:
            import h5py
        except ImportError as e:
            raise ImportError("reading gtsegs_ijcv.mat needs h5py: pip install h5py") from e
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(f"{self.path} is not a MATLAB v7.3 (HDF5) file ({e}); {IMAGENET_SOURCE}") from e
        missing = [k for k in ("img", "gt", "id") if f"value/{k}" not in self.file]
        if missing:
            raise ValueError(f"{self.path} has no value/{missing[0]} array: not gtsegs_ijcv.mat; {IMAGENET_SOURCE}")
        self.refs = {k: self.file[f"value/{k}"][()].ravel() for k in ("img", "gt", "id")}
        if len({len(r) for r in self.refs.values()}) != 1:
            raise ValueError(f"{self.path}: value/img, value/gt and value/id have different lengths")
        self.ids = [self._text(r) for r in self.refs["id"]]
        self.class_names = None  # binary masks with a per-image class

    def _text(self, ref) -> str:
        return "".join(chr(c) for c in np.asarray(self.file[ref]).ravel())

    def __len__(self) -> int:
        return len(self.ids)

    def key(self, i: int) -> str:
        return f"{i:05d}-{safe_key(self.ids[i])}"

    def where(self, i: int) -> str:
        """The image as a user finds it, for messages."""
        return f"{self.path} image {i} ({self.ids[i]})"

    def size(self, i: int) -> tuple[int, int]:
        """(H, W) of the image, from its array's shape (stored (3, W, H), or (W, H) for grey)."""
        shape = self.file[self.refs["img"][i]].shape
        return shape[-1], shape[-2]

    def class_name(self, i: int) -> str:
        wnid = self.ids[i].split("_")[0]
        return WNID_NAMES.get(wnid, wnid)

    def label(self, i: int) -> tuple[np.ndarray, dict[int, str]]:
        cell = self.file[self.refs["gt"][i]]
        mask = np.asarray(self.file[cell[()].ravel()[0]]).T  # (W, H) -> (H, W)
        return check_mask(mask, {0, 1}, f"{self.path} value/gt[{i}]"), {1: self.class_name(i)}

    def __getitem__(self, i: int) -> Sample:
        pixels = np.asarray(self.file[self.refs["img"][i]])
        if pixels.ndim == 2:  # a grey image: (W, H)
            pixels = np.repeat(pixels[None], 3, axis=0)
        image = Image.fromarray(np.ascontiguousarray(pixels.transpose(2, 1, 0)).astype(np.uint8))  # (H, W, 3)
        mask, classes = self.label(i)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"{self.path} image {i}: mask {mask.shape} and image {image.size[::-1]} differ in size")
        return Sample(self.key(i), image, mask, classes)

    def describe(self) -> dict:
        return {"dataset": "imagenet", "path": str(self.path), "images": len(self)}


class VOCSegmentation:
    """PASCAL VOC 2012 segmentation (`val`: 1,449 images); masks keep the VOC class indices."""

    class_names = VOC_CLASSES

    def __init__(self, root: str | Path, split: str = "val"):
        root = Path(root)
        candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
        found = [c for c in candidates if (c / "SegmentationClass").is_dir()]
        if not found:
            raise FileNotFoundError(f"no VOC2012 folder (with SegmentationClass/) at {root}; {VOC_SOURCE}")
        self.root, self.split = found[0], split
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"split file {split_file} not found; {VOC_SOURCE}")
        self.names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        twice = sorted({n for n in self.names if self.names.count(n) > 1}) if len(set(self.names)) < len(self) else []
        if twice:
            raise ValueError(f"{split_file} lists {twice[0]} twice; each image must be listed once")
        for name in self.names[:1] + self.names[-1:]:  # fail early on a half-unpacked folder
            for path in (self.image_path(name), self.mask_path(name)):
                if not path.is_file():
                    raise FileNotFoundError(f"{path} (listed in {split_file}) not found; {VOC_SOURCE}")

    def image_path(self, name: str) -> Path:
        return self.root / "JPEGImages" / f"{name}.jpg"

    def mask_path(self, name: str) -> Path:
        return self.root / "SegmentationClass" / f"{name}.png"

    def __len__(self) -> int:
        return len(self.names)

    def key(self, i: int) -> str:
        return safe_key(self.names[i])

    def where(self, i: int) -> str:
        return f"{self.image_path(self.names[i])} (mask {self.mask_path(self.names[i])})"

    def size(self, i: int) -> tuple[int, int]:
        """(H, W) of the image, from its header."""
        path = self.image_path(self.names[i])
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found; {VOC_SOURCE}")
        with Image.open(path) as image:
            return image.height, image.width

    def label(self, i: int) -> tuple[np.ndarray, dict[int, str]]:
        path = self.mask_path(self.names[i])
        if not path.is_file():
            raise FileNotFoundError(f"mask {path} not found; {VOC_SOURCE}")
        png = Image.open(path)
        if png.mode not in ("P", "L"):
            raise ValueError(f"{path}: mode {png.mode}; VOC masks are palette PNGs of class indices")
        mask = check_mask(np.asarray(png), set(range(len(VOC_CLASSES))) | {255}, str(path))
        return mask, {int(v): VOC_CLASSES[v] for v in np.unique(mask) if v not in (0, 255)}

    def __getitem__(self, i: int) -> Sample:
        path = self.image_path(self.names[i])
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found; {VOC_SOURCE}")
        mask, classes = self.label(i)
        return Sample(self.key(i), Image.open(path).convert("RGB"), mask, classes)

    def describe(self) -> dict:
        return {"dataset": "voc", "path": str(self.root), "split": self.split, "images": len(self)}


class FolderSegmentation:
    """A user's images, masks and class lists; classes get global indices 1..K in sorted order."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "images").is_dir():
            raise FileNotFoundError(f"no images/ folder in {self.root}; {FOLDER_LAYOUT}")
        self.items = self._read_index()
        names = sorted({c for _, classes in self.items for c in classes})
        self.class_names = ("background", *names)
        masks: dict[str, str] = {}
        for image, _ in self.items:
            if not (self.root / "images" / image).is_file():
                raise FileNotFoundError(f"{self.root / 'images' / image} (listed in the concepts file) not found")
            stem = Path(image).stem
            if stem in masks:
                raise ValueError(f"{self.root}: images {masks[stem]} and {image} would share one mask, "
                                 f"masks/{stem}.png; rename one of them")  # fmt: skip
            masks[stem] = image

    def _read_index(self) -> list[tuple[str, list[str]]]:
        csv_path, json_path = self.root / "concepts.csv", self.root / "concepts.json"
        if csv_path.is_file():
            return read_concepts_csv(csv_path)
        if json_path.is_file():
            return read_concepts_json(json_path)
        raise FileNotFoundError(f"no concepts.csv or concepts.json in {self.root}; {FOLDER_LAYOUT}")

    def __len__(self) -> int:
        return len(self.items)

    def key(self, i: int) -> str:
        return unique_key(self.items[i][0])

    def where(self, i: int) -> str:
        image = self.items[i][0]
        return f"{self.root / 'images' / image} (mask {self.root / 'masks' / Path(image).stem}.png)"

    def size(self, i: int) -> tuple[int, int]:
        """(H, W) of the image, from its header."""
        path = self.root / "images" / self.items[i][0]
        with Image.open(path) as image:
            return image.height, image.width

    def label(self, i: int) -> tuple[np.ndarray, dict[int, str]]:
        image, classes = self.items[i]
        path = self.root / "masks" / f"{Path(image).stem}.png"
        if not path.is_file():
            raise FileNotFoundError(f"mask {path} for {image} not found; {FOLDER_LAYOUT}")
        png = Image.open(path)
        if png.mode == "1":
            png = png.convert("L").point(lambda v: 1 if v else 0)
        if png.mode not in ("P", "L"):
            raise ValueError(f"{path}: mode {png.mode}; save masks as one-channel PNGs of class indices")
        local = np.asarray(png)
        if len(classes) == 1 and set(np.unique(local).tolist()) <= {0, 255}:
            local = (local == 255).astype(np.uint8)  # a black-and-white mask of one class: white is the object
        local = check_mask(local, set(range(len(classes) + 1)) | {255}, str(path))
        lookup = np.full(256, 255, dtype=np.uint8)
        lookup[0] = 0
        for k, name in enumerate(classes, start=1):
            lookup[k] = self.class_names.index(name)
        mask = lookup[local]
        return mask, {int(v): self.class_names[v] for v in np.unique(mask) if v not in (0, 255)}

    def __getitem__(self, i: int) -> Sample:
        mask, classes = self.label(i)
        image = Image.open(self.root / "images" / self.items[i][0]).convert("RGB")
        if mask.shape != (image.height, image.width):
            raise ValueError(f"{self.items[i][0]}: mask {mask.shape} and image {image.size[::-1]} differ in size")
        return Sample(self.key(i), image, mask, classes)

    def describe(self) -> dict:
        return {"dataset": "folder", "path": str(self.root), "images": len(self), "classes": list(self.class_names)}


def read_concepts_csv(path: Path) -> list[tuple[str, list[str]]]:
    """Rows `image,classes` (classes separated by `;`) after a header naming those columns; blank lines skipped."""
    usage = "each line is image,classes with the classes separated by ';' (two.png,dog;cat)"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is dropped
            reader = csv.reader(f)
            lines = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    except csv.Error as error:
        raise ValueError(f"{path}: {error}; {usage}") from None
    if not lines:
        raise ValueError(f"{path} is empty; it needs a header line image,classes and one line per image")
    header = [cell.strip().lower() for cell in lines[0][1]]
    if "image" not in header or "classes" not in header:
        raise ValueError(f"{path}: the first line must name the columns image,classes, got {','.join(header)}")
    column, first_line = {name: header.index(name) for name in ("image", "classes")}, {}
    items = []
    for number, row in lines[1:]:
        where = f"{path} line {number}"
        if len(row) > len(header):
            raise ValueError(f"{where} has {len(row)} fields ({','.join(row)}) where the header has {len(header)}: "
                             f"{usage}; quote a file name that holds a comma")  # fmt: skip
        image = row[column["image"]].strip() if len(row) > column["image"] else ""
        classes = row[column["classes"]] if len(row) > column["classes"] else ""
        if not image or not classes.strip():
            missing = "image" if not image else "classes"
            raise ValueError(f"{where} ({','.join(row)}) has no {missing}: {usage}")
        if image in first_line:
            raise ValueError(f"{path} lists {image} twice (lines {first_line[image]} and {number}); list each once")
        first_line[image] = number
        items.append((image, check_classes([c.strip() for c in classes.split(";") if c.strip()], where)))
    if not items:
        raise ValueError(f"{path} lists no images: {usage}")
    return items


def read_concepts_json(path: Path) -> list[tuple[str, list[str]]]:
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"{path} lists {twice[0]} twice; list each image once")
        return dict(pairs)

    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {FOLDER_LAYOUT}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: must map each image file name to a list of classes; {FOLDER_LAYOUT}")
    items = []
    for image, classes in data.items():
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f'{path}: {image} must map to a list of class names (strings), like ["cat", "dog"]')
        items.append((image, check_classes([c.strip() for c in classes if c.strip()], f"{path} entry {image}")))
    return items


def check_classes(classes: list[str], where: str) -> list[str]:
    if not classes:
        raise ValueError(f"{where}: the image needs at least one class")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise ValueError(f"{where}: class {twice[0]} is listed twice for one image")
    return classes


def open_dataset(kind: str, path: str | Path, split: str = "val"):
    if kind == "imagenet":
        return ImageNetSegmentation(path)
    if kind == "voc":
        return VOCSegmentation(path, split)
    if kind == "folder":
        return FolderSegmentation(path)
    raise ValueError(f"dataset {kind!r}; choose imagenet, voc or folder")
