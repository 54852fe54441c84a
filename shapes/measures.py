"""What the shapes evaluation measures: map mIoU against the scenes' exact masks, and where the concept queries'
attention goes (its budget, and per double block its routing diagnostics).

Follows the prototype's notes (shapes-notes.md): each map is bilinearly upsampled to the image, thresholded at its mean
and compared with the exact mask; for every shape present in a scene the foreground and background IoUs are averaged
("mIoU"), `fg` is the foreground IoU alone. `attention_budget` and `routing_diagnostics` are the model card's
diagnostics (`budget/*`, `routing/*` in a run's log.jsonl); `shapes.eval` says what each key means.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from shapes.scenes import SHAPES, Scene

CONCEPTS = (*SHAPES, "background")


def iou(pred: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """pred, masks (K, H, W) bool -> foreground IoU and background IoU (K,)."""
    fg = (pred & masks).sum((1, 2)) / (pred | masks).sum((1, 2)).clamp(min=1)
    bg = (~pred & ~masks).sum((1, 2)) / (~pred | ~masks).sum((1, 2)).clamp(min=1)
    return fg.float(), bg.float()


def score(maps: Tensor, scenes: list[Scene], words: list[list[str]], scored=SHAPES) -> dict[str, float]:
    """maps (B, C, h, w); words[b][c] names concept c of scene b. Scores every `scored` word present in its scene:
    `miou` and `fg` threshold each map at its own mean (the card's metric); `argmax` and `argmax_fg` give each pixel to
    the concept whose map is highest there (the segmentation harness's masks) and score the same IoUs, so a word is
    credited only where its map beats the other words' maps: a map that is the same for every word, however well it
    finds the objects, gives them all to one word. A softmax over the concepts does not change these two. Every map
    is read at the image's pixels, bilinearly upsampled once."""
    B, C, h, w = maps.shape
    size = scenes[0].image.shape[:2]
    up = F.interpolate(maps.float().reshape(B * C, 1, h, w), size=size, mode="bilinear", align_corners=False)
    up = up.reshape(B, C, *size)
    labels = up.argmax(1)  # (B, H, W): each pixel's strongest concept
    above, won, masks = [], [], []
    for b, scene in enumerate(scenes):
        for c, word in enumerate(words[b]):
            if word in scored and word in scene.masks:
                above.append(up[b, c] > up[b, c].mean())
                won.append(labels[b] == c)
                masks.append(torch.from_numpy(scene.masks[word]))
    masks = torch.stack(masks).to(maps.device)
    fg, bg = iou(torch.stack(above), masks)
    fg_won, bg_won = iou(torch.stack(won), masks)
    return {
        "miou": ((fg + bg) / 2).mean().item(),
        "fg": fg.mean().item(),
        "argmax": ((fg_won + bg_won) / 2).mean().item(),
        "argmax_fg": fg_won.mean().item(),
    }


def attention_budget(
    sal: list, scenes: list[Scene], h: int, w: int, concepts: tuple[str, ...] = CONCEPTS
) -> dict[str, float]:
    """Where the concept queries' attention goes, averaged over blocks, heads and the shapes present in each scene:
    `image_mass` the share on image tokens (the rest is on the concepts), `entropy` of the image part normalised to
    [0, 1] (1 = uniform over the tokens), `lift` the image attention on the named shape's tokens over the shape's
    share of the image (1 = no preference; a map that localises has lift well above 1)."""
    weights = torch.stack([s.attention.mean(1) for s in sal]).mean(0)  # (B, C, N) image columns, heads averaged
    mass, entropy, lift = [], [], []
    for b, scene in enumerate(scenes):
        for c, word in enumerate(concepts):
            if word in SHAPES and word in scene.masks:
                p = weights[b, c].cpu()
                area = F.adaptive_avg_pool2d(torch.from_numpy(scene.masks[word]).float()[None], (h, w)).flatten()
                mass.append(p.sum())
                p = p / p.sum()
                entropy.append(-(p * p.clamp_min(1e-12).log()).sum() / math.log(p.numel()))
                lift.append((p * area).sum() / area.mean())
    return {
        f"budget/{k}": torch.stack(v).mean().item()
        for k, v in zip(("image_mass", "entropy", "lift"), (mass, entropy, lift), strict=True)
    }


def auroc(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the ROC curve of scores (..., N) for bool labels (N,): P(positive > negative), ties counted half."""
    pos, neg = scores[..., labels], scores[..., ~labels]
    greater = (pos[..., :, None] > neg[..., None, :]).float().mean((-2, -1))
    ties = (pos[..., :, None] == neg[..., None, :]).float().mean((-2, -1))
    return greater + 0.5 * ties


def word_correlation(output: Tensor, concepts: tuple[str, ...]) -> float:
    """output (B, C, N) raw maps -> the Pearson correlation over tokens between two shape words' maps, averaged over
    the pairs of shape words among `concepts` and over the scenes."""
    shapes = [c for c, word in enumerate(concepts) if word in SHAPES]
    x = output[:, shapes]
    x = x - x.mean(-1, keepdim=True)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    corr = torch.einsum("bin,bjn->bij", x, x)  # (B, W, W)
    pairs = ~torch.eye(len(shapes), dtype=torch.bool, device=corr.device)
    return corr[:, pairs].mean().item()


def routing_diagnostics(
    sal: dict[int, object], scenes: list[Scene], h: int, w: int, concepts: tuple[str, ...], words: list[list[str]]
) -> dict[str, float]:
    """Per double block l, from the concept rows' attention weights over the image (`sal[l].attention`, sal: block ->
    its saliency):
    - `routing/auroc/b{l}/h{k}` (and the head mean `routing/auroc/b{l}`, the best head `routing/auroc/max`): how well
      the concept attention ranks the named shape's tokens (mask average-pooled to the token grid, > 0.5) above the
      other tokens, averaged over the shapes present; 0.5 = no preference, 1 = perfect;
    - `routing/positional/b{l}`: the variance over tokens of the per-token mean (across this batch's scenes) of the
      row-centred concept -> image logits, over their total variance, averaged over heads and concepts: the share
      that is one fixed positional pattern (an estimate from one batch; noise adds about 1 / batch);
    - `routing/lift/b{l}`, `routing/entropy/b{l}`: `attention_budget` of the block alone;
    - `routing/output/b{l}`: mIoU of the output space with softmax of the block alone;
    - `routing/word_corr/b{l}`: the correlation over image tokens between two shape words' raw output-space maps
      (o_c . o_x), averaged over word pairs and scenes: near 1 when every word's map is one shared map (the softmax
      over concepts then has only the words' small differences to work with), near 0 when the words' maps differ."""
    results: dict[str, float] = {}
    pooled = {}
    for b, scene in enumerate(scenes):
        for c, word in enumerate(concepts):
            if word in SHAPES and word in scene.masks:
                area = F.adaptive_avg_pool2d(torch.from_numpy(scene.masks[word]).float()[None], (h, w)).flatten()
                if 0 < (area > 0.5).sum() < area.numel():
                    pooled[(b, c)] = area > 0.5
    best = 0.0
    for l, s in sorted(sal.items()):
        weights = s.attention.float()  # (B, H, C, N)
        logits = weights.clamp_min(1e-30).log()
        logits = logits - logits.mean(-1, keepdim=True)  # row-centred: the logits up to the softmax's constant
        per_token = logits.mean(0)  # (H, C, N)
        share = per_token.pow(2).mean(-1) / logits.pow(2).mean((0, -1)).clamp_min(1e-12)  # (H, C)
        results[f"routing/positional/b{l}"] = share.mean().item()
        areas = torch.stack([auroc(logits[b, :, c].cpu(), lab) for (b, c), lab in pooled.items()]).mean(0)  # (H,)
        for k, value in enumerate(areas.tolist()):
            results[f"routing/auroc/b{l}/h{k}"] = value
        results[f"routing/auroc/b{l}"] = areas.mean().item()
        best = max(best, areas.max().item())
        for key, value in attention_budget([s], scenes, h, w, concepts).items():
            results[f"routing/{key.split('/')[1]}/b{l}"] = value
        raw = s.output.float()  # (B, C, N)
        results[f"routing/output/b{l}"] = score(raw.softmax(1).reshape(len(scenes), -1, h, w), scenes, words)["miou"]
        results[f"routing/word_corr/b{l}"] = word_correlation(raw, concepts)
    results["routing/auroc/max"] = best
    return results
