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
# # Flux from scratch
#
# Flux.1 is a *rectified-flow transformer*: it starts from Gaussian noise and, in a few steps, moves it towards an
# image. At every step a transformer (the **MM-DiT**, "multi-modal diffusion transformer") looks at the current noisy
# latents and the prompt and predicts a **velocity**: the direction in which to move the latents.
#
# This notebook walks through one forward pass of that transformer and the sampler around it, one operation at a
# time, using this project's own modules:
#
# 1. latents become tokens (`sampling.pack`);
# 2. every token gets a position, and positions enter attention as rotations (RoPE, `mmdit.math.rope`);
# 3. the noise level `t` becomes a vector that steers every block (timestep embedding and modulation);
# 4. one **double-stream block** (`mmdit.layers.DoubleStreamBlock`) written out line by line, and checked against the
#    module's own output;
# 5. one **single-stream block**;
# 6. the whole model, and the **Euler sampler** that turns velocities into an image.
#
# Everything runs on the `"tiny"` preset of `mmdit.CONFIGS` with **random weights**, so it takes seconds on a laptop
# CPU. The maths is exactly that of FLUX.1-schnell (the real model is the `"flux-schnell"` preset: same code, bigger
# numbers), but with random weights the "image" at the end is noise: the point is the mechanics, not the picture.
#
# Shape letters used everywhere in this project: **B** batch, **H** heads, **L** sequence, **D** head dim,
# **T** text tokens, **N** image tokens, **C** concepts.

# %%
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path.cwd().resolve().parent  # the notebooks live in ROOT/notebooks
sys.path.insert(0, str(ROOT))  # make the project's modules importable
print("python:", sys.executable)
print("repository:", ROOT)
NOTEBOOK_START = time.time()
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's hint about Jupyter widgets

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from einops import rearrange

import autoencoder
import mmdit
from mmdit.math import apply_rope, attention, modulate, rope, timestep_embedding
from sampling import denoise, get_noise, get_schedule, image_ids, pack, text_ids, unpack

torch.manual_seed(0)
torch.set_grad_enabled(False)  # we only run forwards here


def show(name: str, x) -> None:
    """Print a tensor's shape (and dtype) next to its name."""
    print(f"{name:<28} {tuple(x.shape)}  {str(x.dtype).replace('torch.', '')}")


def check(what: str, ok: bool) -> None:
    """Print the outcome of a check and stop the notebook if it failed (the tests run these notebooks)."""
    print(f"{what}: {ok}")
    assert ok, f"check failed: {what}"


# %% [markdown]
# ## 0. The model
#
# A `FluxConfig` is a frozen dataclass: the real FLUX.1-schnell has a hidden size of 3072, 24 heads of 128 dimensions,
# 19 double-stream and 38 single-stream blocks. The tiny preset keeps the structure with 2 heads of 32 dimensions and
# 2 + 2 blocks. The model is built with PyTorch's default random initialisation.

# %%
config = mmdit.CONFIGS["tiny"]
print(config)
print("head dim:", config.head_dim, "= sum of the RoPE axes", config.axes_dim)
flux = mmdit.Flux(config).eval()
print(f"{sum(p.numel() for p in flux.parameters()):,} parameters (FLUX.1-schnell has about 11.9 billion)")
print("real model:", mmdit.CONFIGS["flux-schnell"])

# %% [markdown]
# ## 1. Latents to tokens
#
# Flux does not work on pixels. Its autoencoder turns an H x W RGB image into **latents** of 16 channels at 1/8 of the
# resolution. Sampling starts from Gaussian latents of that shape (`sampling.get_noise`, seeded on the CPU so a seed
# gives the same noise everywhere).
#
# The transformer then cuts the latents into 2 x 2 patches; each patch (16 channels x 2 x 2 = 64 numbers) becomes one
# **token**. So one token covers 16 x 16 image pixels, and an H x W image becomes N = (H/16) * (W/16) tokens.
# `sampling.pack` does this with one einops pattern: `"B C (h ph) (w pw) -> B (h w) (C ph pw)"`.

