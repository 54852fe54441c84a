# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ConceptAttention, step by step
#
# **ConceptAttention** (Helbling et al., ICML 2025) asks a diffusion transformer *where* a word is in an image, with
# no training. You give it a list of words, the **concepts** (`["circle", "star", "background"]`), and it returns one
# saliency map per concept over the image.
#
# The trick: each concept becomes a token that travels through the double-stream blocks as a **second text stream**.
# It uses the text weights the model already has, it looks at the image (attends to the image tokens), but nothing
# looks back at it: the image and the prompt never see the concepts, so the picture is exactly the one the model makes
# without them. In each block, the concept's attention output `o_c` is compared with every image token's attention
# output `o_x` by a dot product: a high `o_c . o_x` means "this image patch carries what this concept carries".
#
# This notebook follows one concept from a word to a map:
#
# 1. a word becomes a token (and what to do with words of several pieces: three rules side by side);
# 2. the concept stream through one double-stream block, written out and checked against the module;
# 3. `o_c . o_x` and the softmax over concepts;
# 4. the whole model: maps for every layer and every sampling step (the layer x timestep grid), as pictures;
# 5. the check that the image does not change when concepts are added;
# 6. overlays on a held-out scene, next to the true masks.
#
# **Which model?** `MODEL` below picks it (environment variable `NOTEBOOK_MODEL`, default `"shapes"`). `"shapes"` is
# the project's built-in model, shipped in `shapes/weights/`: a small Flux (2.75 M parameters, 4 double blocks and 1
# single block), a small T5 and a small autoencoder, trained for about 30 minutes on a CPU on procedural scenes of
# coloured shapes (`shapes/scenes.py`), so that everything here runs on a laptop with nothing to download.
#
# **It is small, and its ConceptAttention maps localise only a little.** Its model card,
# [`shapes/MODEL_CARD.md`](../shapes/MODEL_CARD.md), measures them on 500 held-out scenes: the paper's output-space maps
# score 0.40 mIoU read from the model's own concept layer (block 2, named in its recipe.json; 0.36 with all four blocks
# averaged) where an untrained model scores 0.31-0.32, a centred disc that ignores the image 0.51 and a perfect 8 x 8
# map 0.735; the raw output space (0.53) and the attention scores (0.52) do better. The model draws the colours its
# caption names, and its maps lean towards the named shape on some scenes, not on all. So read this notebook for the
# **mechanics**: every step and every `check(...)` below is exact whatever the weights, and the maps you see here are a
# weak signal, not a segmentation. With a better-trained model (`NOTEBOOK_MODEL` set to its folder) or the real
# FLUX.1-schnell (`NOTEBOOK_MODEL=black-forest-labs/FLUX.1-schnell`, a GPU, and notebook 3's `RUN_REAL` cells for a
# benchmark) the same cells show and measure real localisation.

# %%
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path.cwd().resolve().parent  # the notebooks live in ROOT/notebooks
sys.path.insert(0, str(ROOT))  # make the project's modules importable
print("python:", sys.executable)
NOTEBOOK_START = time.time()
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's hint about Jupyter widgets

import matplotlib.pyplot as plt
import numpy as np
import torch
from einops import einsum, rearrange
from PIL import Image

import imaging
from concept_attention import ConceptAttentionPipeline, Settings
from mmdit import ConceptInput
from mmdit.layers import pre_attention
from mmdit.math import apply_rope, attention, concept_attention, timestep_embedding
from saliency import SPACES
from sampling import denoise, get_noise, get_schedule, image_ids, pack, text_ids, unpack
from shapes.scenes import SceneConfig, held_out_seeds, make_scene, model_scenes

torch.set_grad_enabled(False)
MODEL = os.environ.get("NOTEBOOK_MODEL", "shapes")  # "shapes" (built in), a hub id or a local FLUX folder
DEVICE = "cpu"  # everything here is small enough for a CPU


def check(what: str, ok: bool) -> None:
    """Print the outcome of a check and stop the notebook if it failed (the tests run these notebooks)."""
    print(f"{what}: {ok}")
    assert ok, f"check failed: {what}"


