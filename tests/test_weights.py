"""The `weights` package: every component loads from every layout, by hub repo id (offline, from a Hugging Face
cache tree), by folder and by file, and computes what the reference model whose tensors were saved computes; damaged
files raise errors that say what is wrong and how to fetch the files again.

The checkpoints are written by the reference libraries (diffusers' and transformers' `save_pretrained`, sharded with
index JSONs). The BFL single files are derived from those tensors with the name maps of shared/manifests (taken from
diffusers' conversion script), so neither the files nor the expected outputs come from the `weights` package.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import weights
from weights import CheckpointError, CheckpointNotFoundError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "manifests"
if not MANIFESTS.is_dir():
    MANIFESTS = Path("/work/shared/manifests")

# float32 on both sides, same kernels, different op order (fused vs split projections, diffusers' RoPE formulation):
# only rounding noise remains, a few float32 ulps relative to the outputs (up to ~10 with these random weights); a wrong
# tensor mapping gives errors of the outputs' own size.
ATOL, RTOL = 1e-5, 1e-5
FLUX_FILE = "flux1-tiny.safetensors"


# ---- reference models and their files -------------------------------------------------------------------------------


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (the libraries zero-initialise some), so a wrong mapping cannot hide: matrices and
    kernels with std 1/sqrt(fan-in), vectors (biases, norm scales) around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(noise / p[0].numel() ** 0.5 if p.ndim > 1 else 1 + 0.1 * noise)
    return module.eval()


def manifest_rows(name: str) -> list[list[str]]:
    return [line.split("\t") for line in (MANIFESTS / name).read_text().splitlines() if line]


def flux_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers transformer tensors -> BFL names with flux.bfl-to-diffusers.tsv (checkpoints.md 2.3 for guidance_in,
    which schnell lacks): copy, chunk3:i (thirds of qkv), split_single:i (q|k|v|mlp of linear1), swap_shift_scale."""
    rows = manifest_rows("flux.bfl-to-diffusers.tsv")
    rows += [
        [f"guidance_in.{b}_layer.{p}", f"time_text_embed.guidance_embedder.linear_{i}.{p}", "copy"]
        for i, b in ((1, "in"), (2, "out"))
        for p in ("weight", "bias")
    ]
    parts = defaultdict(list)
    for bfl, diff, op in rows:
        if diff in state:
            parts[bfl].append((op, state[diff]))
    used = sum(len(p) for p in parts.values())
    assert used == len(state), f"the manifest covers {used} of {len(state)} diffusers tensors"
    out = {}
    for bfl, pieces in parts.items():
        op = pieces[0][0]
        if op == "copy":
            out[bfl] = pieces[0][1]
        elif op == "swap_shift_scale":  # diffusers stores (scale, shift), BFL (shift, scale)
            scale, shift = pieces[0][1].chunk(2)
            out[bfl] = torch.cat([shift, scale])
        else:  # chunk3:i / split_single:i: row blocks in order i
            out[bfl] = torch.cat([t for _, t in sorted(pieces, key=lambda p: int(p[0].split(":")[1]))])
    return out


def ae_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers vae tensors -> BFL names with ae.bfl-to-diffusers.tsv (prefix maps; 1x1 attention convs)."""
    rules = manifest_rows("ae.bfl-to-diffusers.tsv")
    out = {}
    for key, value in state.items():
        (bfl, diff, op) = next(r for r in rules if key.startswith(r[1] + "."))
        rest = key[len(diff) :]
        if op.startswith("nin_shortcut"):
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        if op.startswith("squeeze") and rest == ".weight":
            value = value[:, :, None, None]  # [C, C] -> 1x1 conv [C, C, 1, 1]
        out[bfl + rest] = value
    assert len(out) == len(state)
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by CLIP's BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def write_tokenizers(folder: Path) -> None:
    """tokenizer/ (a CLIP BPE: every byte, a few merges) and tokenizer_2/ (a SentencePiece unigram trained here)."""
    chars = list(bytes_to_unicode().values())
    merges = [("c", "a"), ("ca", "t</w>"), ("o", "n</w>"), ("t", "h"), ("th", "e</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    model = io.BytesIO()
    words = "a cat on the mat with the red dog under blue sky near green trees and a photo of them".split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer_2").mkdir()
    (folder / "tokenizer_2" / "spiece.model").write_bytes(model.getvalue())


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, stem: str, shards: int) -> None:
    """Our own sharded writer for the tests that damage shards: {stem}-0000i-of-0000n.safetensors + index JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[i::shards]
        save_file({n: tensors[n].contiguous() for n in chunk}, folder / shard)
        weight_map |= dict.fromkeys(chunk, shard)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index))


