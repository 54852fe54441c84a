"""The CLIP text encoder against transformers' CLIPTextModel and CLIPTextModelWithProjection (same random weights), the
checkpoint manifest, loading SD3's two CLIPs from folders transformers wrote, the tokenizer's pad token (CLIP-L: EOS,
bigG: "!") against transformers' CLIPTokenizer, and the errors. Tiny configs only (bigG's layout on the meta device)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_tokenizers import STRINGS, bytes_to_unicode, corpus, learn_merges

import weights
from clip import CONFIGS, CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer
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


# ---------------------------------------------------------------------------------------- SD3: projection, bigG, gelu

# (name, config, eos_token_id of the reference's config): SD3's CLIP-L with its projection under the legacy
# eos_token_id 2 (argmax pooling), and a bigG-like one (exact GELU, projection to another width) under the real EOS id
# (first-EOS pooling); both pick the same position on tokenizer output, which is what is checked.
PROJECTION_CASES = [
    ("clip-l-projection", replace(TINY, projection_dim=24), 2),
    ("clip-g", CONFIGS["tiny-g"], CONFIGS["tiny-g"].vocab_size - 1),
]


def reference_with_projection(config: CLIPTextConfig, eos_token_id: int) -> torch.nn.Module:
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act=config.hidden_act,
        projection_dim=config.projection_dim,
        attention_dropout=0.0,
        bos_token_id=config.vocab_size - 2,
        eos_token_id=eos_token_id,
        pad_token_id=1,
    )
    hf_config._attn_implementation = "eager"
    return transformers.CLIPTextModelWithProjection(hf_config).eval()


def padded_batch(config: CLIPTextConfig, pad: int) -> torch.Tensor:
    """Three rows of 77: BOS, 20 pieces, EOS, padding; BOS, 75 pieces, EOS; BOS, EOS, padding (the empty prompt)."""
    eos, bos = config.vocab_size - 1, config.vocab_size - 2
    ids = torch.randint(1, bos, (3, 77), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = bos
    ids[0, 21], ids[0, 22:] = eos, pad
    ids[1, -1] = eos
    ids[2, 1], ids[2, 2:] = eos, pad
    return ids


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=PROJECTION_CASES, ids=[case[0] for case in PROJECTION_CASES])
def projection_pair(request):
    name, config, eos_token_id = request.param
    ours = CLIPTextEncoder(config).eval()
    state = random_state(ours, seed=3)
    ours.load_state_dict(state, strict=True)
    hf = reference_with_projection(config, eos_token_id)
    hf.load_state_dict(state, strict=True)  # CLIPTextModelWithProjection keeps the text_model. prefix
    return name, ours, hf


@torch.no_grad()
def test_projection_matches_transformers_fp32(projection_pair):
    """What SD3 reads (diffusers' _get_clip_prompt_embeds): hidden_states[-2] and the projected pooled output
    (text_embeds); also the last hidden state. Padding with EOS (CLIP-L) and with "!" = id 0 (bigG)."""
    name, ours, hf = projection_pair
    for pad in (ours.config.vocab_size - 1, 0):
        ids = padded_batch(ours.config, pad)
        penultimate, pooled = ours(ids, penultimate=True)
        last, pooled_again = ours(ids)
        expected = hf(input_ids=ids, output_hidden_states=True)
        assert pooled.shape == (3, ours.config.projection_dim)
        errors = {
            "penultimate": relative_error(penultimate, expected.hidden_states[-2]),
            "pooled": relative_error(pooled, expected.text_embeds),
            "last": relative_error(last, expected.last_hidden_state),
        }
        absolute = (pooled - expected.text_embeds).abs().max().item()
        print(
            f"{name} fp32, pad {pad}: max relative error "
            + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
            + f" (pooled max abs {absolute:.2e})"
        )
        # fp32 tolerance 1e-5 of the largest value: the same maths; SDPA against the explicit softmax differ by ~1e-7
        assert max(errors.values()) <= 1e-5
        torch.testing.assert_close(pooled_again, pooled, rtol=0, atol=0)
        # the pooled row is the final-normed state at the first EOS, projected
        projected = ours.text_projection(last[[0, 1, 2], [21, 76, 1]])
        torch.testing.assert_close(pooled, projected, rtol=0, atol=0)


def test_clip_g_layout_matches_transformers():
    """bigG's names and shapes (SD3's text_encoder_2) equal transformers' CLIPTextModelWithProjection with its config,
    both built on the meta device; 694,659,840 parameters."""
    config = CONFIGS["clip-g"]
    with torch.device("meta"):
        ours = CLIPTextEncoder(config)
        hf = reference_with_projection(config, eos_token_id=2)
    shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    assert shapes == {name: tuple(t.shape) for name, t in hf.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 694_659_840
    assert shapes["text_projection.weight"] == (1280, 1280)
    with torch.device("meta"):
        clip_l = CLIPTextEncoder(CONFIGS["clip-l-projection"])
    expected = manifest_shapes("text_encoder.clip.tsv") | {"text_projection.weight": [768, 768]}
    assert {name: list(t.shape) for name, t in clip_l.state_dict().items()} == expected


@torch.no_grad()
def test_loads_sd3_folders_written_by_transformers(tmp_path):
    """SD3's layout: text_encoder/ (CLIP-L with projection, component "clip") and text_encoder_2/ (bigG, "clip_2"),
    as transformers' save_pretrained writes them; the loaded models equal the references. Flux's CLIP-L (no
    projection) still loads without one."""
    models = {}
    for (_, config, eos_token_id), folder in zip(PROJECTION_CASES, ("text_encoder", "text_encoder_2"), strict=True):
        hf = reference_with_projection(config, eos_token_id)
        hf.load_state_dict(random_state(CLIPTextEncoder(config), seed=4), strict=True)
        hf.save_pretrained(str(tmp_path / folder))
        models[folder] = hf
    for folder, component in (("text_encoder", "clip"), ("text_encoder_2", "clip_2")):
        ours = weights.load_clip_encoder(tmp_path, device="cpu", dtype=torch.float32, component=component)
        hf = models[folder]
        assert ours.config.hidden_act == hf.config.hidden_act
        assert ours.config.projection_dim == hf.config.projection_dim
        ids = padded_batch(ours.config, pad=0)
        penultimate, pooled = ours(ids, penultimate=True)
        expected = hf(input_ids=ids, output_hidden_states=True)
        error = max(
            relative_error(penultimate, expected.hidden_states[-2]), relative_error(pooled, expected.text_embeds)
        )
        print(f"{component} loaded from {folder}/: max relative error {error:.2e}")
        assert error <= 1e-5
    flux = transformers.CLIPTextModel(models["text_encoder"].config)
    flux.save_pretrained(str(tmp_path / "flux" / "text_encoder"))
    assert weights.load_clip_encoder(tmp_path / "flux", device="cpu").text_projection is None


def test_loader_refuses_unknown_activation(tmp_path):
    config = CONFIGS["tiny-g"]
    reference_with_projection(config, 2).save_pretrained(str(tmp_path / "text_encoder_2"))
    path = tmp_path / "text_encoder_2" / "config.json"
    path.write_text(path.read_text().replace('"gelu"', '"relu"'))
    with pytest.raises(weights.CheckpointError, match="hidden_act relu is not supported"):
        weights.load_clip_encoder(tmp_path, device="cpu", component="clip_2")


def test_projection_errors():
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        replace(TINY, hidden_act="relu")
    with pytest.raises(ValueError, match="projection_dim must be positive"):
        replace(TINY, projection_dim=0)
    with pytest.raises(ValueError, match="penultimate needs at least one layer"):
        CLIPTextEncoder(replace(TINY, num_hidden_layers=0))(torch.tensor([[BOS, EOS]]), penultimate=True)


# ------------------------------------------------------------------------------- tokenizer: the pad token (bigG "!")


def write_clip_tokenizer(folder: Path, pad_token: str) -> Path:
    """A small BPE in CLIP's layout with the two JSON files of SD3's tokenizer/ (pad EOS) or tokenizer_2/ (pad "!");
    as in those files, BOS is matched after normalisation and "!" is a special token of its own."""
    folder.mkdir(parents=True)
    merges = learn_merges(corpus(500, seed=3), count=300)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    names = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**names, "pad_token": pad_token}))

    def entry(content: str, normalized: bool, special: bool) -> dict:
        flags = {"lstrip": False, "rstrip": False, "single_word": False}
        return {"content": content, "normalized": normalized, "special": special, **flags}

    added = {
        str(vocab["<|startoftext|>"]): entry("<|startoftext|>", normalized=True, special=False),
        str(vocab["<|endoftext|>"]): entry("<|endoftext|>", normalized=False, special=False),
    }
    if pad_token != "<|endoftext|>":
        added = {str(vocab[pad_token]): entry(pad_token, normalized=False, special=True), **added}
    config = {**names, "pad_token": pad_token, "added_tokens_decoder": added, "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"do_lower_case": True}))
    return folder


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"], ids=["clip-l", "clip-g"])
def test_tokenizer_pad_token_matches_transformers(tmp_path, pad_token):
    folder = write_clip_tokenizer(tmp_path / "tokenizer", pad_token)
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ours = CLIPTokenizer.from_folder(folder)
    assert (ours.pad_id, ours.bos_id, ours.eos_id) == (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id)
    assert ours.pad_id == (0 if pad_token == "!" else ours.eos_id)
    mismatches = [s for s in STRINGS if ours.encode(s) != hf(s).input_ids]
    for s in mismatches[:10]:
        print(repr(s), ours.encode(s), hf(s).input_ids)
    assert not mismatches, f"{len(mismatches)} of {len(STRINGS)} strings differ"
    expected = hf(STRINGS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(ours(STRINGS), expected, rtol=0, atol=0)
    if pad_token == "!":  # a typed "!" is the pad token's id too, as in transformers
        assert ours.encode("hi!") == [ours.bos_id, *ours.encode("hi")[1:-1], 0, ours.eos_id]
    print(f"CLIP tokenizer, pad {pad_token}: ids of {len(STRINGS)} strings equal transformers' (77, padded)")


def test_tokenizer_loads_from_sd3_folders(tmp_path):
    write_clip_tokenizer(tmp_path / "tokenizer", "<|endoftext|>")
    write_clip_tokenizer(tmp_path / "tokenizer_2", "!")
    clip_l = weights.load_clip_tokenizer(tmp_path)
    clip_g = weights.load_clip_tokenizer(tmp_path, component="clip_2_tokenizer")
    assert clip_l("a cat", max_length=8)[0, -1] == clip_l.eos_id
    assert clip_g("a cat", max_length=8)[0, -1] == 0
    (tmp_path / "tokenizer_2" / "special_tokens_map.json").unlink()
    (tmp_path / "tokenizer_2" / "tokenizer_config.json").unlink()
    with pytest.raises(weights.CheckpointNotFoundError, match="special_tokens_map.json"):
        weights.load_clip_tokenizer(tmp_path, component="clip_2_tokenizer")


def test_tokenizer_pad_errors(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "tokenizer", "!")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="has no <pad> token"):
        CLIPTokenizer.from_folder(folder)
    extra = {"5": {"content": "<sks>", "normalized": False}}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": extra}))
    with pytest.raises(ValueError, match="added tokens \\['<sks>'\\] are not supported"):
        CLIPTokenizer.from_folder(folder)


# a damaged file of a CLIP tokenizer folder (SD3's tokenizer_2/, FLUX.1's tokenizer/): its name, and what is wrong
DAMAGED = {
    "vocab.json empty": ("vocab.json", "", "vocab.json is damaged (JSONDecodeError"),
    "vocab.json a list": ("vocab.json", "[1, 2]", "vocab.json is a JSON list"),
    "vocab.json ids as strings": ("vocab.json", '{"a": "1", "<|startoftext|>": 0, "<|endoftext|>": 2}',
                                  "vocab.json maps pieces to values that are not whole numbers"),
    "vocab.json without BOS": ("vocab.json", '{"a": 0, "<|endoftext|>": 1, "!": 2}', "no <|startoftext|> token"),
    "merges.txt empty": ("merges.txt", "#version: 0.2\n", "merges.txt holds no merges"),
    "merges.txt of unknown pieces": ("merges.txt", "#version: 0.2\nqq zz\n", "make no tokenizer"),
    "special_tokens_map.json a list": ("special_tokens_map.json", "[]", "special_tokens_map.json is a JSON list"),
    "tokenizer_config.json damaged": ("tokenizer_config.json", "{bad", "tokenizer_config.json is damaged"),
    "a token entry without content": ("tokenizer_config.json", '{"pad_token": {"id": 0}}', "malformed token entry"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_tokenizer_file_is_a_value_error_that_names_it(tmp_path, case):
    name, text, message = DAMAGED[case]
    folder = write_clip_tokenizer(tmp_path / "tokenizer_2", "!")
    (folder / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        CLIPTokenizer.from_folder(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)
