"""The tensor manifests of the real checkpoints (names, shapes, BFL <-> diffusers maps), read from the shared
specification folder that sits beside the project (`../shared/manifests`; `FLUX_MANIFESTS` overrides it)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [Path(p) for p in (os.environ.get("FLUX_MANIFESTS"),) if p] + [
    ROOT / "tests" / "manifests",  # SD3.5's, kept with the tests
    ROOT.parent / "shared" / "manifests",
    Path("/work/shared/manifests"),
]


def manifest_path(name: str) -> Path:
    for folder in CANDIDATES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"manifest {name} not found in {', '.join(map(str, CANDIDATES))}; set FLUX_MANIFESTS")


def manifest_rows(name: str) -> list[list[str]]:
    """The tab-separated rows of a manifest."""
    return [line.split("\t") for line in manifest_path(name).read_text().splitlines() if line]


def manifest_shapes(name: str) -> dict[str, list[int]]:
    """name -> shape for a tensor manifest (two columns: name, [d0, d1, ...])."""
    return {key: [int(d) for d in shape.strip("[]").split(",")] for key, shape in manifest_rows(name)}
