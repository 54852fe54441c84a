"""The CLIP text encoder against transformers' CLIPTextModel (same random weights), the checkpoint manifest, and its
errors. Tiny configs only."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from clip import CONFIGS, CLIPTextConfig, CLIPTextEncoder
from clip.model import LEGACY_KEYS
from manifests import manifest_shapes
from tiny import random_state

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIGS["tiny"]
EOS = TINY.vocab_size - 1  # as in CLIP's vocabulary, <|endoftext|> is the last id and <|startoftext|> the one before
BOS = TINY.vocab_size - 2


def reference(config: CLIPTextConfig) -> torch.nn.Module:
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act="quick_gelu",
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=2,  # FLUX.1's legacy value: pooled at the argmax of the ids
        pad_token_id=1,
    )
    hf_config._attn_implementation = "eager"
    return transformers.CLIPTextModel(hf_config).eval()


def to_reference(state: dict[str, torch.Tensor], hf: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our checkpoint names -> the reference's (transformers 5 drops the `text_model.` prefix from its own)."""
    names = set(hf.state_dict())
    return {name if name in names else name.removeprefix("text_model."): t for name, t in state.items()}


@pytest.fixture(scope="module")
def pair():
    ours = CLIPTextEncoder(TINY).eval()
    state = random_state(ours, seed=0)
    ours.load_state_dict(state, strict=True)
    hf = reference(TINY)
    hf.load_state_dict(to_reference(state, hf), strict=True)
    return ours, hf


def batch() -> torch.Tensor:
    """Two rows of 77 as the tokenizer lays them out: BOS, 20 pieces, EOS, EOS padding; and BOS, 75 pieces, EOS."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, BOS, (2, 77), generator=g)
    ids[:, 0] = BOS
    ids[0, 21:] = EOS
    ids[1, -1] = EOS
    return ids


@torch.no_grad()
def test_matches_transformers_fp32(pair):
    ours, hf = pair
    ids = batch()
    hidden, pooled = ours(ids)
    expected = hf(input_ids=ids)
    # fp32 tolerance 1e-5: the same maths on O(1) values; SDPA against the explicit softmax differ by ~1e-7.
    hidden_error = (hidden - expected.last_hidden_state).abs().max().item()
    pooled_error = (pooled - expected.pooler_output).abs().max().item()
    print(f"CLIP fp32 max abs error: last hidden state {hidden_error:.2e}, pooled {pooled_error:.2e}")
    assert hidden_error <= 1e-5 and pooled_error <= 1e-5
    torch.testing.assert_close(pooled, hidden[[0, 1], [21, 76]], rtol=0, atol=0)  # at the first EOS
    short = ids[:, :30]  # fewer than 77 tokens work too
    assert (ours(short)[1] - hf(input_ids=short).pooler_output).abs().max() <= 1e-5


@torch.no_grad()
def test_matches_transformers_bf16(pair):
    ours, hf = pair
    ids = batch()
    exact_hidden, exact_pooled = ours(ids)
    ours16, hf16 = CLIPTextEncoder(TINY).eval(), reference(TINY)
    ours16.load_state_dict(ours.state_dict())
    hf16.load_state_dict(hf.state_dict())
    ours16, hf16 = ours16.to(torch.bfloat16), hf16.to(torch.bfloat16)
    hidden, pooled = (t.float() for t in ours16(ids))
    expected = hf16(input_ids=ids)
    ref_hidden, ref_pooled = expected.last_hidden_state.float(), expected.pooler_output.float()
    error = max((hidden - ref_hidden).abs().max().item(), (pooled - ref_pooled).abs().max().item())
    reference_error = (ref_hidden - exact_hidden).abs().max().item()
    ours_error = (hidden - exact_hidden).abs().max().item()
    print(
        f"CLIP bf16 max abs error against transformers {error:.2e}; against fp32: ours {ours_error:.2e}, "
        f"transformers {reference_error:.2e}"
    )
    # bf16 tolerance: the two sides round at different points only inside attention (SDPA's fused kernel against
    # the explicit bf16 matmul + fp32 softmax), so they may differ by bf16's own error: at most the reference's error
    # against fp32, and ours must be no less accurate than the reference.
    assert error <= reference_error
    assert ours_error <= 1.25 * reference_error
    assert (pooled - exact_pooled).abs().max().item() <= 1.25 * reference_error


def test_meta_model_matches_manifest_shapes():
    with torch.device("meta"):
        model = CLIPTextEncoder(CONFIGS["clip-vit-large-patch14"])
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    expected = manifest_shapes("text_encoder.clip.tsv")
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == 123_060_480  # checkpoint notes, section 5.2


def test_strict_loading_of_manifest_names():
    """Exactly the file's names load with strict=True; one short fails; a legacy position_ids buffer must be dropped
    first (LEGACY_KEYS lists it for the loader)."""
    shapes = manifest_shapes("text_encoder.clip.tsv")
    state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    with torch.device("meta"):
        model = CLIPTextEncoder(CONFIGS["clip-vit-large-patch14"])
    model.load_state_dict(state, strict=True, assign=True)
    missing = dict(state)
    del missing["text_model.final_layer_norm.bias"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*text_model\.final_layer_norm\.bias"):
        model.load_state_dict(missing, strict=True, assign=True)
    legacy = state | {"text_model.embeddings.position_ids": torch.arange(77)[None]}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*position_ids"):
        model.load_state_dict(legacy, strict=True, assign=True)
    model.load_state_dict({k: v for k, v in legacy.items() if k not in LEGACY_KEYS}, strict=True, assign=True)


def test_errors():
    model = CLIPTextEncoder(TINY)
    with pytest.raises(ValueError, match=f"token id {TINY.vocab_size} is outside the vocabulary"):
        model(torch.tensor([[BOS, 5, TINY.vocab_size, EOS]]))
    with pytest.raises(ValueError, match="78 tokens exceed the 77 positions"):
        model(torch.full((1, 78), EOS))
    with pytest.raises(ValueError, match="not divisible"):
        replace(TINY, num_attention_heads=5)
    with pytest.raises(ValueError, match="layer_norm_eps must be positive"):
        replace(TINY, layer_norm_eps=0.0)
