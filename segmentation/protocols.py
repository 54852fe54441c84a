"""The benchmark protocols as explicit settings, and the steps that turn concept maps into predictions.

A `Protocol` names every choice the published numbers depend on: which images count (binary tasks keep the images whose
resized label holds exactly one class), the concept list and its order, the caption, the image resizes, the label size,
the noise level t, the noise samples and their seed, the saliency space, softmax, layers, concept normalisation, the
3x3 blur, the binarisation rule, how scores for mAP are scaled, how a multi-piece concept becomes tokens, the
class-name-to-concept map and which paper-compatible figures to print. The presets reproduce the official runs
(helblazer811/ConceptAttention `experiments/`, read for this purpose; see shared/docs/evaluation.md):

- `paper-imagenet` (`run_cross_self_ablation.sh`): concepts [class, background, floor, tree, person, grass, face],
  caption "a {class}", image 512 bicubic then 1024 nearest, labels 224 nearest, t = 0.5 (schnell schedule index 2),
  5 noise samples from seed 4, output space, softmax, blocks 14-17, concept normalisation, blur, mask = map > mean(map),
  mAP scores min-max scaled; paper "mIoU" = Acc / (2 - Acc) and the two-channel AP printed beside ours.
- `paper-voc-single` (`run_concept_attention.sh`): images whose 224 label holds background + one class; concepts
  [background, floor, grass, tree, sky, class], caption "a {class}", image 512 nearest then 1024 nearest (the official
  pipeline resizes to 1024), t = 0.5128 (schedule index 3 of the resolution-shifted schnell schedule:
  e^1.15 / (e^1.15 + 3)), 1 sample from seed 0, blocks 14-18, normalisation, blur, no softmax (its flag is unused on
  that path), prediction = argmax over concepts, raw scores for the two-channel AP.
- `paper-voc-multi` (`run_multi_class_seg_experiment.py`): all val images; concepts = the five background words + the
  classes present (an oracle list); caption "a c1,a c2"; image 1024 nearest; labels 64 nearest; blocks 14-17; argmax,
  background words -> class 0; 21-class mIoU and accuracy, no mAP.

What we could not reproduce exactly: the official ImageNet class map (ours is written anew: `imagenet_names.py`); the
official `num_samples > 1` loop, which by a float-index bug reuses one noise sample (ours averages 5 different ones);
the official posterior *sample* of the VAE (ours takes the mean); and classes without pixels counted as IoU 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from concept_attention import MAX_SAMPLES

from .datasets import VOC_CLASSES
from .imagenet_names import CLASS_CONCEPTS

TASKS = ("binary", "multiclass")
RULES = ("mean", "argmax")
SCORE_SCALES = ("minmax", "raw")
RESAMPLING = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
PAPER_FIGURES = ("acc_stacked", "miou_acc", "map_two_channel")

# The official short VOC names (single T5 tokens where the VOC name is not); written out here, the others are kept.
VOC_CONCEPTS = {"aeroplane": "plane", "bicycle": "bike", "diningtable": "table", "motorbike": "motorcycle",
                "pottedplant": "pot", "tvmonitor": "monitor"}  # fmt: skip
CLASS_MAPS: dict[str, dict[str, str]] = {
    "none": {},
    "imagenet": CLASS_CONCEPTS,
    "voc": {name: VOC_CONCEPTS.get(name, name) for name in VOC_CLASSES[1:]},
}


@dataclass(frozen=True)
class Protocol:
    name: str
    task: str  # binary (one object vs the rest) | multiclass (every class present)
    background: tuple[str, ...]  # concept words for the background, added to each image's class concepts
    class_first: bool  # class concept(s) before the background words (ImageNet) or after them (VOC)
    caption: str  # prompt per class concept; several are joined with ","
    resize: tuple[tuple[int, str], ...]  # successive square resizes of the image: (size, resampling)
    label_size: int  # labels are resized (nearest) to this square size and scored there
    t: float  # noise level of the explain forward
    num_samples: int  # noise samples averaged (seeds seed..seed+n-1)
    seed: int
    space: str  # output | attention | value | cross_attention
    softmax: bool  # softmax over concepts per layer before averaging
    layers: tuple[int, ...] | None  # double blocks averaged; None = all
    normalize: bool  # the official concept normalisation of o_c
    blur: bool  # 3x3 Gaussian, sigma 1, reflect padding, on the token-grid maps
    rule: str  # binary prediction: mean (map > its mean) | argmax (the class wins the argmax over concepts)
    score_scale: str  # mAP scores: minmax (per image) | raw
    token_rule: str  # first | mean | pieces (see concept_attention.Settings)
    class_map: str  # none | imagenet | voc: class name -> concept word
    paper: tuple[str, ...] = ()  # paper-compatible figures to print: acc_stacked, miou_acc, map_two_channel

    def __post_init__(self):
        for field, value, allowed in (("task", self.task, TASKS), ("rule", self.rule, RULES),
                                      ("score_scale", self.score_scale, SCORE_SCALES),
                                      ("class_map", self.class_map, tuple(CLASS_MAPS))):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"Protocol.{field} = {value!r}; choose one of {', '.join(allowed)}")
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"Protocol.t = {self.t}: the noise level must lie in [0, 1]")
        if not 1 <= self.num_samples <= MAX_SAMPLES:
            raise ValueError(f"Protocol.num_samples = {self.num_samples}: give 1 to {MAX_SAMPLES} noise samples")
        if not 0 <= self.seed <= 2**63 - self.num_samples:
            raise ValueError(f"Protocol.seed = {self.seed}: seeds {self.seed}..{self.seed + self.num_samples - 1} must "
                             f"lie in [0, 2**63)")  # fmt: skip
        if not self.resize or any(s % 16 or s <= 0 or m not in RESAMPLING for s, m in self.resize):
            raise ValueError(f"Protocol.resize = {self.resize}: give (size, {'|'.join(RESAMPLING)}) pairs, the last "
                             "size a positive multiple of 16 (sizes must be multiples of 16)")  # fmt: skip
        if self.label_size <= 0:
            raise ValueError(f"Protocol.label_size = {self.label_size}: must be positive")
        if "{name}" not in self.caption and self.caption:
            raise ValueError(f"Protocol.caption = {self.caption!r}: use {{name}} for the class concept, or ''")
        if set(self.paper) - set(PAPER_FIGURES):
            raise ValueError(f"Protocol.paper = {self.paper}; choose from {', '.join(PAPER_FIGURES)}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def to_json(self) -> dict:
        return asdict(self)

    def with_overrides(self, **changes) -> Protocol:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


VOC_T = math.exp(1.15) / (math.exp(1.15) + 3.0)  # schnell schedule index 3 of 4, shifted for 4096 tokens: 0.5128

PROTOCOLS: dict[str, Protocol] = {
    "paper-imagenet": Protocol(
        name="paper-imagenet", task="binary", background=("background", "floor", "tree", "person", "grass", "face"),
        class_first=True, caption="a {name}", resize=((512, "bicubic"), (1024, "nearest")), label_size=224, t=0.5,
        num_samples=5, seed=4, space="output", softmax=True, layers=(14, 15, 16, 17), normalize=True, blur=True,
        rule="mean", score_scale="minmax", token_rule="first", class_map="imagenet",
        paper=("miou_acc", "map_two_channel"),
    ),
    "paper-voc-single": Protocol(
        name="paper-voc-single", task="binary", background=("background", "floor", "grass", "tree", "sky"),
        class_first=False, caption="a {name}", resize=((512, "nearest"), (1024, "nearest")), label_size=224,
        t=round(VOC_T, 4), num_samples=1, seed=0, space="output", softmax=False, layers=(14, 15, 16, 17, 18),
        normalize=True, blur=True, rule="argmax", score_scale="raw", token_rule="first", class_map="voc",
        paper=("acc_stacked", "map_two_channel"),
    ),
    "paper-voc-multi": Protocol(
        name="paper-voc-multi", task="multiclass", background=("background", "floor", "grass", "tree", "sky"),
        class_first=False, caption="a {name}", resize=((1024, "nearest"),), label_size=64, t=round(VOC_T, 4),
        num_samples=1, seed=0, space="output", softmax=False, layers=(14, 15, 16, 17), normalize=True, blur=False,
        rule="argmax", score_scale="raw", token_rule="first", class_map="voc",
    ),
}  # fmt: skip


def load_class_map(spec: str) -> dict[str, str]:
    """A named map (none, imagenet, voc) or a JSON file {class name: concept word}."""
    if spec in CLASS_MAPS:
        return CLASS_MAPS[spec]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"class map {spec!r}: neither {', '.join(CLASS_MAPS)} nor a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as error:  # invalid JSON or not UTF-8
        raise ValueError(f"{path} is not a JSON file ({error}); a class map is {{class name: concept word}}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise ValueError(f"{path}: a class map is a JSON object {{class name: concept word}} (non-empty strings)")
    return data


def concepts_for(protocol: Protocol, classes: list[str], class_map: dict[str, str], name_map: str = "none"):
    """Concept list, caption and, per concept, the class it votes for (None = background) for one image.
    A class missing from a named map is an error; with the identity map ('none') the class name is the concept."""
    words = []
    for c in classes:
        if c not in class_map and name_map != "none":
            raise ValueError(f"class {c!r} has no concept in the {name_map} class map; pass --class-map FILE.json")
        words.append(class_map.get(c, c))
    background = [w for w in protocol.background if w not in words]  # a class word wins over a background word
    owners = [None] * len(background)
    if protocol.class_first:
        concepts, owners = words + background, list(classes) + owners
    else:
        concepts, owners = background + words, owners + list(classes)
    caption = ",".join(protocol.caption.format(name=w) for w in words) if protocol.caption else ""
    return concepts, caption, owners


def resize_image(image: Image.Image, stages: tuple[tuple[int, str], ...]) -> Image.Image:
    for size, mode in stages:
        image = image.resize((size, size), RESAMPLING[mode])
    return image


def resize_label(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


def gaussian_kernel3(sigma: float = 1.0) -> Tensor:
    x = torch.tensor([-1.0, 0.0, 1.0])
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    return torch.outer(k, k)  # (3, 3)


def blur3x3(maps: Tensor, sigma: float = 1.0) -> Tensor:
    """3x3 Gaussian blur of each map [C, h, w] with reflect padding (torchvision's gaussian_blur, as officially)."""
    c, dtype = maps.shape[0], torch.promote_types(maps.dtype, torch.float32)
    kernel = gaussian_kernel3(sigma).to(maps.device, dtype)[None, None].expand(c, 1, 3, 3)
    x = F.pad(maps[None].to(dtype), (1, 1, 1, 1), mode="reflect")  # (1, C, h+2, w+2)
    return F.conv2d(x, kernel, groups=c)[0].to(maps.dtype)


def upsample_nearest(x: Tensor, size: int) -> Tensor:
    """[h, w] -> [size, size] with torch's nearest (the official predictions and scores go through F.interpolate)."""
    return F.interpolate(x[None, None].float(), size=(size, size), mode="nearest")[0, 0]


def binary_prediction(maps: Tensor, target: int, rule: str) -> Tensor:
    """Foreground mask on the token grid: the target map above its mean, or the target winning the argmax."""
    if rule == "mean":
        return maps[target] > maps[target].mean()
    return maps.argmax(dim=0) == target


def score_map(maps: Tensor, target: int, scale: str) -> Tensor:
    x = maps[target].float()
    if scale == "minmax":
        span = x.max() - x.min()
        x = (x - x.min()) / span if span > 0 else torch.zeros_like(x)
    return x


def multiclass_prediction(maps: Tensor, labels: list[int]) -> Tensor:
    """Class index per token: the argmax concept's label (background words -> 0)."""
    return torch.tensor(labels, dtype=torch.long)[maps.argmax(dim=0)]
