"""Segmentation metrics as per-image sufficient statistics, so shards of a run merge into the numbers of one run.

Definitions (see shared/docs/evaluation.md):
- pixel accuracy: correct / labelled pixels, both summed over the dataset (255 = ignored, never labelled);
- mIoU: per class, intersection / union summed over the dataset, then the mean over the classes whose union is not
  empty (a class that never occurs in a prediction or a label has no IoU; the official scripts count it as 0, which
  only matters on a `--limit`ed run);
- mAP: the mean over images of the average precision of the flattened foreground score map against the binary label
  (ignored pixels dropped; an image without a foreground pixel has no AP and is left out of the mean).

Paper-compatible figures, printed beside ours and labelled as such (each is what the official script computes):
- ImageNet "mIoU" = Acc / (2 - Acc): its IoU code compares the stacked (1 - mask, mask) channels without an argmax,
  so each class's "intersection" is every correct pixel and its "union" is 2N - correct;
- two-channel AP (ImageNet and VOC single-class mAP): the AP of the concatenated channels (1 - s, s) against
  (1 - y, y), which depends on how the scores are scaled (min-max for ImageNet, raw for VOC);
- VOC single-class accuracy: the stacked-channel accuracy counts an ignored pixel as labelled and wrong in one of
  the two channels: 2 correct / (2 labelled + ignored).

Follows Chefer et al.'s and the official ConceptAttention metric code in what is measured; differs in: integer
bincounts instead of float histograms, AP written out (equal to scikit-learn's `average_precision_score`) and
computed on runs of equal neighbouring scores (a map upsampled from the token grid has few, so AP sorts those instead
of every pixel: about 3x faster per image at 128 px), and no class without pixels averaged in as a zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

IGNORE = 255
DEFINITIONS = {
    "acc": "correct / labelled pixels, summed over the images (label 255 ignored)",
    "miou": "mean over classes with a non-empty union of intersection / union, each summed over the images",
    "map": "mean over images with a foreground pixel of the foreground AP (equal to sklearn average_precision_score); "
    "multi-class tasks: per image, the mean AP of each listed class present against its own mask",
    "paper_acc": "official VOC single-class stacked-channel accuracy: 2 correct / (2 labelled + ignored)",
    "paper_miou": "official ImageNet stacked-channel 'mIoU', which equals Acc / (2 - Acc)",
    "paper_map": "official two-channel AP: AP of (1 - s, s) against (1 - y, y), averaged over images",
}


@dataclass
class ImageStats:
    """What one image adds to each metric; `index` orders images so merged shards sum in the same order."""

    index: int
    key: str
    intersection: list[int]  # per class
    union: list[int]  # per class
    correct: int
    labelled: int
    ignored: int
    ap: float | None = None  # foreground AP, or the mean AP of the classes present (None: nothing to score)
    ap_two_channel: float | None = None  # the paper's stacked-channel AP
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ImageStats:
        return cls(**data)


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Per-class intersection and union, correct, labelled and ignored pixel counts of one image.
    pred and label are integer arrays of one shape; label 255 is ignored; pred must lie in [0, num_classes)."""
    pred, label = np.asarray(pred).ravel().astype(np.int64), np.asarray(label).ravel().astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.size} pixels, label {label.size}: resize one to the other first")
    valid = label != IGNORE
    p, y = pred[valid], label[valid]
    if p.size and (p.min() < 0 or p.max() >= num_classes or y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes}) (255 = ignore in labels)")
    counts = np.bincount(y * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)  # [y, p]
    intersection = np.diagonal(counts)
    union = counts.sum(0) + counts.sum(1) - intersection
    return intersection, union, int(intersection.sum()), p.size, label.size - p.size


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP: sum over distinct score thresholds of (recall step) x precision. NaN without positives.

    Maps upsampled from the token grid hold long runs of equal neighbouring scores, so the pixels are first merged
    into runs (value, pixel count, positive count) and only the runs are sorted; the counts at each threshold, hence
    the result, are exactly those of sorting every pixel."""
    scores, positives = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(positives).ravel().astype(bool)
    if not positives.any():
        return float("nan")
    ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))  # last pixel of each run
    values = scores[ends]
    pixels = ends.copy()
    pixels[0] += 1
    pixels[1:] -= ends[:-1]
    hits = np.cumsum(positives)[ends]
    hits[1:] -= hits[:-1].copy()
    order = np.argsort(-values)  # any order within ties: tied runs are grouped below
    values = values[order]
    last = np.flatnonzero(np.append(values[1:] != values[:-1], True))  # last run of each group of tied scores
    tp = np.cumsum(hits[order])[last]  # positives scoring at least each distinct score
    precision = tp / np.cumsum(pixels[order])[last]
    recall = tp / tp[-1]
    recall[1:] -= recall[:-1].copy()  # the recall step of each threshold
    return float(np.sum(recall * precision))


def two_channel_average_precision(scores: np.ndarray, label: np.ndarray) -> float:
    """The official scripts' AP: (1 - s, s) stacked against the one-hot (1 - y, y), flattened, ignored dropped."""
    scores, label = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(label).ravel()
    valid = label != IGNORE
    s, y = scores[valid], label[valid] == 1
    return average_precision(np.concatenate([1 - s, s]), np.concatenate([~y, y]))


