"""Tests of mmdit: equivalence with diffusers' Flux, the concept stream against independent computations, the
checkpoint manifest, and config validation. Tiny random models only (fast on a CPU)."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from manifests import manifest_path
from mmdit import CONFIGS, ConceptInput, Flux, FluxConfig, FluxOutput
from mmdit.layers import SPACES
from mmdit.math import TARGETS

ROOT = Path(__file__).resolve().parents[1]


def random_flux(config: FluxConfig, seed: int = 0, std: float = 0.2) -> Flux:
    """A model with weights and biases drawn from N(0, std^2) and QK RMSNorm scales from N(1, std^2): scales near 1,
    as in trained models, keep the attention peaked (scales near 0 would make it uniform)."""
    model = Flux(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if name.endswith(".scale") else 0.0))
    return model.eval()


def grid_ids(batch: int, rows: int, cols: int) -> torch.Tensor:
    """Image token positions (0, row, col), row-major, as Flux's sampling code makes them."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(1, rows * cols, 3).expand(batch, -1, -1)


def random_inputs(config: FluxConfig, batch: int = 2, rows: int = 6, cols: int = 10, text: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(batch, rows * cols, config.in_channels, generator=gen),
        img_ids=grid_ids(batch, rows, cols),
        txt=torch.randn(batch, text, config.context_in_dim, generator=gen),
        txt_ids=torch.zeros(batch, text, 3),
        timesteps=torch.rand(batch, generator=gen),
        y=torch.randn(batch, config.vec_in_dim, generator=gen),
    )


# ---------------------------------------------------------------------------------------------------------------------
# equivalence with diffusers' FluxTransformer2DModel


def bfl_to_diffusers(state: dict[str, torch.Tensor], config: FluxConfig) -> dict[str, torch.Tensor]:
    """Convert a BFL-named state dict with the shared map (ops copy, chunk3:i, split_single:i, swap_shift_scale)."""
    h, mlp_hidden = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    out, used = {}, set()
    for line in manifest_path("flux.bfl-to-diffusers.tsv").read_text().splitlines():
        bfl, diffusers, op = line.split("\t")
        if bfl not in state:  # the map lists 19 + 38 blocks; the tiny model has fewer
            continue
        w, used = state[bfl], used | {bfl}
        if op == "copy":
            out[diffusers] = w
        elif op.startswith("chunk3:"):
            out[diffusers] = w.chunk(3, dim=0)[int(op.split(":")[1])]
        elif op.startswith("split_single:"):
            out[diffusers] = w.split([h, h, h, mlp_hidden], dim=0)[int(op.split(":")[1])]
        elif op == "swap_shift_scale":
            shift, scale = w.chunk(2, dim=0)
            out[diffusers] = torch.cat((scale, shift), dim=0)
        else:
            raise ValueError(f"unknown op {op}")
    if config.guidance_embed:  # the map covers schnell; dev's guidance_in follows checkpoints.md §2.3
        for bfl_layer, diffusers_layer in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            for kind in ("weight", "bias"):
                name = f"guidance_in.{bfl_layer}.{kind}"
                out[f"time_text_embed.guidance_embedder.{diffusers_layer}.{kind}"] = state[name]
                used.add(name)
    assert used == set(state), f"BFL tensors the map does not cover: {sorted(set(state) - used)}"
    return out


@pytest.mark.parametrize("guidance_embed", [False, True])
@pytest.mark.parametrize("manual_attention", [False, True])
def test_matches_diffusers(guidance_embed, manual_attention):
    from diffusers import FluxTransformer2DModel

    config = dataclasses.replace(CONFIGS["tiny"], guidance_embed=guidance_embed, manual_attention=manual_attention)
    ours = random_flux(config)
    theirs = FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim,
        pooled_projection_dim=config.vec_in_dim,
        guidance_embeds=guidance_embed,
        axes_dims_rope=config.axes_dim,
    ).eval()
    theirs.load_state_dict(bfl_to_diffusers(ours.state_dict(), config), strict=True)

    x = random_inputs(config)  # batch 2, a 6 x 10 token grid, 7 text tokens
    guidance = torch.tensor([3.5, 1.0]) if guidance_embed else None
    with torch.no_grad():
        got = ours(**x, guidance=guidance)
        want = theirs(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=guidance,
            return_dict=False,
        )[0]
    err = (got - want).abs().max().item()
    print(
        f"diffusers guidance_embed={guidance_embed} manual={manual_attention}: max abs error {err:.2e}, "
        f"output max {want.abs().max().item():.2f}"
    )
    # float32 round-off only: with std-0.2 weights diffusers and BFL's own code differ by about 8e-6 on outputs of
    # order 10-30 (float64 RoPE frequencies there, float32 here; other summation orders); we measure 6e-6 to 1.4e-5.
    # 1e-4 leaves margin, while a real mistake (a swapped chunk, a wrong RoPE pairing) gives errors of order 1.
    assert err < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# the concept stream


