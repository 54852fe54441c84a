"""Zero-shot segmentation benchmark for ConceptAttention: dataset readers, metrics, the paper's protocols and a
resumable, shardable runner. Command line: `python -m segmentation run ...` and `python -m segmentation merge ...`."""

from .datasets import FolderSegmentation, ImageNetSegmentation, Sample, VOCSegmentation, open_dataset
from .metrics import ImageStats, average_precision, paper_imagenet_miou, summarize, two_channel_average_precision
from .protocols import PROTOCOLS, Protocol, blur3x3
from .run import Method, merge, method_grid, parse_layers, run

__all__ = [
    "PROTOCOLS",
    "FolderSegmentation",
    "ImageNetSegmentation",
    "ImageStats",
    "Method",
    "Protocol",
    "Sample",
    "VOCSegmentation",
    "average_precision",
    "blur3x3",
    "merge",
    "method_grid",
    "open_dataset",
    "paper_imagenet_miou",
    "parse_layers",
    "run",
    "summarize",
    "two_channel_average_precision",
]