# %%
HEIGHT, WIDTH = 64, 96  # image size in pixels; both must be multiples of 16
z = get_noise(1, HEIGHT, WIDTH, seed=0)
show("latents z", z)  # (B, 16, H/8, W/8)
x = pack(z)
show("tokens x = pack(z)", x)  # (B, N, 64)
h, w = HEIGHT // 16, WIDTH // 16
print(f"token grid: {h} rows x {w} columns = {h * w} tokens")

# %% [markdown]
# Which numbers end up in which token? Token `r * w + c` holds the 2 x 2 latent patch at rows `2r, 2r+1` and columns
# `2c, 2c+1`, for all 16 channels, ordered channel first, then the row inside the patch, then the column. We check
# that for one token, and that `unpack` is the exact inverse of `pack`.

# %%
r, c = 2, 4
patch = z[0, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2]  # (16, 2, 2)
show("patch of token (2, 4)", patch)
check("token (2, 4) == its flattened patch", torch.equal(x[0, r * w + c], patch.reshape(-1)))
check("unpack(pack(z)) == z", torch.equal(unpack(x, HEIGHT, WIDTH), z))

fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
axes[0].imshow(z[0, 0], cmap="gray")
axes[0].set_xticks([i - 0.5 for i in range(0, 2 * w + 1, 2)], [])
axes[0].set_yticks([i - 0.5 for i in range(0, 2 * h + 1, 2)], [])
axes[0].grid(color="red", linewidth=1.5)  # the 2x2 patches that become tokens
axes[0].set_title("latent channel 0 (8 x 12), cut into 2x2 patches")
axes[1].imshow(torch.arange(h * w).reshape(h, w), cmap="viridis")
for i in range(h):
    for j in range(w):
        axes[1].text(j, i, str(i * w + j), ha="center", va="center", color="white", fontsize=8)
axes[1].set_title("token index of each 2x2 patch")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Positions and the RoPE rotation
#
# Attention by itself does not know where a token sits. Flux gives every token a 3-number position id:
# `(0, row, column)` for image tokens (`sampling.image_ids`) and `(0, 0, 0)` for every text token
# (`sampling.text_ids`): the prompt has no place in the picture.
#
# The ids enter attention through **rotary position embeddings (RoPE)**. Each head's D dimensions are split into
# pairs; pair j is turned, like the hand of a clock, by an angle `position * theta^(-2j/d)`. The D dimensions are
# shared out between the three axes (`axes_dim`, here 4 + 14 + 14 = 32): the first 2 pairs follow axis 0, the next 7
# the row, the last 7 the column. Low pairs turn fast, high pairs slowly, so together they tell near from far.

# %%
T = 5  # text tokens (the real model uses 256 T5 tokens)
img_ids = image_ids(1, HEIGHT, WIDTH)
txt_ids = text_ids(1, T)
show("img_ids", img_ids)
show("txt_ids", txt_ids)
print("first image ids (axis0, row, col):", img_ids[0, :7].tolist())

ids = torch.cat((txt_ids, img_ids), dim=1)  # text first, then image: the order of the joint sequence
pe = flux.pe_embedder(ids)  # one 2x2 rotation matrix per token and pair
show("pe = pe_embedder(ids)", pe)  # (B, 1, T+N, D/2, 2, 2)
print("one rotation matrix:\n", pe[0, 0, T + 7, 3])

# %% [markdown]
# The picture: the rotation angle of every pair (columns) for every image token (rows). Pairs 0-1 (axis 0) never
# turn, pairs 2-8 turn with the row, pairs 9-15 with the column. On the right, the angle of the fastest "row" pair and
# of the fastest "column" pair drawn on the token grid.

