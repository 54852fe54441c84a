"""SD3's prompt conditioning (`sd3.text`) against diffusers' `StableDiffusion3Pipeline.encode_prompt`, the two running
the same tiny random encoders: ours (`clip.CLIPTextEncoder` x2, `t5.T5Encoder`) and transformers'
(`CLIPTextModelWithProjection` x2, `T5EncoderModel`) under one state dict each, with tokenizers read from the same
tiny files (CLIP-L padding with EOS, bigG with "!", a SentencePiece T5). Short and over-long prompts, a batch, with and
without T5, the default ("") and a given negative prompt.
"""

from dataclasses import replace

import pytest
import torch
from test_clip import reference_with_projection, relative_error, write_clip_tokenizer
from test_t5 import reference as t5_reference

import clip
import t5
from sd3.text import CLIP_LENGTH, SD3TextEncoders
from tiny import random_state, train_spiece

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

CLIP_L = replace(clip.CONFIGS["tiny"], projection_dim=24)  # SD3's text_encoder: CLIP-L with a projection
CLIP_G = clip.CONFIGS["tiny-g"]  # text_encoder_2: exact GELU, projection
WIDTH = 96  # T5's d_model = the joint attention width; the CLIPs' 32 + 48 channels are zero-padded to it
T5_CONFIG = replace(t5.CONFIGS["tiny"], d_model=WIDTH)
MAX_LENGTH = 40  # T5 tokens (diffusers' max_sequence_length)

SHORT = "a photo of a red cat on the grass!"  # "!" is bigG's pad token, a special token in its tokenizer
LONG = " ".join(["a blue dog under the bright sky with clouds and a tree"] * 12)  # > 75 CLIP pieces, > 40 T5 pieces