def all_concepts(config: FluxConfig, target: str, C: int = 3, seed: int = 2, **kwargs) -> ConceptInput:
    gen = torch.Generator().manual_seed(seed)
    return ConceptInput(torch.randn(2, C, config.context_in_dim, generator=gen), target=target, spaces=SPACES, **kwargs)


def embed(model: Flux, x: dict) -> tuple[torch.Tensor, ...]:
    """The double blocks' inputs, from the model's own embedders."""
    from mmdit.math import timestep_embedding

    vec = model.time_in(timestep_embedding(x["timesteps"], 256)) + model.vector_in(x["y"])
    pe = model.pe_embedder(torch.cat((x["txt_ids"], x["img_ids"]), dim=1))
    return model.img_in(x["img"]), model.txt_in(x["txt"]), vec, pe


@pytest.mark.parametrize("manual_attention", [False, True])
def test_image_and_text_unchanged_by_concepts(manual_attention):
    config = dataclasses.replace(CONFIGS["tiny"], manual_attention=manual_attention)
    model, x = random_flux(config), random_inputs(config)
    with torch.no_grad():
        plain = model(**x)
        for target in TARGETS:
            out = model(**x, concepts=all_concepts(config, target, normalize=target == "image"))
            assert isinstance(out, FluxOutput) and sorted(out.saliency) == list(range(config.depth))
            assert torch.equal(out.velocity, plain), target

        # block by block: the image and text outputs are bitwise those of the block without concepts
        img, txt, vec, pe = embed(model, x)
        c = model.txt_in(all_concepts(config, "none").txt)
        c_pe = model.pe_embedder(torch.zeros(2, c.shape[1], 3))
        for block in model.double_blocks:
            img_ref, txt_ref = block(img, txt, vec, pe)
            for target in TARGETS:
                img_c, txt_c, _, _ = block(img, txt, vec, pe, c, vec, c_pe, target, SPACES)
                assert torch.equal(img_c, img_ref) and torch.equal(txt_c, txt_ref), target
            img, txt = img_ref, txt_ref


def test_prompt_as_concepts_reproduces_text_stream():
    """Concepts = the prompt tokens with the prompt's vector and positions: [concepts; image] is then [txt; image], so
    the concept stream must equal the text stream at every double block."""
    config = CONFIGS["tiny"]
    model, x = random_flux(config), random_inputs(config)
    x["txt_ids"] = torch.randint(0, 5, x["txt_ids"].shape).float()  # non-zero text positions: concept_pe matters
    with torch.no_grad():
        img, txt, vec, pe = embed(model, x)
        T = txt.shape[1]
        zero_y_vec = vec - model.vector_in(x["y"]) + model.vector_in(torch.zeros_like(x["y"]))
        c, c_control = txt, txt
        for i, block in enumerate(model.double_blocks):
            img_next, txt_next, c, _ = block(img, txt, vec, pe, c, vec, pe[:, :, :T])
            _, _, c_control, _ = block(img, txt, vec, pe, c_control, zero_y_vec, pe[:, :, :T])
            err = (c - txt_next).abs().max().item()
            control = (c_control - txt_next).abs().max().item()
            print(
                f"block {i}: concept vs text max abs error {err:.2e}, text max {txt_next.abs().max().item():.1f} "
                f"(control with y_c = 0: {control:.2e})"
            )
            # float32 round-off: the text rows come from SDPA over [txt; img], the concept rows from the explicit
            # split softmax; the orders of summation differ (measured: about 4e-7 of the stream's largest value).
            assert err < 1e-5 * max(1.0, txt_next.abs().max().item())
            assert control > 1e-2  # the check can fail: another modulation vector changes the stream
            img, txt = img_next, txt_next


