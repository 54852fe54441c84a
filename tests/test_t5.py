"""The T5 v1.1 encoder against transformers' T5EncoderModel (same random weights), the checkpoint manifest, the bucket
table of the checkpoint notes, and its errors. Tiny configs only."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from manifests import manifest_shapes
from t5 import CONFIGS, T5Config, T5Encoder
from t5.model import relative_position_bucket
from tiny import random_state

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
# A wider relative-position range than the tiny preset, so that sequences of 40 reach the logarithmic buckets.
TINY = replace(CONFIGS["tiny"], relative_attention_num_buckets=16, relative_attention_max_distance=20)


def reference(config: T5Config) -> torch.nn.Module:
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        layer_norm_epsilon=config.layer_norm_epsilon,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    hf_config._attn_implementation = "eager"
    return transformers.T5EncoderModel(hf_config).eval()


@pytest.fixture(scope="module")
def pair():
    ours = T5Encoder(TINY).eval()
    state = random_state(ours, seed=0)
    ours.load_state_dict(state, strict=True)
    hf = reference(TINY)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # the file has no encoder.embed_tokens.weight: transformers ties it to shared.weight, which the state dict fills
    assert missing == ["encoder.embed_tokens.weight"] and unexpected == []
    assert hf.encoder.embed_tokens.weight.data_ptr() == hf.shared.weight.data_ptr()
    return ours, hf


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows: 40 pieces + EOS, and 9 pieces + EOS padded with 0, as the tokenizer lays them out."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, TINY.vocab_size, (2, 41), generator=g)
    ids[0, -1] = 1
    ids[1, 9] = 1
    ids[1, 10:] = 0
    return ids, (ids != 0).long()


@torch.no_grad()
@pytest.mark.parametrize("manual", [False, True], ids=["sdpa", "manual"])
def test_matches_transformers_fp32(pair, manual):
    ours, hf = pair
    if manual:  # the same weights through the readable L x L path
        ours = T5Encoder(replace(TINY, manual_attention=True)).eval()
        ours.load_state_dict(pair[0].state_dict(), strict=True)
    ids, mask = batch()
    # fp32 tolerance 1e-5: the same maths on O(1) values (outputs up to ~4); only summation order, the GELU kernel
    # (torch's tanh GELU against transformers' explicit formula, ~1e-7) and, on the SDPA path, the fused kernel's
    # softmax (~5e-6, as between transformers' own SDPA and eager paths) differ.
    unmasked = (ours(ids) - hf(input_ids=ids).last_hidden_state).abs().max().item()  # how Flux runs T5
    masked = (ours(ids, mask) - hf(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max().item()
    path = "manual" if manual else "SDPA"
    print(f"T5 fp32 ({path}) max abs error: no mask {unmasked:.2e}, with padding mask {masked:.2e}")
    assert unmasked <= 1e-5 and masked <= 1e-5
    # the mask must matter (padding is attended to without it), or the masked comparison would test nothing
    assert (ours(ids, mask) - ours(ids)).abs().max() > 1e-3


@torch.no_grad()
def test_zero_layers_match_transformers():
    """num_layers = 0 (the shapes research's encoder that does not mix words): embeddings and the final norm only."""
    config = replace(TINY, num_layers=0)
    ours = T5Encoder(config).eval()
    state = random_state(ours, seed=3)
    ours.load_state_dict(state, strict=True)
    hf = reference(config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert missing == ["encoder.embed_tokens.weight"] and unexpected == []  # tied to shared.weight, as in `pair`
    ids, _ = batch()
    error = (ours(ids) - hf(input_ids=ids).last_hidden_state).abs().max().item()
    print(f"T5 with no layers, fp32 max abs error: {error:.2e}")
    assert error <= 1e-6
    # no token sees another: a word's output does not depend on its neighbours
    assert torch.equal(ours(ids)[0, :5], ours(ids[:, :5])[0])


@torch.no_grad()
def test_matches_transformers_bf16(pair):
    ours, hf = pair
    ids, _ = batch()
    exact = ours(ids)
    ours16, hf16 = T5Encoder(TINY).eval(), reference(TINY)
    ours16.load_state_dict(ours.state_dict())
    hf16.load_state_dict(hf.state_dict())
    ours16, hf16 = ours16.to(torch.bfloat16), hf16.to(torch.bfloat16)
    a, b = ours16(ids).float(), hf16(input_ids=ids).last_hidden_state.float()
    error = (a - b).abs().max().item()
    print(
        f"T5 bf16 max abs error against transformers {error:.2e}; against fp32: ours "
        f"{(a - exact).abs().max().item():.2e}, transformers {(b - exact).abs().max().item():.2e}"
    )
    # bf16 tolerance: the two sides round at the same points except inside the GELU (torch's fused tanh GELU here,
    # transformers' five-op formula, each op rounded to bf16; with that formula the outputs are bitwise equal). So
    # they may differ by the size of bf16's own error: at most the reference's error against fp32 (~0.2 on outputs
    # up to ~4, i.e. a few bf16 steps of 2^-6), and ours must be no less accurate than the reference.
    reference_error = (b - exact).abs().max().item()
    assert error <= reference_error
    assert (a - exact).abs().max().item() <= 1.25 * reference_error


def test_meta_model_matches_manifest_shapes():
    with torch.device("meta"):
        model = T5Encoder(CONFIGS["t5-v1_1-xxl"])
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    expected = manifest_shapes("text_encoder_2.t5.tsv")
    assert sorted(ours) == sorted(expected)  # shared.weight only: no encoder.embed_tokens.weight
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656  # checkpoint notes, section 4.2


def test_strict_loading_of_manifest_names():
    """A dict with exactly the file's names loads with strict=True; one name short, or the tied copy extra, fails."""
    shapes = manifest_shapes("text_encoder_2.t5.tsv")
    state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    with torch.device("meta"):
        model = T5Encoder(CONFIGS["t5-v1_1-xxl"])
    model.load_state_dict(state, strict=True, assign=True)
    missing = dict(state)
    del missing["encoder.block.3.layer.1.DenseReluDense.wo.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*encoder\.block\.3\.layer\.1\.DenseReluDense\.wo"):
        model.load_state_dict(missing, strict=True, assign=True)
    extra = state | {"encoder.embed_tokens.weight": state["shared.weight"]}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*encoder\.embed_tokens\.weight"):
        model.load_state_dict(extra, strict=True, assign=True)


def test_relative_position_bucket_table():
    """The bucket of each key - query distance for 32 buckets / max distance 128, from the checkpoint notes 4.3."""
    table = {0: 0, 1: 17, 7: 23, 8: 24, 11: 24, 12: 25, 15: 25, 16: 26, 22: 26, 23: 27, 31: 27, 32: 28, 45: 28}
    table |= {46: 29, 63: 29, 64: 30, 90: 30, 91: 31, 500: 31, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -15: 9, -16: 10}
    table |= {-22: 10, -23: 11, -31: 11, -32: 12, -45: 12, -46: 13, -63: 13, -64: 14, -90: 14, -91: 15, -500: 15}
    distances = torch.tensor(list(table))
    assert relative_position_bucket(distances, 32, 128).tolist() == list(table.values())


def test_errors():
    model = T5Encoder(CONFIGS["tiny"])
    ids = torch.tensor([[5, 6, 1], [7, 512, 1]])
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        model(ids)
    with pytest.raises(ValueError, match="token id -3 "):
        model(torch.tensor([[-3, 1]]))
    with pytest.raises(ValueError, match="float16.*bfloat16"):
        model.half()(torch.tensor([[5, 1]]))
    with pytest.raises(ValueError, match="relative_attention_num_buckets"):
        replace(CONFIGS["tiny"], relative_attention_num_buckets=30)
    with pytest.raises(ValueError, match="d_model must be positive"):
        replace(CONFIGS["tiny"], d_model=0)