pipe = ConceptAttentionPipeline.from_pretrained(MODEL, device=DEVICE, dtype=torch.float32)
flux = pipe.flux
print(f"USING the model {MODEL!r} (for 'shapes': small, its maps localise only a little; see the card)")
print(f"{len(flux.double_blocks)} double blocks, {len(flux.single_blocks)} single blocks, hidden size",
      f"{flux.config.hidden_size}, {flux.config.num_heads} heads; T5 sequence length {pipe.max_length}")  # fmt: skip

# %% [markdown]
# ## The scene
#
# A held-out scene from the shapes generator (its seeds are never drawn in training), with its caption and its exact
# masks. The concepts are the shapes in the scene, one shape that is *not* in it, and `"background"`.

# %%
SIZE = 128  # pixels; the token grid is SIZE/16 x SIZE/16 = 8 x 8
# the scenes of the world the shapes model was trained on (its recipe.json); another model gets the full world
SCENES = model_scenes(pipe.source, SIZE) if (Path(pipe.source) / "recipe.json").is_file() else SceneConfig(size=SIZE)
seed = next(s for s in held_out_seeds(50, start=7) if len(make_scene(s, SCENES).shapes) == 2)
scene = make_scene(seed, SCENES)
present = [kind for _, kind in scene.shapes]
absent = next(k for k in SCENES.shapes if k not in present)
concepts = [*present, absent, "background"]
image = Image.fromarray(scene.image)
print("caption: ", scene.caption)
print("concepts:", concepts, f"({absent!r} is not in the picture)")

fig, axes = plt.subplots(1, len(concepts) + 1, figsize=(2.2 * (len(concepts) + 1), 2.4))
axes[0].imshow(image)
axes[0].set_title("held-out scene")
for ax, word in zip(axes[1:], concepts, strict=True):
    ax.imshow(scene.masks.get(word, np.zeros((SIZE, SIZE), bool)), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"true mask: {word}")
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 1. How a concept becomes a token
#
# Each concept is encoded by the T5 text encoder **on its own**, exactly as a prompt would be: tokenised into
# SentencePiece pieces, an end-of-sequence token `</s>` appended, padded to the prompt length, and run through T5.
# T5 returns one vector per position. A one-piece word is then simply the vector at position 0.

# %%
tok = pipe.t5_tokenizer
for word in concepts:
    ids = tok.encode(word)
    print(f"{word!r:>14} -> pieces {[tok.id_to_piece(i) for i in ids]}")
ids = tok(concepts, max_length=pipe.max_length)
print("padded ids:", tuple(ids.shape), "(C, L)")
hidden = pipe.t5(ids)
print("T5 output: ", tuple(hidden.shape), "(C, L, d_model)")

tokens_first, owner = pipe.encode_concepts(concepts, token_rule="first")
print("concept tokens:", tuple(tokens_first.shape), "(B, C, d_model); owner (concept of each token):", owner.tolist())
check("rule 'first' is T5's position 0", torch.equal(tokens_first[0], hidden[:, 0]))

# %% [markdown]
# **Concepts of several pieces.** `"red circle"` (or any word the tokenizer splits) has several pieces, and position 0
# holds only the first one (`"▁red"`, seen in the context of the rest). The official code keeps position 0 for every
# concept; this project offers three rules (`Settings.token_rule`):
#
# | rule | tokens per concept | what the concept's map is |
# |---|---|---|
# | `"first"` (official) | 1: position 0 | the first piece's map |
# | `"mean"` (our default) | 1: the mean of the piece vectors, `</s>` excluded | the map of the averaged token |
# | `"pieces"` | one per piece | the mean of the pieces' maps (averaged before the softmax over concepts) |
#
# For a one-piece word the three rules give the same token and the same map.

# %%
colour, kind = scene.shapes[0]
multi = [f"{colour} {kind}", *concepts[1:]]
pieces = tok.encode(multi[0])[:-1]  # without </s>
print(f"{multi[0]!r} has {len(pieces)} pieces: {[tok.id_to_piece(i) for i in pieces]}")
full = pipe.t5(tok(multi, max_length=pipe.max_length))  # (C, L, d_model)
for rule in ("first", "mean", "pieces"):
    tokens, owner = pipe.encode_concepts(multi, token_rule=rule)
    print(f"{rule:>6}: tokens {tuple(tokens.shape)}, owner {owner.tolist()}")