def add_to_cache(cache: Path, repo: str, staging: Path, names: list[str] | None = None) -> Path:
    """Put files of `staging` into a huggingface_hub cache tree: blobs/<sha256>, snapshots/<rev>/<name> symlinks,
    refs/main = <rev>. Returns the snapshot folder."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    revision = hashlib.sha1(repo.encode()).hexdigest()
    names = names or [p.relative_to(staging).as_posix() for p in sorted(staging.rglob("*")) if p.is_file()]
    for name in names:
        data = (staging / name).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return repo_dir / "snapshots" / revision


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Reference models, a diffusers-layout folder, a BFL-layout folder, and a cache holding both as repos."""
    root = tmp_path_factory.mktemp("weights")
    flux = randomize(
        diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=3,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=40,
            pooled_projection_dim=24,
            guidance_embeds=True,
            axes_dims_rope=(4, 14, 14),
        ),
        0,
    )
    vae = randomize(
        diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        1,
    )
    t5_ref = randomize(
        transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=96,
                d_model=32,
                d_kv=8,
                d_ff=48,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
            )
        ),
        2,
    )
    clip_ref = randomize(
        transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=100,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=2,  # 2: pooled at the largest id, as FLUX.1's
            )
        ),
        3,
    )

    dif = root / "diffusers"
    flux.save_pretrained(dif / "transformer", max_shard_size="100KB")
    vae.save_pretrained(dif / "vae", max_shard_size="200KB")
    t5_ref.save_pretrained(dif / "text_encoder_2", max_shard_size="20KB")
    clip_ref.save_pretrained(dif / "text_encoder")  # transformers 5 writes the keys without `text_model.`
    write_tokenizers(dif)

    bfl = root / "bfl"
    bfl.mkdir()
    save_file({k: v.contiguous() for k, v in flux_to_bfl(flux.state_dict()).items()}, bfl / FLUX_FILE)
    save_file(ae_to_bfl(vae.state_dict()), bfl / "ae.safetensors")
    for sub in ("text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(dif / sub, bfl / sub)
    (bfl / "text_encoder").mkdir()  # as in FLUX.1-schnell: `text_model.` prefix, plus a legacy position_ids buffer
    shutil.copy(dif / "text_encoder" / "config.json", bfl / "text_encoder")
    clip_state = {f"text_model.{k}": v for k, v in clip_ref.state_dict().items()}
    clip_state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(clip_state, bfl / "text_encoder" / "model.safetensors")

    cache = root / "hf_home" / "hub"
    add_to_cache(cache, "test-org/tiny-diffusers", dif)
    add_to_cache(cache, "test-org/tiny-bfl", bfl)
    return SimpleNamespace(flux=flux, vae=vae, t5=t5_ref, clip=clip_ref, dif=dif, bfl=bfl, cache=cache)


@pytest.fixture
def offline(world, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(world.cache))
    return world


# ---- each component, each layout, each kind of source ----------------------------------------------------------------


def check_flux(model, reference) -> None:
    generator = torch.Generator().manual_seed(0)
    img = torch.randn(2, 12, 16, generator=generator)
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(12), rows.flatten().float(), cols.flatten().float()], -1)  # (N, 3)
    txt, txt_ids = torch.randn(2, 5, 40, generator=generator), torch.zeros(5, 3)
    t, y, guidance = torch.tensor([0.3, 0.9]), torch.randn(2, 24, generator=generator), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        ours = model(img, img_ids.expand(2, -1, -1), txt, txt_ids.expand(2, -1, -1), t, y, guidance)
        ref = reference(img, txt, y, t, img_ids, txt_ids, guidance).sample
    print(f"flux max abs error {(ours - ref).abs().max():.2e} (outputs up to {ref.abs().max():.1f})")
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def check_autoencoder(model, reference, scale: float = 0.3611, shift: float = 0.1159) -> None:
    generator = torch.Generator().manual_seed(1)
    x, z = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1, torch.randn(1, 16, 4, 4, generator=generator)
    with torch.no_grad():
        decoded = reference.decode(z / scale + shift).sample
        encoded = scale * (reference.encode(x).latent_dist.mean - shift)
        errors = (model.decode(z) - decoded).abs().max(), (model.encode(x) - encoded).abs().max()
    print(f"autoencoder max abs error decode {errors[0]:.2e}, encode {errors[1]:.2e}")
    assert max(errors) < ATOL