# %%
angle = torch.atan2(pe[0, 0, T:, :, 1, 0], pe[0, 0, T:, :, 0, 0])  # (N, D/2): sin over cos
row_pair, col_pair = config.axes_dim[0] // 2, (config.axes_dim[0] + config.axes_dim[1]) // 2
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
im = axes[0].imshow(angle, cmap="twilight", aspect="auto", vmin=-torch.pi, vmax=torch.pi)
axes[0].set(xlabel="pair j", ylabel="image token", title="RoPE angle per token and pair")
plt.colorbar(im, ax=axes[0])
axes[1].imshow(angle[:, row_pair].reshape(h, w), cmap="twilight", vmin=-torch.pi, vmax=torch.pi)
axes[1].set_title(f"pair {row_pair}: turns with the row")
axes[2].imshow(angle[:, col_pair].reshape(h, w), cmap="twilight", vmin=-torch.pi, vmax=torch.pi)
axes[2].set_title(f"pair {col_pair}: turns with the column")
plt.tight_layout()
plt.show()

# %% [markdown]
# Why rotations? Because the dot product of a rotated query and a rotated key depends only on the **difference** of
# their positions: rotate q by angle a and k by angle b, and q . k changes by the angle a - b. We check it: one query
# vector and one key vector, placed at two positions, then both moved by the same offset: the score stays the same.
# (`mmdit.math.rope` builds the matrices for one axis; `apply_rope` turns adjacent pairs of a (B, H, L, D) tensor.)

# %%
q_vec, k_vec = torch.randn(config.head_dim), torch.randn(config.head_dim)


def score_at(pos_q: tuple, pos_k: tuple) -> float:
    """q . k after rotating q to position pos_q and k to pos_k (each (axis0, row, column))."""
    rot = flux.pe_embedder(torch.tensor([[pos_q, pos_k]], dtype=torch.float32))  # (1, 1, 2, D/2, 2, 2)
    both = apply_rope(torch.stack((q_vec, k_vec))[None, None], rot)  # (1, 1, 2, D)
    return (both[0, 0, 0] @ both[0, 0, 1]).item()


before, moved, k_only = score_at((0, 1, 2), (0, 3, 1)), score_at((0, 5, 7), (0, 7, 6)), score_at((0, 1, 2), (0, 7, 6))
print(f"q at (0,1,2), k at (0,3,1): {before:.5f}")
print(f"both moved by (0,+4,+5):    {moved:.5f}")
print(f"k moved, q not:             {k_only:.5f}")
check("the score depends only on the offset", abs(before - moved) < 1e-4 and abs(before - k_only) > 1e-3)
print("one axis, rope():", tuple(rope(torch.arange(3.0)[None], 14, config.theta).shape), "= (B, L, pairs, 2, 2)")

# %% [markdown]
# ## 3. The noise level: timestep embedding and modulation
#
# The time `t` runs from 1 (pure noise) to 0 (the image). It is turned into a 256-number sinusoidal code
# (`timestep_embedding`: cosines then sines of `1000 t` at 128 geometric frequencies), then a small MLP (`time_in`)
# maps it to the hidden size. The pooled text vector `y` (CLIP's, in the real model) goes through `vector_in` and is
# added: the sum `vec` is **one vector per image** that steers every block.

# %%
ts = torch.linspace(0, 1, 60)
fig, ax = plt.subplots(figsize=(9, 2.6))
ax.imshow(timestep_embedding(ts, 256), aspect="auto", cmap="RdBu", extent=(0, 256, 1, 0))
ax.set(xlabel="embedding dimension (128 cosines, then 128 sines)", ylabel="t", title="timestep_embedding(t, 256)")
plt.show()

t = torch.tensor([0.75])
y = torch.randn(1, config.vec_in_dim)  # stands in for CLIP's pooled prompt vector
t_emb = timestep_embedding(t, 256)
show("timestep_embedding(t)", t_emb)
vec = flux.time_in(t_emb) + flux.vector_in(y)
show("vec = time_in + vector_in", vec)

# %% [markdown]
# **Modulation** (adaLN, "adaptive LayerNorm") is how `vec` steers a block. Each block has a `Modulation` layer that
# maps `vec` to a `shift`, a `scale` and a `gate` (two sets in a double block: one around attention, one around the
# MLP). A stream's tokens are normalised (LayerNorm without weights), then scaled and shifted:
# `modulate(x) = (1 + scale) * LayerNorm(x) + shift`, and each residual update is multiplied by its `gate`. So the noise
# level decides, per channel, how much each block changes the tokens.