mean_tokens, _ = pipe.encode_concepts(multi, token_rule="mean")
check("rule 'mean' is the mean over the pieces", torch.allclose(mean_tokens[0, 0], full[0, : len(pieces)].mean(0)))

rule_maps = {
    rule: pipe.explain(image, multi, prompt=scene.caption, settings=Settings(token_rule=rule), progress=False)
    for rule in ("first", "mean", "pieces")
}
fig, axes = plt.subplots(1, 4, figsize=(10, 2.6))
axes[0].imshow(image)
axes[0].set_title("image")
for ax, (rule, result) in zip(axes[1:], rule_maps.items(), strict=True):
    ax.imshow(result.maps[0], cmap="inferno")
    ax.set_title(f"{multi[0]!r}, rule {rule!r}", fontsize=9)
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The concept stream through one double-stream block
#
# We rebuild what `pipe.explain` feeds the transformer for a real image, then walk through the first double block:
#
# - the image goes through the autoencoder (its posterior mean), is noised to `t = 0.5` on the rectified-flow path
#   `x_t = t * noise + (1 - t) * z`, and packed into tokens;
# - the caption is the prompt (T5), the concepts are encoded as above;
# - the concept stream's **modulation vector** is `time_in(t) + vector_in(0)` (the pooled text vector set to zero,
#   as in the paper), and the concepts' RoPE positions are all zero, like text tokens.

# %%
T_NOISE, SEED = 0.5, 0
x = (imaging.to_tensor(image) * 2 - 1)[None]  # (1, 3, H, W) in [-1, 1]
z = pack(pipe.autoencoder.encode(x))  # (1, N, 64)
x_t = T_NOISE * pack(get_noise(1, SIZE, SIZE, SEED)) + (1 - T_NOISE) * z
txt_t5, y = pipe.encode_prompt(scene.caption, pooled=False)  # y = 0, as explain() does
concept_t5, owner = pipe.encode_concepts(concepts, token_rule="mean")
t_vec = torch.tensor([T_NOISE])
time_vec = flux.time_in(timestep_embedding(t_vec, 256))
vec = time_vec + flux.vector_in(y)  # the image and text streams' modulation vector
concept_vec = time_vec + flux.vector_in(torch.zeros_like(y))  # the concept stream's

T, N, C = txt_t5.shape[1], x_t.shape[1], len(concepts)
img_ids_, txt_ids_ = image_ids(1, SIZE, SIZE), text_ids(1, T)
pe = flux.pe_embedder(torch.cat((txt_ids_, img_ids_), dim=1))  # rotations of [txt; img]
concept_pe = flux.pe_embedder(torch.zeros(1, C, 3))  # position 0: the identity rotation
img, txt, c = flux.img_in(x_t), flux.txt_in(txt_t5), flux.txt_in(concept_t5)  # concepts use the text input layer
print(f"img {tuple(img.shape)}  txt {tuple(txt.shape)}  concepts {tuple(c.shape)}   (B, tokens, hidden)")

block = flux.double_blocks[0]
print("the block's weights:", sorted({name.split(".")[0] for name, _ in block.named_parameters()}))

# %% [markdown]
# The block has no weight of its own for the concepts: they reuse `txt_mod`, `txt_attn` and `txt_mlp`. Step by step:
#
# 1. **the image and text streams run exactly as without concepts**: the joint attention over `[txt; img]` gives
#    `o_x`, the image rows of the attention output (before the output projection);
# 2. **the concepts are modulated and projected with the text weights**: `q_c, k_c, v_c`;
# 3. **the concept attention**: each concept query attends to the keys `[k_c; k_x]` (the concepts and the image,
#    never the prompt) and reads the values `[v_c; v_x]`: the result is `o_c`, one row per concept;
# 4. the concepts are updated like text (gated residuals with `txt_attn.proj` and `txt_mlp`) for the next block.

