"""Our tensor names -> the file's tensors: the diffusers rule tables, and the strict load plan.

Follows checkpoints.md sections 2.3 and 6.4 (diffusers' BFL -> diffusers conversion scripts), inverted. Differs from
those scripts in: the rules pull rather than push, one rule per kind of our tensor, so that the model's own
`state_dict()` drives the load: each of our tensors is one file tensor, or the rows of several (q, k, v fused into
`qkv`; q, k, v, mlp into the single block's `linear1`), or a row block of one (the final layer's (scale, shift) halves
swapped); 1x1-conv weights stored as matrices are accepted for the reshape `fill` does. Names no rule matches are read
as they are, so BFL files and transformers' T5 and CLIP files need no table.

Notable features: the plan is made from headers alone, before any data is read; every missing, unexpected or
mis-shaped tensor is collected and reported in one error.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import CheckpointError
from .files import Piece, TensorInfo, stacked_shape

# (regex over our tensor name, file tensor or tensors): {0}, {1}, ... are the regex groups; several file tensors are
# stacked along rows (dim 0); "name[i/n]" is the i-th of n equal row blocks of a file tensor. Names no rule matches
# are read as they are.
Rule = tuple[str, str | tuple[str, ...]]

_DB, _SB = r"double_blocks\.(\d+)\.", r"single_blocks\.(\d+)\."
_TB, _STB = "transformer_blocks.{0}.", "single_transformer_blocks.{0}."

FLUX_FROM_DIFFUSERS: tuple[Rule, ...] = (  # checkpoints.md section 2.3, inverted
    (r"img_in\.(\w+)", "x_embedder.{0}"),
    (r"txt_in\.(\w+)", "context_embedder.{0}"),
    (r"time_in\.in_layer\.(\w+)", "time_text_embed.timestep_embedder.linear_1.{0}"),
    (r"time_in\.out_layer\.(\w+)", "time_text_embed.timestep_embedder.linear_2.{0}"),
    (r"vector_in\.in_layer\.(\w+)", "time_text_embed.text_embedder.linear_1.{0}"),
    (r"vector_in\.out_layer\.(\w+)", "time_text_embed.text_embedder.linear_2.{0}"),
    (r"guidance_in\.in_layer\.(\w+)", "time_text_embed.guidance_embedder.linear_1.{0}"),
    (r"guidance_in\.out_layer\.(\w+)", "time_text_embed.guidance_embedder.linear_2.{0}"),
    (_DB + r"img_mod\.lin\.(\w+)", _TB + "norm1.linear.{1}"),
    (_DB + r"txt_mod\.lin\.(\w+)", _TB + "norm1_context.linear.{1}"),
    (_DB + r"img_attn\.qkv\.(\w+)", tuple(_TB + f"attn.to_{x}.{{1}}" for x in "qkv")),
    (_DB + r"txt_attn\.qkv\.(\w+)", tuple(_TB + f"attn.add_{x}_proj.{{1}}" for x in "qkv")),
    (_DB + r"img_attn\.norm\.query_norm\.scale", _TB + "attn.norm_q.weight"),
    (_DB + r"img_attn\.norm\.key_norm\.scale", _TB + "attn.norm_k.weight"),
    (_DB + r"txt_attn\.norm\.query_norm\.scale", _TB + "attn.norm_added_q.weight"),
    (_DB + r"txt_attn\.norm\.key_norm\.scale", _TB + "attn.norm_added_k.weight"),
    (_DB + r"img_attn\.proj\.(\w+)", _TB + "attn.to_out.0.{1}"),
    (_DB + r"txt_attn\.proj\.(\w+)", _TB + "attn.to_add_out.{1}"),
    (_DB + r"img_mlp\.0\.(\w+)", _TB + "ff.net.0.proj.{1}"),
    (_DB + r"img_mlp\.2\.(\w+)", _TB + "ff.net.2.{1}"),
    (_DB + r"txt_mlp\.0\.(\w+)", _TB + "ff_context.net.0.proj.{1}"),
    (_DB + r"txt_mlp\.2\.(\w+)", _TB + "ff_context.net.2.{1}"),
    (_SB + r"modulation\.lin\.(\w+)", _STB + "norm.linear.{1}"),
    (_SB + r"linear1\.(\w+)", tuple(_STB + f"{x}.{{1}}" for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))),
    (_SB + r"linear2\.(\w+)", _STB + "proj_out.{1}"),
    (_SB + r"norm\.query_norm\.scale", _STB + "attn.norm_q.weight"),
    (_SB + r"norm\.key_norm\.scale", _STB + "attn.norm_k.weight"),
    (r"final_layer\.linear\.(\w+)", "proj_out.{0}"),
    # BFL's LastLayer chunks (shift, scale); diffusers' AdaLayerNormContinuous stores (scale, shift)
    (r"final_layer\.adaLN_modulation\.1\.(\w+)", ("norm_out.linear.{0}[1/2]", "norm_out.linear.{0}[0/2]")),
)


def ae_from_diffusers(levels: int) -> tuple[Rule, ...]:
    """Diffusers `vae/` -> BFL names (checkpoints.md section 6.4, inverted). BFL numbers decoder levels by resolution
    (up.0 is the finest), diffusers in running order (up_blocks.0 is the coarsest). The 1x1-conv attention weights,
    stored as [C, C] matrices by diffusers, are reshaped by the loader."""
    mid = r"(encoder|decoder)\.mid\."
    rules: list[Rule] = [
        (r"(encoder|decoder)\.norm_out\.(\w+)", "{0}.conv_norm_out.{1}"),
        (mid + r"block_1\.(\w+)\.(\w+)", "{0}.mid_block.resnets.0.{1}.{2}"),
        (mid + r"block_2\.(\w+)\.(\w+)", "{0}.mid_block.resnets.1.{1}.{2}"),
        (mid + r"attn_1\.norm\.(\w+)", "{0}.mid_block.attentions.0.group_norm.{1}"),
        (mid + r"attn_1\.(q|k|v)\.(\w+)", "{0}.mid_block.attentions.0.to_{1}.{2}"),
        (mid + r"attn_1\.proj_out\.(\w+)", "{0}.mid_block.attentions.0.to_out.0.{1}"),
        (
            r"encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.(\w+)",
            "encoder.down_blocks.{0}.resnets.{1}.conv_shortcut.{2}",
        ),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)", "encoder.down_blocks.{0}.resnets.{1}.{2}.{3}"),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(\w+)", "encoder.down_blocks.{0}.downsamplers.0.conv.{1}"),
    ]
    for level in range(levels):
        up = f"decoder.up_blocks.{levels - 1 - level}."
        rules += [
            (rf"decoder\.up\.{level}\.block\.(\d+)\.nin_shortcut\.(\w+)", up + "resnets.{0}.conv_shortcut.{1}"),
            (rf"decoder\.up\.{level}\.block\.(\d+)\.(\w+)\.(\w+)", up + "resnets.{0}.{1}.{2}"),
            (rf"decoder\.up\.{level}\.upsample\.conv\.(\w+)", up + "upsamplers.0.conv.{0}"),
        ]
    return tuple(rules)


CLIP_WITHOUT_PREFIX: tuple[Rule, ...] = ((r"text_model\.(.+)", "{0}"),)  # files saved by transformers 5


def sources(name: str, rules: tuple[Rule, ...]) -> list[tuple[str, int, int]]:
    """(file tensor, part, parts) for each row block of our tensor `name`, in order."""
    for pattern, templates in rules:
        if match := re.fullmatch(pattern, name):
            templates = (templates,) if isinstance(templates, str) else templates
            keys = [template.format(*match.groups()) for template in templates]
            blocks = [re.fullmatch(r"(.+)\[(\d+)/(\d+)\]", key) for key in keys]
            return [(b[1], int(b[2]), int(b[3])) if b else (key, 0, 1) for key, b in zip(keys, blocks, strict=True)]
    return [(name, 0, 1)]


def fits(found: tuple[int, ...] | None, expected: tuple[int, ...]) -> bool:
    """Equal shapes, or a matrix for a 1x1 conv ([C, C] for [C, C, 1, 1])."""
    if found is None:
        return False
    return found == expected or (expected[: len(found)] == found and all(d == 1 for d in expected[len(found) :]))


def listing(items: list[str], what: str) -> str:
    more = f"; ... ({len(items) - 5} more)" if len(items) > 5 else ""
    return f"{len(items)} {what}{'s' if len(items) > 1 else ''}: " + "; ".join(items[:5]) + more


def plan_load(
    model: nn.Module, tensors: dict[str, TensorInfo], rules: tuple[Rule, ...], ignore: tuple[str, ...], where: str
) -> dict[str, list[Piece]]:
    """Match every tensor of the (meta) model to file row blocks; raise one error listing every problem."""
    plan, missing, mismatched, used = {}, [], [], set()
    for name, target in model.state_dict().items():
        wanted = sources(name, rules)
        absent = [key for key, _, _ in wanted if key not in tensors]
        missing += [key if key == name else f"{key} (for {name})" for key in absent]
        used |= {key for key, _, _ in wanted}
        if absent:
            continue
        pieces = [Piece(key, tensors[key], part, parts) for key, part, parts in wanted]
        if not fits(stacked_shape(pieces), tuple(target.shape)):
            found = " + ".join(
                f"{p.key}{f'[{p.part}/{p.parts}]' if p.parts > 1 else ''} {list(p.info.shape)}" for p in pieces
            )
            mismatched.append(f"{name} expected {list(target.shape)}, found {found}")
        elif target.is_floating_point() and not all(p.info.dtype.is_floating_point for p in pieces):
            found = ", ".join(str(p.info.dtype).removeprefix("torch.") for p in pieces)
            mismatched.append(f"{name} expected floating-point values, found {found}")
        plan[name] = pieces
    unexpected = [
        f"{key} {list(info.shape)} (in {info.path.name})"
        for key, info in tensors.items()
        if key not in used and not any(re.fullmatch(pattern, key) for pattern in ignore)
    ]
    if missing or unexpected or mismatched:
        problems = [listing(missing, "missing tensor")] if missing else []
        problems += [listing(unexpected, "unexpected tensor")] if unexpected else []
        problems += [listing(mismatched, "shape mismatch")] if mismatched else []
        raise CheckpointError(f"{where} does not match {type(model).__name__}({model.config}): " + ". ".join(problems))
    return plan