# %%
block = flux.double_blocks[0]
img_mod1, img_mod2 = block.img_mod(vec)
for name in ("shift", "scale", "gate"):
    show(f"img_mod1.{name}", getattr(img_mod1, name))  # (B, 1, hidden): one value per channel, for every token
probe = torch.randn(1, 3, config.hidden_size)
by_hand = (1 + img_mod1.scale) * F.layer_norm(probe, (config.hidden_size,), eps=1e-6) + img_mod1.shift
check("modulate == (1 + scale) * LN(x) + shift", torch.equal(modulate(probe, img_mod1.shift, img_mod1.scale), by_hand))

# %% [markdown]
# ## 4. One double-stream block, line by line
#
# The first part of Flux (19 blocks in the real model) keeps two **streams**: image tokens and text tokens. Each
# stream has its own weights (`img_*` and `txt_*`), but they meet in **one joint attention** over the concatenated
# sequence `[txt; img]`, so every image token can read every word and vice versa.
#
# Inputs: the packed latents go through `img_in` (64 -> hidden), the T5 text embeddings through `txt_in`. Here the
# "T5 output" is random, since only the shapes matter for the mechanics.

# %%
txt_t5 = torch.randn(1, T, config.context_in_dim)  # stands in for T5's output (B, T, 4096 in the real model)
img = flux.img_in(x)
txt = flux.txt_in(txt_t5)
show("img = img_in(x)", img)  # (B, N, hidden)
show("txt = txt_in(t5)", txt)  # (B, T, hidden)
heads, D = config.num_heads, config.head_dim

# %% [markdown]
# **Before attention**, each stream on its own: modulate, one linear layer for q, k and v together, split into heads,
# and RMS-normalise q and k (the "QK norm" that keeps attention logits tame).

# %%
img_mod1, img_mod2 = block.img_mod(vec)
txt_mod1, txt_mod2 = block.txt_mod(vec)

img_qkv = block.img_attn.qkv(modulate(img, img_mod1.shift, img_mod1.scale))
show("img qkv", img_qkv)  # (B, N, 3 * hidden)
img_q, img_k, img_v = rearrange(img_qkv, "B L (K H D) -> K B H L D", K=3, H=heads)
show("img_q (before norm)", img_q)  # (B, H, N, D)
img_q, img_k = block.img_attn.norm(img_q, img_k, img_v)  # RMSNorm over D, with a learnt scale

# the same RMSNorm by hand: x / sqrt(mean(x^2) + eps) * scale
raw_q = rearrange(img_qkv, "B L (K H D) -> K B H L D", K=3, H=heads)[0]
rms_q = raw_q * torch.rsqrt(raw_q.pow(2).mean(-1, keepdim=True) + 1e-6) * block.img_attn.norm.query_norm.scale
check("QK RMSNorm by hand matches", torch.allclose(rms_q, img_q, atol=1e-6))

txt_qkv = block.txt_attn.qkv(modulate(txt, txt_mod1.shift, txt_mod1.scale))
txt_q, txt_k, txt_v = rearrange(txt_qkv, "B L (K H D) -> K B H L D", K=3, H=heads)
txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)
show("txt_q", txt_q)  # (B, H, T, D)

# %% [markdown]
# **Joint attention**: concatenate text then image, rotate q and k by their positions, and attend. First with the
# project's `attention` function (PyTorch's fused scaled-dot-product attention), then written out: scores
# `q k^T / sqrt(D)`, a softmax over the keys, a weighted sum of the values.

# %%
q = apply_rope(torch.cat((txt_q, img_q), dim=2), pe)
k = apply_rope(torch.cat((txt_k, img_k), dim=2), pe)
v = torch.cat((txt_v, img_v), dim=2)
show("q = rope([txt_q; img_q])", q)  # (B, H, T+N, D)
a = attention(q, k, v)
show("a = attention(q, k, v)", a)  # (B, T+N, H*D): heads concatenated again