# %%
heads = flux.config.num_heads
img_mod1, _ = block.img_mod(vec)
txt_mod1, _ = block.txt_mod(vec)
img_q, img_k, img_v = pre_attention(img, img_mod1, block.img_attn)  # (B, H, N, D)
txt_q, txt_k, txt_v = pre_attention(txt, txt_mod1, block.txt_attn)  # (B, H, T, D)
q = apply_rope(torch.cat((txt_q, img_q), dim=2), pe)
k = apply_rope(torch.cat((txt_k, img_k), dim=2), pe)
v = torch.cat((txt_v, img_v), dim=2)
o_x = attention(q, k, v)[:, T:]  # (B, N, H*D): the image rows of the joint attention
print("1. o_x", tuple(o_x.shape))

c_mod1, _ = block.txt_mod(concept_vec)  # the TEXT modulation, driven by the concept vector
c_q, c_k, c_v = pre_attention(c, c_mod1, block.txt_attn)  # the TEXT q, k, v weights
print("2. q_c, k_c, v_c", tuple(c_q.shape), "(B, H, C, D)")

k_x, v_x = k[:, :, T:], img_v  # the image keys (already rotated) and values of the joint attention
q_c, k_c = apply_rope(c_q, concept_pe), apply_rope(c_k, concept_pe)
D = q_c.shape[-1]
scores = torch.cat((q_c @ k_c.transpose(-2, -1), q_c @ k_x.transpose(-2, -1)), dim=-1) * D**-0.5
weights = scores.softmax(dim=-1)  # (B, H, C, C + N): each concept's attention over [concepts; image]
o_c_heads = weights[..., :C] @ c_v + weights[..., C:] @ v_x  # (B, H, C, D)
print("3. concept attention weights", tuple(weights.shape), "-> o_c", tuple(o_c_heads.shape))
o_c_ref, weights_ref = concept_attention(q_c, k_c, c_v, k_x, v_x)
check("   o_c equals mmdit.math.concept_attention's", torch.equal(o_c_heads, o_c_ref))
check("   and so do the weights", torch.equal(weights, weights_ref))
o_c = rearrange(o_c_heads, "B H C D -> B C (H D)")  # heads concatenated, like o_x

# %% [markdown]
# Now the block's own forward, given the concepts. It returns the image and text streams, the updated concepts and a
# `ConceptSaliency` with the scores of every space asked for. We check that the image and text streams are **bit for
# bit** those of the same block without concepts.

# %%
img_out, txt_out, c_out, saliency = block(img, txt, vec, pe, c, concept_vec, concept_pe, spaces=SPACES)
img_plain, txt_plain = block(img, txt, vec, pe)
check("image stream unchanged by the concepts", torch.equal(img_out, img_plain))
check("text stream unchanged by the concepts", torch.equal(txt_out, txt_plain))
print("concepts after the block:", tuple(c_out.shape))
for space in SPACES:
    print(f"saliency.{space:<16}", tuple(getattr(saliency, space).shape))

# %% [markdown]
# ## 3. `o_c . o_x` and the softmax over concepts
#
# The **output space** saliency of a layer is a plain dot product (no scaling) between each concept's `o_c` and each
# image token's `o_x`, both with the heads concatenated: a `C x N` matrix, one row per concept, one column per image
# patch. Reshaped to the token grid, each row is a map.
#
# Then a **softmax over the concepts**, at every patch separately: the concepts compete for each patch, and each
# patch's values sum to 1. This is why the concept list matters: a patch must go to *some* concept, so a good list
# includes words for everything in the picture (here `"background"`).

# %%
phi = einsum(o_c, o_x, "B C HD, B N HD -> B C N")
print("o_c . o_x:", tuple(phi.shape), "(B, C, N)")
check("equal to the block's saliency.output", torch.equal(phi, saliency.output))
h = w = SIZE // 16
raw = rearrange(phi[0], "C (h w) -> C h w", h=h)
soft = raw.softmax(dim=0)
check("after the softmax, every patch sums to 1", torch.allclose(soft.sum(0), torch.ones(h, w)))

