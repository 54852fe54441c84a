"""The Flux pipeline end to end on tiny random weights, as the SD3.5 and CogVideoX ones: a diffusers `FluxPipeline`
(schnell's scheduler, CLIP-L and T5 with their tokenizers, the autoencoder) saved with `save_pretrained` loads into ours
(the family read from model_index.json, every component from its diffusers folder, T5 sharded) and our `generate`
gives diffusers' image for the same seed while collecting concept maps; the concepts leave the image as it is."""

import shutil

import numpy as np
import pytest
import torch
from test_clip import reference as clip_reference
from test_clip import to_reference, write_clip_tokenizer
from test_t5 import reference as t5_reference

import clip
import t5
from concept_attention import ConceptAttentionPipeline
from tiny import diffusers_vae, pixel_difference, random_state, randomize_like_trained, train_spiece

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

CLIP_CONFIG = clip.CONFIGS["tiny"]
T5_CONFIG = t5.CONFIGS["tiny"]
MAX_LENGTH = 24  # T5 tokens (diffusers' max_sequence_length)


def write_snapshot(folder, dev: bool):
    """A tiny snapshot written by diffusers into `folder`: FLUX.1-schnell-like (no guidance embedding, schnell's
    scheduler) or FLUX.1-dev-like (a guidance embedding, dev's resolution-dependent shift); -> diffusers' pipeline."""
    source = folder.parent / f"{folder.name}-tokenizers"
    write_clip_tokenizer(source / "tokenizer", "<|endoftext|>")
    train_spiece(source / "tokenizer_2")
    clip_ref = clip_reference(CLIP_CONFIG)
    clip_ref.load_state_dict(to_reference(random_state(clip.CLIPTextEncoder(CLIP_CONFIG), seed=0), clip_ref))
    t5_ref = t5_reference(T5_CONFIG)
    t5_ref.load_state_dict(random_state(t5.T5Encoder(T5_CONFIG), seed=1), strict=False)
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_CONFIG.d_model, pooled_projection_dim=CLIP_CONFIG.hidden_size, guidance_embeds=dev,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    randomize_like_trained(transformer)
    vae = diffusers_vae(scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = (  # black-forest-labs/FLUX.1-dev's and -schnell's scheduler_config.json
        diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096)
        if dev else diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    )  # fmt: skip
    pipe = diffusers.FluxPipeline(
        transformer=transformer.eval(),
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip_ref.eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(source / "tokenizer")),
        text_encoder_2=t5_ref.eval(),
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(str(source / "tokenizer_2")),
    )
    pipe.save_pretrained(folder, max_shard_size="50KB")  # T5 and the transformer in shards, with their indexes
    for name in ("tokenizer", "tokenizer_2"):  # our tokenizers read the original files
        shutil.copytree(source / name, folder / name, dirs_exist_ok=True)
    return pipe


@pytest.fixture(scope="module", params=["schnell", "dev"])
def snapshot(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("snap") / f"tiny-flux-{request.param}"
    return folder, write_snapshot(folder, request.param == "dev")


@pytest.fixture(scope="module")
def ours(snapshot):
    pipe = ConceptAttentionPipeline.from_pretrained(snapshot[0], device="cpu", dtype=torch.float32)
    pipe.max_length = MAX_LENGTH
    return pipe


def test_generate_gives_diffusers_image(snapshot, ours):
    folder, reference = snapshot
    assert any(folder.glob("text_encoder_2/*.index.json")) and any(folder.glob("transformer/*.index.json"))
    prompt, height, width = "a red cat on the grass", 64, 48
    result = ours.generate(prompt, ["cat", "grass"], height, width, seed=7, progress=False)  # 4 steps, guidance 3.5
    expected = reference(
        prompt, height=height, width=width, num_inference_steps=4, guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(7), output_type="np", max_sequence_length=MAX_LENGTH,
    ).images[0]  # fmt: skip
    diff, spread = pixel_difference(result.image, expected)
    print(f"max pixel difference {diff} (of 255), pixel spread {spread:.1f}")
    assert diff <= 1 and spread > 5  # equal, and not a flat image that anything would match
    assert result.maps.shape == (2, height // 16, width // 16) and result.record["family"] == "flux"
    assert torch.allclose(result.maps.sum(0), torch.ones(height // 16, width // 16))  # softmax over concepts
    plain = ours.generate(prompt, ["sky", "dog", "tree"], height, width, seed=7, progress=False)
    assert np.array_equal(np.asarray(plain.image), np.asarray(result.image))  # the concepts change nothing