def reference_block(block, streams, vectors, positions, target, normalize, config):
    """The double block with the concept stream written out in float64 from the block's weights: RMSNorm by hand,
    RoPE as complex multiplication, full softmax attention over concatenated keys.

    streams = (img, txt, concepts), vectors = (vec, concept_vec), positions = ([txt; img] ids, concept ids).
    Returns the three updated streams, the four saliency spaces, and the error slack of the normalised output space.
    """
    W = {name: p.double() for name, p in block.state_dict().items()}
    H, axes_dim, theta = block.num_heads, config.axes_dim, config.theta
    img, txt, c = (t.double() for t in streams)
    vec, c_vec = (t.double() for t in vectors)
    ids, c_ids = positions

    def rotate(x, ids):  # x (B, H, L, D), ids (B, L, n_axes)
        angles = torch.cat(
            [
                ids[..., i : i + 1].double() * theta ** (-torch.arange(0, d, 2).double() / d)
                for i, d in enumerate(axes_dim)
            ],
            dim=-1,
        )  # (B, L, D/2)
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)

    def stream(x, v, prefix):  # modulation, adaLN, q k v heads with RMSNorm
        m = F.linear(F.silu(v), W[f"{prefix}_mod.lin.weight"], W[f"{prefix}_mod.lin.bias"])[:, None].chunk(6, dim=-1)
        xm = (1 + m[1]) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + m[0]
        qkv = F.linear(xm, W[f"{prefix}_attn.qkv.weight"], W[f"{prefix}_attn.qkv.bias"])
        q, k, v = qkv.unflatten(-1, (3, H, -1)).permute(2, 0, 3, 1, 4)
        q, k = (t / (t.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() for t in (q, k))
        return q * W[f"{prefix}_attn.norm.query_norm.scale"], k * W[f"{prefix}_attn.norm.key_norm.scale"], v, m

    def update(x, o, m, prefix):
        x = x + m[2] * F.linear(o, W[f"{prefix}_attn.proj.weight"], W[f"{prefix}_attn.proj.bias"])
        hmid = F.gelu(
            F.linear(
                (1 + m[4]) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + m[3],
                W[f"{prefix}_mlp.0.weight"],
                W[f"{prefix}_mlp.0.bias"],
            ),
            approximate="tanh",
        )
        return x + m[5] * F.linear(hmid, W[f"{prefix}_mlp.2.weight"], W[f"{prefix}_mlp.2.bias"])

    def softmax_attention(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v

    def heads_cat(t):  # (B, H, L, D) -> (B, L, H*D)
        return t.transpose(1, 2).flatten(2)

    T, C = txt.shape[1], c.shape[1]
    qi, ki, vi, mi = stream(img, vec, "img")
    qt, kt, vt, mt = stream(txt, vec, "txt")
    qc, kc, vc, mc = stream(c, c_vec, "txt")
    q_rot, k_rot = rotate(torch.cat((qt, qi), 2), ids), rotate(torch.cat((kt, ki), 2), ids)
    o = heads_cat(softmax_attention(q_rot, k_rot, torch.cat((vt, vi), 2)))
    o_x = o[:, T:]
    qc_rot, kc_rot = rotate(qc, c_ids), rotate(kc, c_ids)
    keys, values = {
        "concepts+image": (torch.cat((kc_rot, k_rot[:, :, T:]), 2), torch.cat((vc, vi), 2)),
        "image": (k_rot[:, :, T:], vi),
        "concepts": (kc_rot, vc),
        "none": (None, vc),
    }[target]
    o_c = heads_cat(vc if keys is None else softmax_attention(qc_rot, keys, values))
    o_c_n, output_slack, vc_n, value_slack = o_c, 0.0, vc, 0.0
    if normalize:  # per feature, across concepts: (x - min) / sum(x - min)
        spread = (o_c - o_c.min(1, keepdim=True).values).sum(1, keepdim=True)  # (B, 1, H*D)
        o_c_n = (o_c - o_c.min(1, keepdim=True).values) / spread
        # This map is ill-conditioned where a feature's concept values nearly coincide (small spread): a float32 error
        # e in o_c moves the normalised weights by up to about 2 (C + 1) e / spread. Allow that, with e = 1e-5 max|o_c|
        # (the measured float32 error of o_c is a few 1e-6 of its scale), summed against |o_x| per image token.
        weight_slack = 2 * (C + 1) * 1e-5 * o_c.abs().max() / spread  # (B, 1, H*D)
        output_slack = weight_slack @ o_x.abs().transpose(1, 2)  # (B, 1, N)
        # the same normalisation of v_c per head and feature, for the value space (and the same slack)
        v_spread = (vc - vc.min(2, keepdim=True).values).sum(2, keepdim=True)  # (B, H, 1, D)
        vc_n = (vc - vc.min(2, keepdim=True).values) / v_spread
        value_slack = (2 * (C + 1) * 1e-5 * vc.abs().max() / v_spread) @ vi.abs().transpose(-2, -1)  # (B, H, 1, N)
    saliency = dict(
        output=o_c_n @ o_x.transpose(1, 2),
        attention=torch.softmax(
            qc_rot @ torch.cat((kc_rot, k_rot[:, :, T:]), 2).transpose(-2, -1) / math.sqrt(qc.shape[-1]), dim=-1
        )[..., C:],
        value=vc_n @ vi.transpose(-2, -1),
        cross_attention=kc @ qi.transpose(-2, -1),
    )
    outputs = (update(img, o_x, mi, "img"), update(txt, o[:, :T], mt, "txt"), update(c, o_c, mc, "txt"))
    return outputs, saliency, {"output": output_slack, "value": value_slack}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("normalize", [False, True])
def test_block_saliency_matches_direct_computation(target, normalize):
    config = CONFIGS["tiny"]
    model, x = random_flux(config), random_inputs(config)
    gen = torch.Generator().manual_seed(5)
    c_ids = torch.randint(0, 4, (2, 3, 3), generator=gen).float()  # non-zero concept positions: their RoPE matters
    with torch.no_grad():
        img, txt, vec, pe = embed(model, x)
        c = model.txt_in(torch.randn(2, 3, config.context_in_dim, generator=gen))
        c_vec = vec + torch.randn(vec.shape, generator=gen)
        ids = torch.cat((x["txt_ids"], x["img_ids"]), dim=1)
        for i, block in enumerate(model.double_blocks):
            *got, s = block(img, txt, vec, pe, c, c_vec, model.pe_embedder(c_ids), target, SPACES, normalize)
            want, want_s, slack = reference_block(
                block, (img, txt, c), (vec, c_vec), (ids, c_ids), target, normalize, config
            )
            # float32 block against a float64 reference: round-off of about 1e-6 of each quantity's largest value
            for name, a, b in [("img", got[0], want[0]), ("txt", got[1], want[1]), ("concepts", got[2], want[2])] + [
                (space, getattr(s, space), want_s[space]) for space in SPACES
            ]:
                assert a.shape == b.shape and (name not in SPACES or a.dtype == torch.float32), name
                err = (a.double() - b).abs()
                tol = 2e-5 * max(1.0, b.abs().max().item()) + slack.get(name, 0.0)
                print(
                    f"block {i} {target} normalize={normalize} {name}: max abs error {err.max().item():.2e}, "
                    f"max value {b.abs().max().item():.1f}"
                )
                assert (err <= tol).all(), name
            img, txt, c = got


@pytest.mark.parametrize("manual_attention", [False, True])
def test_attention_mask_hides_a_text_token_as_if_it_were_absent(manual_attention):
    # A text token no query may attend to cannot influence anything; with text ids all zero, the image then comes out
    # as if that token had never been in the prompt. Independent of the mask code: the reference drops the token.
    config = dataclasses.replace(CONFIGS["tiny"], manual_attention=manual_attention)
    model, x = random_flux(config), random_inputs(config)
    T, N, j = x["txt"].shape[1], x["img"].shape[1], 3
    keep = [i for i in range(T) if i != j]
    mask = torch.ones(2, T + N, T + N, dtype=torch.bool)
    mask[:, :, j] = False
    with torch.no_grad():
        masked = model(**x, attention_mask=mask)
        dropped = model(**{**x, "txt": x["txt"][:, keep], "txt_ids": x["txt_ids"][:, keep]})
        everything = model(**x, attention_mask=torch.ones(2, T + N, T + N, dtype=torch.bool))
        plain = model(**x)
    error = (masked - dropped).abs().max().item()
    print(f"masked token vs dropped token: max abs error {error:.2e} on outputs up to {dropped.abs().max():.1f}")
    assert error < 1e-4  # float32 round-off on outputs of size ~20 (the diffusers comparison's tolerance)
    assert (masked - plain).abs().max() > 1e-2  # the token mattered, so the comparison tests something
    assert torch.allclose(everything, plain, atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask must be bool"):
        model(**x, attention_mask=mask[:, :-1])


def test_stop_after_double_and_layers():
    config = CONFIGS["tiny"]
    model, x = random_flux(config), random_inputs(config)
    with torch.no_grad():
        full = model(**x, concepts=all_concepts(config, "concepts+image"))
        only1 = model(**x, concepts=all_concepts(config, "concepts+image", layers=(1,)), stop_after_double=True)
        plain = model(**x, stop_after_double=True)
    assert only1.velocity is None and sorted(only1.saliency) == [1]
    assert plain.velocity is None and plain.saliency == {}
    for space in SPACES:
        assert torch.equal(getattr(only1.saliency[1], space), getattr(full.saliency[1], space))
    with torch.no_grad():
        default = model(**x, concepts=ConceptInput(x["txt"][:, :2]))  # spaces=("output",)
    for s in default.saliency.values():
        assert s.output.shape == (2, 2, 60) and s.attention is None and s.value is None and s.cross_attention is None


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint layout and validation


@pytest.mark.parametrize("name", ["flux-schnell", "flux-dev"])
def test_meta_model_matches_manifest_path(name):
    with torch.device("meta"):
        model = Flux(CONFIGS[name])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {}
    for line in manifest_path("flux1-schnell.bfl.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        want[key] = [int(s) for s in shape.strip("[]").split(",")]
    if name == "flux-dev":  # dev = schnell + the guidance embedder (checkpoints.md §2.1-2.2)
        h = CONFIGS[name].hidden_size
        want |= {
            "guidance_in.in_layer.weight": [h, 256],
            "guidance_in.in_layer.bias": [h],
            "guidance_in.out_layer.weight": [h, h],
            "guidance_in.out_layer.bias": [h],
        }
    assert got == want
    if name == "flux-schnell":
        assert len(got) == 776 and sum(math.prod(s) for s in got.values()) == 11_891_178_560


def test_config_validation():
    tiny = CONFIGS["tiny"]
    with pytest.raises(ValueError, match="sum\\(axes_dim\\)"):
        dataclasses.replace(tiny, axes_dim=(4, 14, 16))
    with pytest.raises(ValueError, match="not divisible"):
        dataclasses.replace(tiny, num_heads=3)
    with pytest.raises(ValueError, match="even"):
        dataclasses.replace(tiny, axes_dim=(5, 13, 14))
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        dataclasses.replace(tiny, hidden_size=0)
    with pytest.raises(ValueError, match="target"):
        ConceptInput(torch.zeros(1, 2, 32), target="prompt")
    with pytest.raises(ValueError, match="spaces"):
        ConceptInput(torch.zeros(1, 2, 32), spaces=("outputs",))
    with pytest.raises(ValueError, match="concept txt"):
        ConceptInput(torch.zeros(2, 32))
    model, x = random_flux(tiny), random_inputs(tiny)
    with pytest.raises(ValueError, match="layers"):
        model(**x, concepts=ConceptInput(torch.zeros(2, 2, 32), layers=(tiny.depth,)))
    with pytest.raises(ValueError, match="guidance"):
        random_flux(dataclasses.replace(tiny, guidance_embed=True))(**x)