fig, axes = plt.subplots(2, C, figsize=(2.2 * C, 4.6))
for j, word in enumerate(concepts):
    axes[0, j].imshow(raw[j], cmap="inferno")
    axes[0, j].set_title(f"{word}: o_c . o_x", fontsize=9)
    axes[1, j].imshow(soft[j], cmap="inferno", vmin=0, vmax=1)
    axes[1, j].set_title(f"{word}: softmax", fontsize=9)
for ax in axes.ravel():
    ax.axis("off")
fig.suptitle("block 0 alone (the first of the double blocks)")
plt.tight_layout()
plt.show()

# %% [markdown]
# The pipeline does the same for block 0 when asked for layer 0 only (`Settings(layers=(0,))`): same noise seed, same
# `t`, same tokens, so the same map.

# %%
one_layer = pipe.explain(image, concepts, prompt=scene.caption, t=T_NOISE, seed=SEED,
                         settings=Settings(layers=(0,)), progress=False)  # fmt: skip
print(f"max abs difference {(one_layer.maps - soft).abs().max():.1e}")
check("pipe.explain(layers=(0,)) equals the map above", torch.allclose(one_layer.maps, soft, atol=1e-6))

# %% [markdown]
# ## 4. Every layer, every step: the layer x timestep grid
#
# The paper's map is an **average**: of the softmaxed maps of several double blocks (layers) and, when generating,
# of several sampling steps (timesteps). `pipe.generate(..., keep_grid=True)` samples an image from the caption exactly
# as Flux does and keeps the map of every layer at every step (for all four saliency spaces, with and without softmax;
# notebook 3 compares them). `result.select(...)` then averages any part of the grid. The pictures show how the maps
# are organised (one per block and step); with the shapes model their content is a weak signal, as said at the top.

# %%
generated = pipe.generate(scene.caption, concepts, height=SIZE, width=SIZE, num_steps=4, seed=1,
                          keep_grid=True, progress=False)  # fmt: skip
grid = generated.grid["output+softmax"]  # (layers, steps, C, N)
print("grid:", tuple(grid.shape), "= (layers, steps, C, N); keys:", sorted(generated.grid))
steps = generated.record["timesteps"]
L, S = grid.shape[:2]
for j in (0, C - 1):  # the first shape, and the background
    fig, axes = plt.subplots(L, S + 1, figsize=(1.7 * (S + 1), 1.7 * L + 0.5), squeeze=False)
    for layer in range(L):
        for step in range(S):
            axes[layer, step].imshow(grid[layer, step, j].reshape(h, w), cmap="inferno", vmin=0, vmax=1)
            axes[0, step].set_title(f"step {step} (t={steps[step]:.2f})", fontsize=8)
        axes[layer, 0].set_ylabel(f"block {layer}", fontsize=8)
        axes[layer, S].imshow(generated.select(layers=(layer,))[j], cmap="inferno", vmin=0, vmax=1)
    axes[0, S].set_title("mean over steps", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"concept {concepts[j]!r}: softmaxed output-space map per double block and sampling step")
    plt.tight_layout()
    plt.show()

# %% [markdown]
# The final maps (`generated.maps`: the mean over every step of the model's own layers, its recipe.json `layers`,
# block 2 for the shapes model; every layer for a model without them) laid over the generated image, with
# `ConceptResult.overlay()`:

# %%
print("maps:", tuple(generated.maps.shape), "(C, H/16, W/16)")
check("select() with the result's settings equals .maps", torch.allclose(generated.select(), generated.maps))
plt.figure(figsize=(2.2 * (C + 1), 2.6))
plt.imshow(generated.overlay())
plt.axis("off")
plt.title(f"generated from {scene.caption!r}")
plt.show()

# %% [markdown]
# ## 5. The image does not change
#
# Since no image or text token ever reads a concept token, the generated image must be **exactly** the image of plain
# sampling with the same prompt, seed and schedule, and no concepts at all. We sample again without concepts, with the
# project's sampler (`sampling.denoise`) and the bare model, and compare the pixels.