scores = q @ k.transpose(-2, -1) / D**0.5
show("scores", scores)  # (B, H, T+N, T+N): every token against every token
weights = scores.softmax(dim=-1)
a_by_hand = rearrange(weights @ v, "B H L D -> B L (H D)")
print(f"max abs difference {(a_by_hand - a).abs().max():.1e} (float32 round-off: two summation orders)")
check("written-out attention matches SDPA to 1e-6", torch.allclose(a_by_hand, a, atol=1e-6))
txt_a, img_a = a[:, :T], a[:, T:]

# %% [markdown]
# **After attention**, each stream on its own again: a gated residual update with the attention output (projected by
# `proj`), then a gated residual update with an MLP on the re-modulated tokens.

# %%
img_new = img + img_mod1.gate * block.img_attn.proj(img_a)
img_new = img_new + img_mod2.gate * block.img_mlp(modulate(img_new, img_mod2.shift, img_mod2.scale))
txt_new = txt + txt_mod1.gate * block.txt_attn.proj(txt_a)
txt_new = txt_new + txt_mod2.gate * block.txt_mlp(modulate(txt_new, txt_mod2.shift, txt_mod2.scale))
show("img after the block", img_new)
show("txt after the block", txt_new)

img_ref, txt_ref = block(img, txt, vec, pe)  # the module's own forward
check("image stream equal to DoubleStreamBlock.forward", torch.equal(img_new, img_ref))
check("text stream equal to DoubleStreamBlock.forward", torch.equal(txt_new, txt_ref))

# %% [markdown]
# Every operation above is the module's own, in the module's order, so the results are **bit for bit** equal
# (`torch.equal`, not just close). In `mmdit/layers.py` the two halves are the free functions `pre_attention` and
# `post_attention`, shared by the text, image and (notebook 2) concept streams.
#
# ## 5. One single-stream block
#
# After the double blocks, Flux concatenates `[txt; img]` into one sequence and runs **single-stream blocks** (38 in
# the real model): one set of weights for every token, and attention and MLP computed **in parallel** from one fused
# input projection (`linear1` gives q, k, v and the MLP input at once; `linear2` maps the concatenated attention and
# MLP outputs back), with a single gate.

# %%
single = flux.single_blocks[0]
xs = torch.cat((txt_ref, img_ref), dim=1)
show("x = [txt; img]", xs)  # (B, T+N, hidden)
mod, _ = single.modulation(vec)  # one (shift, scale, gate)
fused = single.linear1(modulate(xs, mod.shift, mod.scale))
show("linear1(modulated x)", fused)  # (B, T+N, 3*hidden + mlp_hidden)
qkv, mlp_in = fused.split([3 * config.hidden_size, single.mlp_hidden_dim], dim=-1)
sq, sk, sv = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=heads)
sq, sk = single.norm(sq, sk, sv)
sa = attention(apply_rope(sq, pe), apply_rope(sk, pe), sv)
show("attention output", sa)  # (B, T+N, hidden)
mlp_out = F.gelu(mlp_in, approximate="tanh")
show("MLP hidden (GELU)", mlp_out)  # (B, T+N, mlp_hidden)
xs_new = xs + mod.gate * single.linear2(torch.cat((sa, mlp_out), dim=-1))
show("x after the block", xs_new)
check("equal to SingleStreamBlock.forward", torch.equal(xs_new, single(xs, vec, pe)))

# %% [markdown]
# ## 6. The whole forward, then the Euler sampler
#
# The full model chains what we did: embeddings, all double blocks, all single blocks, then `final_layer` (one more
# modulation and a linear map back to 64 numbers per token) on the image tokens only. We run the chain by hand and
# compare with `Flux.forward`.

# %%
img_h, txt_h = flux.img_in(x), flux.txt_in(txt_t5)
for blk in flux.double_blocks:
    img_h, txt_h = blk(img_h, txt_h, vec, pe)
h_all = torch.cat((txt_h, img_h), dim=1)
for blk in flux.single_blocks:
    h_all = blk(h_all, vec, pe)