def check_t5(model, reference) -> None:
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        error = (model(ids) - reference(ids).last_hidden_state).abs().max()
    print(f"t5 max abs error {error:.2e}")
    assert error < ATOL


def check_clip(model, reference) -> None:
    ids = torch.randint(1, 98, (2, 77), generator=torch.Generator().manual_seed(3))
    ids[0, 7], ids[1, 20] = 99, 99  # the largest id marks where the pooled vector is taken
    with torch.no_grad():
        hidden, pooled = model(ids)
        out = reference(ids)
    errors = (hidden - out.last_hidden_state).abs().max(), (pooled - out.pooler_output).abs().max()
    print(f"clip max abs error hidden {errors[0]:.2e}, pooled {errors[1]:.2e}")
    assert max(errors) < ATOL


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_flux_every_source(offline, layout):
    models = [weights.load_flux(f"test-org/tiny-{layout}"), weights.load_flux(getattr(offline, layout[:3]))]
    models.append(weights.load_flux(offline.bfl / FLUX_FILE if layout == "bfl" else offline.dif / "transformer"))
    for model in models:
        assert model.config.depth == 2 and model.config.depth_single_blocks == 3 and model.config.guidance_embed
        check_flux(model, offline.flux)


def test_autoencoder_every_source(offline):
    files = (offline.bfl / "ae.safetensors", offline.dif / "vae")
    for source in ("test-org/tiny-bfl", "test-org/tiny-diffusers", offline.bfl, offline.dif, *files):
        model = weights.load_autoencoder(source)
        assert model.config.ch_mult == (1, 2, 2, 2) and model.config.num_res_blocks == 1
        check_autoencoder(model, offline.vae)


def test_text_encoders_every_source(offline):
    for source in ("test-org/tiny-bfl", "test-org/tiny-diffusers", offline.dif, offline.dif / "text_encoder_2"):
        check_t5(weights.load_t5_encoder(source), offline.t5)
    for source in ("test-org/tiny-bfl", "test-org/tiny-diffusers", offline.bfl, offline.dif / "text_encoder"):
        check_clip(weights.load_clip_encoder(source), offline.clip)


def test_both_layouts_give_the_same_model(offline):
    for load in (weights.load_flux, weights.load_autoencoder):
        a, b = load("test-org/tiny-bfl"), load("test-org/tiny-diffusers")
        assert a.config == b.config
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tokenizers(offline):
    t5_tok = weights.load_t5_tokenizer("test-org/tiny-diffusers")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(offline.dif / "tokenizer_2" / "spiece.model"))
    assert t5_tok.encode("a cat on the mat") == processor.encode("a cat on the mat") + [1]
    clip_tok = weights.load_clip_tokenizer("test-org/tiny-bfl")
    reference = transformers.CLIPTokenizer.from_pretrained(str(offline.bfl / "tokenizer"))
    assert (
        clip_tok(["the cat on"])[0].tolist() == reference("the cat on", padding="max_length", max_length=77).input_ids
    )