# %%
seed_noise = get_noise(1, SIZE, SIZE, seed=1)
prompt_t5, pooled = pipe.encode_prompt(scene.caption)
ids_img, ids_txt = image_ids(1, SIZE, SIZE), text_ids(1, prompt_t5.shape[1])
x0 = denoise(lambda x, t: flux(x, ids_img, prompt_t5, ids_txt, t, pooled), pack(seed_noise),
             get_schedule(4, N, shift=flux.config.guidance_embed))  # fmt: skip
plain_image = imaging.to_pil(pipe.autoencoder.decode(unpack(x0, SIZE, SIZE))[0])
same = np.array_equal(np.asarray(plain_image), np.asarray(generated.image))
check("generate() with concepts == plain sampling without concepts, pixel for pixel", same)

with_concepts = flux(x_t, img_ids_, txt_t5, txt_ids_, t_vec, y, concepts=ConceptInput(concept_t5, spaces=SPACES))
without = flux(x_t, img_ids_, txt_t5, txt_ids_, t_vec, y)
check("one forward: velocity with and without concepts bit for bit equal", torch.equal(with_concepts.velocity, without))

fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
axes[0].imshow(generated.image)
axes[0].set_title("with concepts")
axes[1].imshow(plain_image)
axes[1].set_title("without concepts")
diff = np.abs(np.asarray(generated.image, dtype=int) - np.asarray(plain_image, dtype=int)).sum(-1)
axes[2].imshow(diff, cmap="gray", vmin=0, vmax=1)
axes[2].set_title(f"difference (max {diff.max()})")
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Overlays on the held-out scene
#
# Back to the real image: `pipe.explain` with the default settings (output space, softmax, the model's own concept
# layers, `pipe.default_layers` from its recipe.json, else all double blocks; `t = 0.5`, one noise sample). Top: the
# maps over the image. Bottom: `result.masks("argmax")` (each pixel goes to its best concept) next to the true masks,
# with the IoU of each pair.
#
# **What to expect from the shapes model:** its maps localise only a little (model card: 0.40 mIoU on 500 held-out
# test scenes with its block 2, 0.36 with all blocks averaged; an untrained model 0.31-0.32, a centred disc 0.51), so do
# not expect the argmax masks to follow the true shapes closely: one scene's IoUs vary a lot around that level. These
# cells are the measurement: run them with a better-trained model or FLUX.1-schnell and the same IoUs say how well it
# localises each concept. Notebook 3 scores many scenes instead of one.

# %%
explained = pipe.explain(image, concepts, prompt=scene.caption, progress=False)
plt.figure(figsize=(2.2 * (C + 1), 2.6))
plt.imshow(explained.overlay())
plt.axis("off")
plt.show()

predicted = explained.masks("argmax")  # (C, H, W) bool
fig, axes = plt.subplots(2, C, figsize=(2.2 * C, 4.6))
for j, word in enumerate(concepts):
    truth = scene.masks.get(word, np.zeros((SIZE, SIZE), bool))
    iou = (predicted[j].numpy() & truth).sum() / max((predicted[j].numpy() | truth).sum(), 1)
    axes[0, j].imshow(predicted[j], cmap="gray", vmin=0, vmax=1)
    axes[0, j].set_title(f"{word}: argmax (IoU {iou:.2f})", fontsize=8)
    axes[1, j].imshow(truth, cmap="gray", vmin=0, vmax=1)
    axes[1, j].set_title(f"{word}: truth", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Where to go next
#
# - `mmdit/layers.py` (`DoubleStreamBlock.forward`, `concept_saliency`) and `mmdit/math.py` (`concept_attention`)
#   hold the maths of sections 2 and 3; `saliency.py` the reduction to maps and the grid; `concept_attention.py` the
#   pipeline.
# - Notebook 3 compares the four saliency spaces, with and without softmax, per layer and per noise level, on a
#   benchmark of held-out scenes.
# - [`shapes/MODEL_CARD.md`](../shapes/MODEL_CARD.md) records how the shapes model was trained, what was tried to make
#   its maps localise, and what is left to try (the third round's recipes at GPU scale: `python -m shapes.arms`).

# %%
print(f"notebook ran in {time.time() - NOTEBOOK_START:.1f} s on {MODEL!r}")
