"""The per-image map cache of a segmentation run, and the fingerprints that say what made each entry.

Entries live under `OUT/cache/<forward hash>/<image key>.pt`, written atomically (a temporary file, then a rename). The
forward hash covers the model name, a fingerprint of its weight files, the dtype and every forward setting (t, samples,
seed, normalisation, token rule, resizes, dataset kind); each entry also stores that description in full, a hash of
the image fed to the model, the concepts and the caption. An entry that differs in any of them is recomputed, and an
unreadable one is named on stderr and recomputed, so a rerun into the same folder never reuses maps made otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch

BUILTIN_MODEL = Path(__file__).resolve().parents[1] / "shapes" / "weights"


def digest(data) -> str:
    """A short stable hash of JSON-able settings."""
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def weights_fingerprint(source: str) -> str | None:
    """Names, sizes and the first and last MiB of the model's weight, config and tokenizer files, hashed: another or a
    retrained model changes it, without reading 34 GB. None when the source is not a file, folder or cached hub id."""
    path = BUILTIN_MODEL if source == "shapes" else Path(source).expanduser()
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        from weights.find import cached_snapshot, hub_cache_dir

        path = cached_snapshot(source, hub_cache_dir()) or path
    if not path.exists():
        return None
    kinds = (".safetensors", ".json", ".model", ".txt")
    files = [path] if path.is_file() else sorted(p for p in (*path.glob("*"), *path.glob("*/*")) if p.suffix in kinds)
    h, mib = hashlib.sha1(), 2**20
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(path.parent if path.is_file() else path)}:{size}:".encode())
        with open(file, "rb") as f:
            h.update(f.read(mib))
            if size > mib:
                f.seek(max(mib, size - mib))
                h.update(f.read())
    return h.hexdigest()[:16]


def image_hash(image) -> str:
    return hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()[:16]


class MapCache:
    """Per-image maps of each `select_key`, for one forward configuration (model, weights, dtype, t, samples, seed...);
    each entry also records the image it was computed from, its concepts and caption."""

    def __init__(self, root: Path, forward: dict):
        self.forward = json.dumps(forward, sort_keys=True, default=str)
        self.dir = root / "cache" / digest(forward)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "forward.json").write_text(json.dumps(forward, indent=1, default=str))
        self.stale, self.damaged = 0, 0

    def record(self, image, concepts: list[str], caption: str) -> dict:
        return {"forward": self.forward, "image": image_hash(image), "concepts": list(concepts), "caption": caption}

    def load(self, key: str, record: dict) -> dict[str, torch.Tensor]:
        path = self.dir / f"{key}.pt"
        if not path.is_file():
            return {}
        try:
            data = torch.load(path, weights_only=True)
            found, maps = {k: data[k] for k in record}, data["maps"]
            if not isinstance(maps, dict) or not all(isinstance(v, torch.Tensor) for v in maps.values()):
                raise TypeError("its maps are not a dict of tensors")
        except Exception as error:  # truncated, not a torch file, or another layout: any of these means recompute
            reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
            print(f"warning: cache file {path} is damaged ({type(error).__name__}: {reason}); recomputing it",
                  file=sys.stderr)  # fmt: skip
            self.damaged += 1
            return {}
        if found != record:  # another image, concept list or caption under the same key: recompute
            self.stale += 1
            return {}
        return maps

    def save(self, key: str, record: dict, maps: dict[str, torch.Tensor]) -> None:
        path = self.dir / f"{key}.pt"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({**record, "maps": maps}, tmp)
        os.replace(tmp, path)
