"""Every file of a tiny FLUX.1 (diffusers layout), SD3.5 and CogVideoX snapshot written by diffusers' `save_pretrained`,
missing, empty, garbage, a JSON list, or with a number written as a string or a list as a number: `generate` on the
command line either stops with one `error:` line that names the file or its folder, before any weights load, or runs
on because the file is not read or has a stated fall-back (`FALLBACKS`). Never a traceback. The built-in model's files
are swept in `test_damaged_models.py`."""

import json
import shutil
from pathlib import Path

import pytest
from test_cogvideox_pipeline import snapshot as cogvideox_snapshot
from test_flux_pipeline import write_snapshot as flux_snapshot
from test_sd3_pipeline import snapshot  # noqa: F401 (the module's fixture: a tiny SD3.5 snapshot)

import concept_attention

ANY = {"missing", "bytes", "field"}
# (the family, or the kind of tokenizer folder; the file; its damages; why a run may go on: the file is not read, or
# another stands in for it)
FALLBACKS = [
    ("*", "model_index.json", {"missing", "field"}, "the family is read from transformer/config.json when it is absent;"
     " only its _class_name is read"),
    ("*", "text_encoder*/config.json", {"field"}, "architectures and dropout rates are not model settings"),
    ("flux", "scheduler/scheduler_config.json", ANY, "Flux's schedule is BFL's: shifted when the transformer has a "
     "guidance embedding (dev), not for schnell"),
    ("sd3", "scheduler/scheduler_config.json", {"missing", "field"}, "SD3.5's shift is 3.0 in every release; "
     "base_image_seq_len belongs to dynamic shifting, which SD3.5 leaves off (CogVideoX's scheduler is required)"),
    ("clip", "tokenizer*/tokenizer.json", ANY, "a CLIP tokenizer is read from vocab.json and merges.txt"),
    ("clip", "tokenizer*/tokenizer_config.json", {"missing", "field"}, "CLIP's length is 77; special_tokens_map.json "
     "or the default names the pad token"),
    ("clip", "tokenizer*/special_tokens_map.json", {"missing"}, "tokenizer_config.json or the default names the pad"),
    ("t5", "tokenizer*/tokenizer_config.json", ANY, "the pipeline sets T5's length (SD3.5: 256, CogVideoX: 226)"),
    ("t5", "tokenizer*/spiece.model", ANY, "tokenizer.json is read when the folder has it"),
    ("t5", "tokenizer*/tokenizer.json", {"missing"}, "spiece.model is read instead"),
]  # fmt: skip


def damages(path: Path):
    """(name, kind, how) for one file; kind "field" for a changed value of a JSON object."""
    yield "missing", "missing", lambda p: p.unlink()
    yield "empty", "bytes", lambda p: p.write_bytes(b"")
    yield "garbage", "bytes", lambda p: p.write_bytes(b"garbage{\x00\x01")
    if path.suffix != ".json":
        return
    yield "a JSON list", "bytes", lambda p: p.write_text("[1, 2]")
    data = json.loads(path.read_text())
    number = next((k for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
    listed = next((k for k, v in data.items() if isinstance(v, list)), None)
    if number is not None:
        yield f"{number} as a string", "field", lambda p: p.write_text(json.dumps({**data, number: str(data[number])}))
    if listed is not None:
        yield f"{listed} as a number", "field", lambda p: p.write_text(json.dumps({**data, listed: 7}))


def fallback(family: str, rel: Path, kind: str) -> str | None:
    """Why this damage may leave the run going, or None."""
    t5_folder = rel.parent.name == {"flux": "tokenizer_2", "sd3": "tokenizer_3", "cogvideox": "tokenizer"}[family]
    owners = {"*", family, "t5" if t5_folder else "clip"}
    reasons = [why for who, pattern, kinds, why in FALLBACKS if who in owners and rel.match(pattern) and kind in kinds]
    return reasons[0] if reasons else None


def sweep(family: str, root: Path, extra: list[str], tmp_path: Path, capsys, monkeypatch) -> list[str]:
    import weights

    problems, cases, loads = [], 0, []
    fill = weights.fill

    def counted(*args):  # one call per component whose weights are read
        loads.append(1)
        return fill(*args)

    monkeypatch.setattr(weights, "fill", counted)
    for rel in sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()):
        for name, kind, damage in damages(root / rel):
            cases += 1
            case, out = tmp_path / "case", tmp_path / "out"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(root, case)
            damage(case / rel)
            argv = ["generate", "--model", str(case), "--prompt", "a cat", "--concepts", "cat", "sky", "--device",
                    "cpu", "--num-steps", "1", "--out", str(out), *extra]  # fmt: skip
            loads.clear()
            try:
                code = concept_attention.main(argv)
            except BaseException as error:  # noqa: BLE001 (a traceback is what this test looks for)
                problems.append(f"{rel} {name}: {type(error).__name__}: {error}")
                continue
            finally:
                shutil.rmtree(out, ignore_errors=True)
            lines = capsys.readouterr().err.strip().splitlines()
            last = lines[-1] if lines else ""
            if code == 2 and last.startswith("error: ") and (rel.name in last or f"{rel.parent.name}/" in last):
                if loads:
                    problems.append(f"{rel} {name}: said only after the weights loaded: {last[:200]}")
                continue
            if code == 0 and fallback(family, rel, kind) is not None:
                continue
            problems.append(f"{rel} {name}: exit {code}, {last[:200]}")
    print(f"{family}: {cases} damaged files, {len(problems)} problems", *problems, sep="\n  ")
    return problems


def test_every_file_of_an_sd3_snapshot(snapshot, tmp_path, capsys, monkeypatch):  # noqa: F811
    assert sweep("sd3", snapshot[0], ["--size", "32"], tmp_path, capsys, monkeypatch) == []


def test_every_file_of_a_cogvideox_snapshot(tmp_path_factory, tmp_path, capsys, monkeypatch):
    folder = tmp_path_factory.mktemp("cogvideox") / "tiny-cogvideox"
    cogvideox_snapshot(folder, rope=True)
    assert sweep("cogvideox", folder, ["--size", "32x48", "--frames", "5"], tmp_path, capsys, monkeypatch) == []


def test_every_file_of_a_flux_snapshot(tmp_path_factory, tmp_path, capsys, monkeypatch):
    folder = tmp_path_factory.mktemp("flux") / "tiny-flux-schnell"
    flux_snapshot(folder, dev=False)
    assert sweep("flux", folder, ["--size", "32"], tmp_path, capsys, monkeypatch) == []


def test_the_api_says_it_before_any_weights_load_too(snapshot, tmp_path, monkeypatch):  # noqa: F811
    """`from_pretrained` checks every component on the meta device first: a damaged config of the last text encoder
    is an error before a single weight is read (it came after the transformer had loaded)."""
    import weights

    case = tmp_path / "case"
    shutil.copytree(snapshot[0], case)
    (case / "text_encoder_3" / "config.json").write_text("[1, 2]")
    filled = []
    monkeypatch.setattr(weights, "fill", lambda *args: filled.append(args))
    with pytest.raises(weights.CheckpointError, match="text_encoder_3/config.json is a JSON list"):
        concept_attention.ConceptAttentionPipeline.from_pretrained(case, device="cpu")
    assert filled == []