def image_stats(index: int, key: str, pred: np.ndarray, label: np.ndarray, num_classes: int,
                scores: np.ndarray | dict[int, np.ndarray] | None = None) -> ImageStats:  # fmt: skip
    """All statistics of one image. `scores`: the foreground score map at the label's size (binary tasks), or one
    score map per listed class index (multi-class tasks: AP per class present, averaged)."""
    intersection, union, correct, labelled, ignored = confusion(pred, label, num_classes)
    ap = ap2 = None
    flat = np.asarray(label).ravel()
    valid = flat != IGNORE
    if isinstance(scores, dict):  # multi-class: the mean AP of the listed classes present in the label
        labels = flat[valid]
        present = {c: truth for c in scores if (truth := labels == c).any()}
        aps = [average_precision(np.asarray(scores[c]).ravel()[valid], truth) for c, truth in present.items()]
        ap = float(np.mean(aps)) if aps else None
    elif scores is not None:
        fg = flat[valid] == 1
        ap = average_precision(np.asarray(scores).ravel()[valid], fg) if fg.any() else None
        ap2 = two_channel_average_precision(scores, label)
    return ImageStats(index, key, intersection.tolist(), union.tolist(), correct, labelled, ignored, ap, ap2)


def paper_imagenet_miou(accuracy: float) -> float:
    """The official ImageNet-Segmentation "mIoU": Acc / (2 - Acc) (see the module docstring)."""
    return accuracy / (2.0 - accuracy)


def summarize(stats: list[ImageStats], class_names: tuple[str, ...], paper: tuple[str, ...] = ()) -> dict:
    """Dataset numbers from per-image statistics (sorted by index first, so any shard split sums identically).
    `paper` names the paper-compatible figures to add: "acc_stacked", "miou_acc", "map_two_channel"."""
    stats = sorted(stats, key=lambda s: s.index)
    num_classes = len(class_names)
    intersection = np.zeros(num_classes, dtype=np.int64)
    union = np.zeros(num_classes, dtype=np.int64)
    for s in stats:
        intersection += np.asarray(s.intersection, dtype=np.int64)
        union += np.asarray(s.union, dtype=np.int64)
    correct = sum(s.correct for s in stats)
    labelled = sum(s.labelled for s in stats)
    ignored = sum(s.ignored for s in stats)
    present = union > 0
    iou = {name: float(intersection[i] / union[i]) for i, name in enumerate(class_names) if present[i]}
    aps = [s.ap for s in stats if s.ap is not None]
    out = {
        "images": len(stats),
        "acc": correct / labelled if labelled else float("nan"),
        "miou": float(np.mean(list(iou.values()))) if iou else float("nan"),
        "map": float(np.mean(aps)) if aps else None,
        "map_images": len(aps),
        "iou": iou,
        "pixels": {"correct": correct, "labelled": labelled, "ignored": ignored},
    }
    if "acc_stacked" in paper:
        out["paper_acc"] = 2 * correct / (2 * labelled + ignored) if labelled else float("nan")
    if "miou_acc" in paper:
        out["paper_miou"] = paper_imagenet_miou(out["acc"])
    if "map_two_channel" in paper:
        aps2 = [s.ap_two_channel for s in stats if s.ap_two_channel is not None]
        out["paper_map"] = float(np.mean(aps2)) if aps2 else None
    return out
