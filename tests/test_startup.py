"""Start-up: loading a model, and a command-line call, never import `torch._dynamo` (about 2 s on a laptop CPU).

Building a model on the meta device runs its initialisers, and `nn.Embedding`'s `normal_` on a meta tensor goes
through a decomposition that imports `torch._dynamo`; the loaders skip initialisers (`weights.SkipInit`). Each check
runs in a fresh interpreter, since the test process itself may have imported anything by then.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file

import clip

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "shapes" / "weights"

LOAD_EVERY_COMPONENT = """
import sys
import torch
import weights
from torch import nn

models = [
    weights.load_flux(sys.argv[1]),
    weights.load_autoencoder(sys.argv[1]),
    weights.load_t5_encoder(sys.argv[1]),
    weights.load_clip_encoder(sys.argv[2]),
]
print("after loading", "torch._dynamo" in sys.modules)
with torch.device("meta"):  # what the loaders avoid: an initialiser on the meta device
    nn.Embedding(4, 2)
print("after a meta embedding", "torch._dynamo" in sys.modules)
"""


def python(*argv, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not (SHAPES / "flux.safetensors").is_file(), reason="the built-in shapes model is not shipped")
def test_loading_does_not_import_dynamo(tmp_path):
    """Every loader (Flux, autoencoder and T5 of the built-in model; a tiny CLIP folder with T5's and CLIP's
    embeddings) leaves torch._dynamo unimported; the same interpreter then imports it for one meta embedding, so the
    check can fail."""
    config = clip.CONFIGS["tiny"]
    (tmp_path / "text_encoder").mkdir()
    state = clip.CLIPTextEncoder(config).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "text_encoder" / "model.safetensors")
    config_json = {**dataclasses.asdict(config), "hidden_act": "quick_gelu"}
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps(config_json))
    done = python("-c", LOAD_EVERY_COMPONENT, SHAPES, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["after loading False", "after a meta embedding True"]


@pytest.mark.skipif(not (SHAPES / "flux.safetensors").is_file(), reason="the built-in shapes model is not shipped")
@pytest.mark.parametrize("command", ["generate", "explain"])
def test_command_line_does_not_import_dynamo(tmp_path, command):
    """`python -X importtime concept_attention.py generate|explain --model shapes ...` lists every module it imports."""
    if command == "generate":
        given = ["--prompt", "a red circle", "--size", "64"]
    else:
        Image.new("RGB", (64, 64), (250, 40, 40)).save(tmp_path / "red.png")
        given = ["--image", tmp_path / "red.png"]
    done = python("-X", "importtime", ROOT / "concept_attention.py", command, "--model", "shapes", *given,
                  "--concepts", "circle", "background", "--out", tmp_path / "out")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")]
    assert "torch" in imported and (tmp_path / "out" / "maps.safetensors").is_file()
    assert not [name for name in imported if name.startswith("torch._dynamo")]