def test_dtypes_and_devices(offline):
    flux = weights.load_flux(offline.bfl / FLUX_FILE)  # CPU default: float32, as stored
    assert {p.dtype for p in flux.parameters()} == {torch.float32} and not any(
        p.requires_grad for p in flux.parameters()
    )
    half = weights.load_flux(offline.bfl / FLUX_FILE, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(half.img_in.weight, flux.img_in.weight.bfloat16())
    for load in (weights.load_flux, weights.load_autoencoder, weights.load_t5_encoder):
        with pytest.raises(ValueError, match="float16"):
            load("test-org/tiny-bfl", dtype=torch.float16)
    assert (
        weights.load_clip_encoder("test-org/tiny-bfl", dtype=torch.float16).text_model.final_layer_norm.weight.dtype
        == torch.float16
    )


def test_own_single_files_with_sidecar_configs(world, tmp_path):
    """This project's own layout (the built-in shapes model): `{name}.safetensors` + `{name}_config.json` holding our
    config dataclass's fields, which win over shapes and presets (RoPE axes, latent scale and shift)."""
    folder = tmp_path / "own"
    shutil.copytree(world.bfl / "tokenizer_2", folder / "tokenizer_2")
    (folder / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    shutil.copy(world.bfl / FLUX_FILE, folder / "flux.safetensors")
    flux_config = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 24, "context_in_dim": 40, "hidden_size": 64,
                   "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 3, "axes_dim": [8, 12, 12],
                   "theta": 10000, "qkv_bias": True, "guidance_embed": True}  # fmt: skip
    (folder / "flux_config.json").write_text(json.dumps(flux_config))
    shutil.copy(world.bfl / "ae.safetensors", folder / "ae.safetensors")
    ae_config = {"resolution": 32, "in_channels": 3, "ch": 32, "out_ch": 3, "ch_mult": [1, 2, 2, 2],
                 "num_res_blocks": 1, "z_channels": 16, "scale_factor": 0.5, "shift_factor": 0.0}  # fmt: skip
    (folder / "ae_config.json").write_text(json.dumps(ae_config))
    t5_state = {k: v.clone() for k, v in world.t5.state_dict().items()}  # with the tied encoder.embed_tokens copy
    save_file(t5_state, folder / "t5.safetensors")
    t5_fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                 "relative_attention_max_distance", "layer_norm_epsilon")  # fmt: skip
    (folder / "t5_config.json").write_text(json.dumps({k: getattr(world.t5.config, k) for k in t5_fields}))

    reference = diffusers.FluxTransformer2DModel.from_config({**world.flux.config, "axes_dims_rope": (8, 12, 12)})
    reference.load_state_dict(world.flux.state_dict())
    for source in (folder, folder / "flux.safetensors"):
        flux = weights.load_flux(source)
        assert flux.config.axes_dim == (8, 12, 12)
        check_flux(flux, reference.eval())
    check_autoencoder(weights.load_autoencoder(folder), world.vae, scale=0.5, shift=0.0)
    check_t5(weights.load_t5_encoder(folder), world.t5)
    assert weights.t5_max_length(folder) == 16  # the tokenizer's limit, below the 512 of a guidance model
    with pytest.raises(CheckpointNotFoundError, match="t5.safetensors with t5_config.json"):
        (folder / "t5_config.json").unlink()
        weights.load_t5_encoder(folder)