velocity_by_hand = flux.final_layer(h_all[:, T:], vec)
velocity = flux(x, img_ids, txt_t5, txt_ids, t, y)
show("velocity", velocity)  # (B, N, 64): one velocity per latent number
check("chain by hand equals Flux.forward", torch.equal(velocity_by_hand, velocity))

# %% [markdown]
# **Sampling.** Rectified flow trains the model so that, on the straight path `x_t = t * noise + (1 - t) * image`,
# the velocity is `noise - image`. Going from noise to image is then an ordinary differential equation that Euler's
# method integrates: `x <- x + (t_next - t) * velocity(x, t)`, with `t` falling from 1 to 0.
#
# `get_schedule` gives the times: schnell takes 4 equal steps; dev (`shift=True`) spends more steps at high noise,
# the more so the bigger the image.

# %%
schedule = get_schedule(4, x.shape[1])
print("schnell schedule:", schedule)
fig, ax = plt.subplots(figsize=(5, 3))
for label, times in [("schnell, 4 steps", schedule),
                     ("dev, 28 steps, 1024^2", get_schedule(28, 4096, shift=True)),
                     ("dev, 28 steps, 256^2", get_schedule(28, 256, shift=True))]:  # fmt: skip
    ax.plot(torch.linspace(0, 1, len(times)), times, marker=".", label=label)
ax.set(xlabel="fraction of the steps done", ylabel="t", title="sampling schedules")
ax.legend()
plt.show()

# %% [markdown]
# `sampling.denoise` takes a `velocity_fn(x, t)` closure, so the caller decides how the model is run (and can keep
# whatever else it wants, as notebook 2 does with concept maps). We record every intermediate and compare with a loop
# written out by hand.

# %%
trajectory = []  # the latents each step starts from


def velocity_fn(x_t: torch.Tensor, t_vec: torch.Tensor) -> torch.Tensor:
    show(f"  x at t = {t_vec.item():.2f}", x_t)
    trajectory.append(x_t)
    return flux(x_t, img_ids, txt_t5, txt_ids, t_vec, y)


x0 = denoise(velocity_fn, x, schedule)
trajectory.append(x0)
x_hand = x
for t_curr, t_next in zip(schedule[:-1], schedule[1:], strict=True):
    x_hand = x_hand + (t_next - t_curr) * flux(x_hand, img_ids, txt_t5, txt_ids, torch.tensor([t_curr]), y)
check("denoise equals the hand-written Euler loop", torch.equal(x0, x_hand))

fig, axes = plt.subplots(1, len(trajectory), figsize=(2.4 * len(trajectory), 2))
for ax, state, t_now in zip(axes, trajectory, schedule, strict=True):
    ax.imshow(unpack(state, HEIGHT, WIDTH)[0, 0], cmap="gray")
    ax.set_title(f"t = {t_now:.2f}")
    ax.axis("off")
fig.suptitle("latent channel 0 along the trajectory (random weights: noise stays noise)")
plt.show()

# %% [markdown]
# Finally the tokens are unpacked to latents and the autoencoder's decoder turns them into pixels (here a tiny random
# autoencoder, so the picture is meaningless; `autoencoder.CONFIGS["flux"]` is the real one).

# %%
latents = unpack(x0, HEIGHT, WIDTH)
show("unpack(x0)", latents)  # (B, 16, H/8, W/8)
decoder = autoencoder.AutoEncoder(autoencoder.CONFIGS["tiny"]).eval()
pixels = decoder.decode(latents)
show("decode(latents)", pixels)  # (B, 3, H, W) in about [-1, 1]

# %% [markdown]
# ## Where to go next
#
# - `mmdit/math.py`, `mmdit/layers.py`, `mmdit/model.py` and `sampling.py` hold everything used above, with the same
#   names.
# - Notebook 2 adds ConceptAttention's **concept stream** to the double-stream block you just wrote out.

# %%
print(f"notebook ran in {time.time() - NOTEBOOK_START:.1f} s ({os.cpu_count()} CPUs)")