def tiny_transformer() -> torch.nn.Module:
    """Only its config is read by encode_prompt: joint_attention_dim, the width of the zeros standing in for T5."""
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=CLIP_L.projection_dim + CLIP_G.projection_dim,
        out_channels=4,
        pos_embed_max_size=8,
    )


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """(ours: SD3TextEncoders, the diffusers pipeline) sharing weights and tokenizer files."""
    folder = tmp_path_factory.mktemp("sd3")
    write_clip_tokenizer(folder / "tokenizer", "<|endoftext|>")
    write_clip_tokenizer(folder / "tokenizer_2", "!")
    train_spiece(folder / "tokenizer_3")
    ours, references = {}, {}
    # CLIP-L under the legacy eos_token_id 2 (as SD3's config.json), bigG under its real EOS id (the tokenizer's)
    eos = clip.CLIPTokenizer.from_folder(folder / "tokenizer").eos_id
    for name, config, eos_token_id, seed in (("clip_l", CLIP_L, 2, 0), ("clip_g", CLIP_G, eos, 1)):
        ours[name] = clip.CLIPTextEncoder(config).eval()
        state = random_state(ours[name], seed=seed)
        ours[name].load_state_dict(state, strict=True)
        references[name] = reference_with_projection(config, eos_token_id)
        references[name].load_state_dict(state, strict=True)
    ours["t5"] = t5.T5Encoder(T5_CONFIG).eval()
    state = random_state(ours["t5"], seed=2)
    ours["t5"].load_state_dict(state, strict=True)
    references["t5"] = t5_reference(T5_CONFIG)
    missing, unexpected = references["t5"].load_state_dict(state, strict=False)
    assert missing == ["encoder.embed_tokens.weight"] and unexpected == []  # tied to shared.weight
    text = SD3TextEncoders(
        ours["clip_l"],
        clip.CLIPTokenizer.from_folder(folder / "tokenizer"),
        ours["clip_g"],
        clip.CLIPTokenizer.from_folder(folder / "tokenizer_2"),
        ours["t5"],
        t5.T5Tokenizer.from_folder(folder / "tokenizer_3"),
        max_length=MAX_LENGTH,
        width=WIDTH,
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_transformer(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=references["clip_l"],
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        text_encoder_2=references["clip_g"],
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")),
        text_encoder_3=references["t5"],
        tokenizer_3=transformers.T5TokenizerFast.from_pretrained(str(folder / "tokenizer_3")),
    )
    return text, pipe


def without_t5(text: SD3TextEncoders, pipe):
    """The same encoders with T5 left out (diffusers: text_encoder_3=None, tokenizer_3=None)."""
    components = {**pipe.components, "text_encoder_3": None, "tokenizer_3": None}
    return replace(text, t5=None, t5_tokenizer=None), diffusers.StableDiffusion3Pipeline(**components)


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no-t5"])
@pytest.mark.parametrize(
    "prompt, negative",
    [(SHORT, None), (LONG, None), ([SHORT, LONG], None), (SHORT, "blurry, low quality!"), ("", None)],
    ids=["short", "long", "batch", "negative", "empty"],
)
@torch.no_grad()
def test_matches_diffusers_encode_prompt(encoders, with_t5, prompt, negative):
    text, pipe = encoders if with_t5 else without_t5(*encoders)
    if with_t5 and prompt == LONG:  # over-long for both: CLIP keeps 75 pieces, T5 39 (then each its EOS)
        assert len(text.clip_l_tokenizer.encode(LONG)) > CLIP_LENGTH
        assert len(text.t5_tokenizer.encode(LONG)) > MAX_LENGTH
    ours = text.encode_prompt_and_negative(prompt, "" if negative is None else negative)  # diffusers' default: ""
    expected = pipe.encode_prompt(
        prompt,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=True,
        negative_prompt=negative,
        max_sequence_length=MAX_LENGTH,
    )
    batch = 1 if isinstance(prompt, str) else len(prompt)
    assert ours[0].shape == (batch, CLIP_LENGTH + MAX_LENGTH, WIDTH)
    assert ours[2].shape == (batch, CLIP_L.projection_dim + CLIP_G.projection_dim)
    names = ("tokens", "negative tokens", "pooled", "negative pooled")
    errors = {name: relative_error(a, b) for name, a, b in zip(names, ours, expected, strict=True)}
    absolute = max((a - b).abs().max().item() for a, b in zip(ours, expected, strict=True))
    print(
        f"SD3 text ({'with' if with_t5 else 'without'} T5, {prompt if isinstance(prompt, str) else 'batch'!r:.20}): "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + f" relative; max abs {absolute:.2e}"
    )
    for a, b in zip(ours, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    # fp32 tolerance 1e-5 of the largest value: the same maths on O(1) values (SDPA against explicit softmax ~1e-7)
    assert max(errors.values()) <= 1e-5
    if not with_t5:
        assert (ours[0][:, CLIP_LENGTH:] == 0).all()


@torch.no_grad()
def test_layout(encoders):
    """CLIP-L's channels, then bigG's, then zeros on the first 77 positions; T5 after; pooled = L's then bigG's."""
    text, _ = encoders
    tokens, pooled = text.encode_prompt(SHORT)
    hidden_l, pooled_l = text.clip_l(text.clip_l_tokenizer(SHORT), penultimate=True)
    hidden_g, pooled_g = text.clip_g(text.clip_g_tokenizer(SHORT), penultimate=True)
    l_width, g_width = CLIP_L.hidden_size, CLIP_G.hidden_size
    torch.testing.assert_close(tokens[:, :CLIP_LENGTH, :l_width], hidden_l, rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, :CLIP_LENGTH, l_width : l_width + g_width], hidden_g, rtol=0, atol=0)
    assert (tokens[:, :CLIP_LENGTH, l_width + g_width :] == 0).all()
    torch.testing.assert_close(tokens[:, CLIP_LENGTH:], text.encode_t5(SHORT), rtol=0, atol=0)
    torch.testing.assert_close(pooled, torch.cat([pooled_l, pooled_g], dim=-1), rtol=0, atol=0)
    # concepts: the same per-token states for any text, in the prompt's layout
    concepts = ["cat", "grass", "sky"]
    torch.testing.assert_close(text.clip_tokens(concepts)[1:2], text.clip_tokens("grass"), rtol=0, atol=1e-6)
    assert text.clip_tokens(concepts).shape == (3, CLIP_LENGTH, WIDTH)
    assert text.encode_t5(concepts).shape == (3, MAX_LENGTH, WIDTH)


def test_errors(encoders):
    text, _ = encoders
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        text.encode_prompt_and_negative(SHORT, ["a", "b"])
    with pytest.raises(ValueError, match="t5 and t5_tokenizer come together"):
        replace(text, t5=None)
    with pytest.raises(ValueError, match="T5's d_model 96 differs from the joint width 4096"):
        replace(text, width=4096)
    with pytest.raises(ValueError, match="do not fit the joint width 64"):
        replace(text, t5=None, t5_tokenizer=None, width=64)
    with pytest.raises(ValueError, match="clip_l has no text_projection"):
        replace(text, clip_l=clip.CLIPTextEncoder(clip.CONFIGS["tiny"]))