def test_hf_home_and_max_length(world, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(world.cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.t5_max_length("test-org/tiny-bfl") == 512  # guidance embedding: dev-like
    assert weights.t5_max_length("test-org/tiny-diffusers") == 512


# ---- damaged files --------------------------------------------------------------------------------------------------


def test_truncated_and_corrupt_files(world, tmp_path):
    path = tmp_path / FLUX_FILE
    data = (world.bfl / FLUX_FILE).read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"truncated: it has [\d,]+ bytes, but its header .* intact copy"):
        weights.load_flux(path)
    path.write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        weights.load_flux(path)
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        weights.load_flux(path)


def test_trailing_bytes_and_unread_dtypes(world, tmp_path):
    path = tmp_path / FLUX_FILE
    path.write_bytes((world.bfl / FLUX_FILE).read_bytes() + bytes(16))
    with pytest.raises(CheckpointError, match=r"trailing bytes after its tensors: it has [\d,]+ bytes, but its header"):
        weights.load_flux(path)
    save_file({"img_in.weight": torch.zeros(2, 2, dtype=torch.uint16)}, path)
    with pytest.raises(CheckpointError, match="dtype U16, which this loader does not read"):
        weights.load_flux(path)


def padded_copy(source: Path, target: Path, boundary: int) -> None:
    """`source` with its header padded (JSON allows trailing spaces) so that its data starts `boundary` bytes past a
    multiple of 64."""
    data = source.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].rstrip(b" ")
    header += b" " * ((boundary - 8 - len(header)) % 64)
    target.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length :])


def backing_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds the tensor's first byte (None: anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= t.data_ptr() < high:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings (Linux)")
def test_mapped_where_aligned_in_the_stored_dtype(world, tmp_path):
    """On the CPU in the stored dtype, tensors starting on 64-byte boundaries of their file stay memory-mapped, those
    off them are copied (CPU kernels may round differently on them); in another dtype nothing is mapped. The mapped
    model computes what the reference does, also once its file is deleted, and equals the copied one."""
    models = {}
    for boundary in (0, 8):  # every tensor of the tiny file is a multiple of 64 bytes long
        path = tmp_path / f"{boundary}" / FLUX_FILE
        path.parent.mkdir()
        padded_copy(world.bfl / FLUX_FILE, path, boundary)
        flux = weights.load_flux(path, device="cpu", dtype=torch.float32)  # stored in float32
        mapped = [backing_file(t) == str(path) for t in flux.state_dict().values()]
        assert all(mapped) if boundary == 0 else not any(mapped)
        half = weights.load_flux(path, device="cpu", dtype=torch.bfloat16)
        assert not any(backing_file(t) == str(path) for t in half.state_dict().values())
        path.unlink()
        check_flux(flux, world.flux)
        models[boundary] = flux.state_dict()
    assert all(torch.equal(t, models[8][name]) for name, t in models[0].items())


def copy_transformer(world, tmp_path) -> Path:
    shutil.copytree(world.dif / "transformer", tmp_path / "transformer")
    return tmp_path / "transformer"


def test_missing_shard_and_bad_index(world, tmp_path):
    folder = copy_transformer(world, tmp_path)
    shards = sorted(folder.glob("*-of-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointNotFoundError, match=rf"shard 2 of {len(shards)}, .* is missing.*copy transformer/"):
        weights.load_flux(tmp_path)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    shutil.copy(world.dif / "transformer" / shards[1].name, shards[1])
    index = json.loads(index_path.read_text())
    index["weight_map"]["x_embedder.weight"] = "elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointNotFoundError, match="a file, elsewhere.safetensors, is missing"):
        weights.load_flux(tmp_path)


def test_repair_hints(world, tmp_path, monkeypatch):
    """A damaged file in the hub cache: that one file again with --force-download (the hub client keeps a cached copy
    otherwise); a missing shard there: that shard alone. A damaged local file: an intact copy, never a download into
    the user's folder (only the hub id, whose files go to the cache); the built-in model's files: from git."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    staging = tmp_path / "staging"
    staging.mkdir()
    data = (world.bfl / FLUX_FILE).read_bytes()
    (staging / FLUX_FILE).write_bytes(data[:-100])
    add_to_cache(tmp_path / "hub", "test-org/damaged", staging)
    with pytest.raises(CheckpointError) as error:
        weights.load_flux("test-org/damaged")
    assert f"hf download test-org/damaged {FLUX_FILE} --force-download" in str(error.value)

    shards = sorted(p.name for p in (world.dif / "transformer").glob("*-of-*.safetensors"))
    names = [f"transformer/{p.name}" for p in (world.dif / "transformer").iterdir() if p.name != shards[1]]
    add_to_cache(tmp_path / "hub", "test-org/partial", world.dif, names)
    with pytest.raises(CheckpointNotFoundError) as error:
        weights.load_flux("test-org/partial")
    message = str(error.value)
    assert message.endswith(f"Fetch it: hf download test-org/partial transformer/{shards[1]}"), message

    local = tmp_path / "mine"
    local.mkdir()
    (local / "flux1-schnell.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as error:
        weights.load_flux(local)
    message = str(error.value)
    assert "intact copy" in message and "--local-dir" not in message and "--force-download" not in message
    assert "hf download black-forest-labs/FLUX.1-schnell flux1-schnell.safetensors)" in message  # into the cache
    (local / "flux1-schnell.safetensors").rename(local / "flux1-tuned.safetensors")
    with pytest.raises(CheckpointError) as error:
        weights.load_flux(local)
    assert "intact copy" in str(error.value) and "hf download" not in str(error.value)  # not a hub file: no download

    monkeypatch.setattr(weights.find, "BUILTIN", local.resolve())
    with pytest.raises(CheckpointError, match="git checkout -- shapes/weights/flux1-tuned.safetensors$"):
        weights.load_flux(local)


def test_no_matching_layout(world, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(CheckpointNotFoundError) as error:
        weights.load_flux(tmp_path)
    for text in (
        "no Flux transformer",
        "flux1-schnell.safetensors",
        "transformer/ with config.json",
        "notes.txt",
        "hf download black-forest-labs/FLUX.1-schnell flux1-schnell.safetensors",
    ):
        assert text in str(error.value)
    assert isinstance(error.value, FileNotFoundError)  # callers treat a missing component as optional
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(world.cache))
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE.*hf download test-org/absent"):
        weights.load_autoencoder("test-org/absent")
    with pytest.raises(CheckpointNotFoundError, match="neither a file, a folder, nor a hub repo id"):
        weights.load_flux("./no/such/place")


def test_a_file_of_another_kind_is_named_for_what_it_is(world, tmp_path):
    """Single files given to the wrong loader: diffusers' transformer weights (its folder holds the config they need),
    the autoencoder given as the transformer and the transformer as the autoencoder."""
    save_file(
        {k: v.contiguous() for k, v in world.flux.state_dict().items()},
        tmp_path / "diffusion_pytorch_model.safetensors",
    )
    with pytest.raises(CheckpointError, match="holds diffusers tensor names: load its folder"):
        weights.load_flux(tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="is not a BFL Flux transformer checkpoint: it has no img_in.weight"):
        weights.load_flux(world.bfl / "ae.safetensors")
    with pytest.raises(CheckpointError, match="is not a BFL autoencoder checkpoint: it has no encoder.conv_in.weight"):
        weights.load_autoencoder(world.bfl / FLUX_FILE)


def test_strict_mismatch_names_everything(world, tmp_path):
    state = flux_to_bfl(world.flux.state_dict())
    del state["single_blocks.2.linear2.weight"]
    state["double_blocks.1.img_mlp.2.bias"] = torch.zeros(65)
    state["extra.weight"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / FLUX_FILE)
    with pytest.raises(CheckpointError) as error:
        weights.load_flux(tmp_path / FLUX_FILE)
    message = str(error.value)
    print(message)
    mismatch = (
        "1 shape mismatch: double_blocks.1.img_mlp.2.bias expected [64], found double_blocks.1.img_mlp.2.bias [65]"
    )
    for text in (
        str(tmp_path / FLUX_FILE),
        "1 missing tensor: single_blocks.2.linear2.weight",
        mismatch,
        f"1 unexpected tensor: extra.weight [3] (in {FLUX_FILE})",
    ):
        assert text in message

    folder = copy_transformer(world, tmp_path / "dif")  # diffusers names: the missing file tensor and what needed it
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors |= load_file(shard)
        shard.unlink()
    for key in [k for k in tensors if ".attn.to_k." in k]:
        del tensors[key]
    save_sharded(tensors, folder, "diffusion_pytorch_model", 3)
    with pytest.raises(CheckpointError) as error:
        weights.load_flux(tmp_path / "dif")
    message = str(error.value)
    print(message)
    assert message.startswith(str(folder / "diffusion_pytorch_model.safetensors.index.json"))
    assert (
        "10 missing tensors: transformer_blocks.0.attn.to_k.weight (for double_blocks.0.img_attn.qkv.weight);"
        in message
    )
    assert message.endswith("(5 more)") and "unexpected" not in message  # q, v of the same fused tensors are expected


# ---- the hub, online (huggingface_hub's API replaced by a fake that serves the test files) ---------------------------


def test_download_prefers_cached_layout_and_reports_sizes(world, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    cache, repo = tmp_path / "hub", "test-org/partial"
    staging = tmp_path / "staging"
    shutil.copytree(world.dif, staging)
    for name in (FLUX_FILE, "ae.safetensors"):
        shutil.copy(world.bfl / name, staging / name)
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    shards = [f for f in files if f.startswith("transformer/") and "-of-" in f]
    cached = [f for f in files if f.startswith("transformer/") and f != shards[-1]]
    snapshot = add_to_cache(cache, repo, staging, cached)  # all of transformer/ but its last shard
    requested = []

    def fake_download(repo_id, allow_patterns, cache_dir):
        requested.append(sorted(allow_patterns))
        add_to_cache(Path(cache_dir), repo_id, staging, [f for f in allow_patterns if not (snapshot / f).exists()])
        return str(snapshot)

    sizes = {f: (staging / f).stat().st_size for f in files}
    sizes[FLUX_FILE] = 23_782_357_120  # as large as the real one: the partly cached diffusers layout is cheaper
    info = SimpleNamespace(sha=snapshot.name, siblings=[SimpleNamespace(rfilename=f, size=s) for f, s in sizes.items()])
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: SimpleNamespace(model_info=lambda repo, files_metadata: info))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    check_flux(weights.load_flux(repo), world.flux)
    out = capsys.readouterr().out
    assert f"1 file(s), {sizes[shards[-1]] / 1e6:.1f} MB" in out and shards[-1] in out and FLUX_FILE not in out
    assert requested == [sorted(f for f in files if f.startswith("transformer/"))]
    weights.load_flux(repo)  # now complete in the cache: no listing, no download
    assert len(requested) == 1 and "Downloading" not in capsys.readouterr().out
    weights.load_autoencoder(repo)  # nothing of it cached: the layout with fewer bytes to fetch
    vae = sorted(f for f in files if f.startswith("vae/"))
    assert requested[-1] == (["ae.safetensors"] if sizes["ae.safetensors"] <= sum(sizes[f] for f in vae) else vae)


# ---- the real FLUX.1-schnell files, by their names and shapes (no data) ----------------------------------------------


def manifest_infos(name: str, file: str) -> dict[str, weights.TensorInfo]:
    """Header-like entries for every tensor of a real checkpoint, from its manifest (names and shapes only)."""
    rows = manifest_rows(name)
    shapes = {key: tuple(json.loads(shape)) for key, shape in rows}
    return {key: weights.TensorInfo(Path(file), torch.bfloat16, shape, 0, 0) for key, shape in shapes.items()}


def diffusers_infos(shapes: dict[str, tuple[int, ...]]) -> dict[str, weights.TensorInfo]:
    return {key: weights.TensorInfo(Path("diffusers"), torch.bfloat16, shape, 0, 0) for key, shape in shapes.items()}


def test_real_checkpoints_plan_and_configs():
    """Full-size models on the meta device against the real files' names and shapes: the configs read from them are
    the presets, and the loader's plan (renames, fusions, shape checks) accepts both layouts of each."""
    import autoencoder
    import clip
    import mmdit
    import t5

    def plan(cls, config, infos, rules=(), ignore=()) -> int:
        with torch.device("meta"):
            return len(weights.plan_load(cls(config), infos, rules, ignore, "real"))

    bfl = manifest_infos("flux1-schnell.bfl.tsv", "flux1-schnell.safetensors")
    assert weights.flux_config_from_shapes(bfl, "real") == mmdit.CONFIGS["flux-schnell"]
    assert plan(mmdit.Flux, mmdit.CONFIGS["flux-schnell"], bfl) == 776
    rows = {"chunk3": lambda s, i: s[0] // 3, "split_single": lambda s, i: 3072 if i < 3 else 12288}  # section 2.3
    shapes = {}
    for source, key, op in manifest_rows("flux.bfl-to-diffusers.tsv"):
        kind, _, index = op.partition(":")
        shape = bfl[source].shape
        shapes[key] = (rows[kind](shape, int(index)), *shape[1:]) if kind in rows else shape
    dif = diffusers_infos(shapes)
    config_json = {  # transformer/config.json of FLUX.1-schnell (checkpoints.md section 1)
        "attention_head_dim": 128, "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 4096,
        "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
        "pooled_projection_dim": 768,
    }  # fmt: skip
    assert (
        len(dif) == 1156
        and weights.flux_config_from_diffusers(config_json, dif, "real") == mmdit.CONFIGS["flux-schnell"]
    )
    assert plan(mmdit.Flux, mmdit.CONFIGS["flux-schnell"], dif, weights.FLUX_FROM_DIFFUSERS) == 776

    ae = manifest_infos("ae.bfl.tsv", "ae.safetensors")
    assert weights.ae_config_from_shapes(ae, "real") == autoencoder.CONFIGS["flux"]
    assert plan(autoencoder.AutoEncoder, autoencoder.CONFIGS["flux"], ae) == 244
    vae = {}
    for key, info in ae.items():
        source, target, op = next(r for r in manifest_rows("ae.bfl-to-diffusers.tsv") if key.startswith(r[0] + "."))
        rest = key[len(source) :].replace("nin_shortcut", "conv_shortcut")
        vae[target + rest] = info.shape[:2] if op.startswith("squeeze") and rest == ".weight" else info.shape
    vae_json = {  # vae/config.json of FLUX.1-schnell (checkpoints.md section 1)
        "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3, "latent_channels": 16,
        "layers_per_block": 2, "norm_num_groups": 32, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    }  # fmt: skip
    assert weights.ae_config_from_diffusers(vae_json, "real") == autoencoder.CONFIGS["flux"]
    assert (
        plan(autoencoder.AutoEncoder, autoencoder.CONFIGS["flux"], diffusers_infos(vae), weights.ae_from_diffusers(4))
        == 244
    )

    t5_infos = manifest_infos("text_encoder_2.t5.tsv", "model-00001-of-00002.safetensors")
    assert plan(t5.T5Encoder, t5.CONFIGS["t5-v1_1-xxl"], t5_infos) == 219
    clip_infos = manifest_infos("text_encoder.clip.tsv", "model.safetensors")
    clip_infos["text_model.embeddings.position_ids"] = weights.TensorInfo(Path("x"), torch.int64, (1, 77), 0, 0)
    ignore = (r"text_model\.embeddings\.position_ids",)
    assert plan(clip.CLIPTextEncoder, clip.CONFIGS["clip-vit-large-patch14"], clip_infos, ignore=ignore) == 196
