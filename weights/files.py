"""Safetensors files through the format's own library: headers, sharded indexes, configs, and the one-tensor-at-a-time
fill of a model.

Follows `safetensors.safe_open`, which checks each header against its file (length field, JSON, dtypes, dtype x shape
against every byte span, spans without overlaps or gaps, the file's size), and the sharded layout of transformers and
diffusers (an index JSON whose `weight_map` names each tensor's shard). Differs from `load_file` and `from_pretrained`
in:
- every file is checked before any data is read, and safetensors' reasons become one-line errors that name the file
  and say how to replace it (from the hub cache: the `hf download --force-download` command for that one file; from a
  local folder: an intact copy, never a download into someone's folder);
- a meta-built model is filled one tensor at a time. A tensor wanted on the CPU in its stored dtype stays safetensors'
  memory-mapped one, as in diffusers: read on first use, and privately mapped, so writes to the model never reach the
  file (deleting the file is safe; rewriting it in place while the model lives is not);
- but only when its bytes start on a 64-byte boundary of the file, as PyTorch's CPU allocations do: CPU kernels can
  round differently on operands off it (the built-in model's maps change in their last bits with its weights mapped
  at 8-byte boundaries), and a model computes the same mapped or copied (the memory modes' bit identity rests on it);
- every other tensor (another dtype or device, rows fused from several file tensors, see `convert.py`, or off the
  boundary) is read with plain file reads into its own memory, through one reused staging buffer when its dtype or
  device differ: no mapped page stays resident for it, and host memory stays the model plus its largest tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .errors import MALFORMED, CheckpointError, CheckpointNotFoundError
from .find import Found, index_shards

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ALIGNMENT = 64  # bytes: a mapped tensor must start where PyTorch's CPU allocations do (see above)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: bytes [start, end) of `path`, little-endian, row-major."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def header_of(path: Path) -> tuple[int, dict]:
    """The length field and the tensor entries of a safetensors header (no checks: `read_header` makes them)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return length, {k: e for k, e in json.loads(f.read(length)).items() if k != "__metadata__"}


def damage(path: Path, error: SafetensorError) -> str:
    """safetensors' reason for refusing a file, said as what is wrong with it (its words differ across versions)."""
    size, reason = path.stat().st_size, str(error).removeprefix("Error while deserializing header: ")
    key = reason.lower().replace(" ", "")
    if "headerlength" in key or "headertoo" in key:  # the 8-byte length field: missing, or past the end of the file
        return f"is truncated or not a safetensors file: {size:,} bytes, {reason}"
    if "incomplete" in key:  # a valid header whose tensors end before (or after) the end of the file
        length, entries = header_of(path)
        end = 8 + length + max((int(e["data_offsets"][1]) for e in entries.values()), default=0)
        what = "is truncated: it has" if end > size else "has trailing bytes after its tensors: it has"
        return f"{what} {size:,} bytes, but its header describes {len(entries)} tensors ending at byte {end:,}"
    return f"has a corrupt safetensors header ({reason})"


def read_header(path: Path, found: Found) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, once safetensors has checked the header against the file."""
    try:
        safe_open(path, "pt")  # parses and checks the header; maps the file but reads no data
    except SafetensorError as error:
        raise CheckpointError(f"{path} {damage(path, error)}. {found.repair_hint(path)}") from None
    length, entries = header_of(path)
    unknown = sorted({e["dtype"] for e in entries.values()} - DTYPES.keys())
    if unknown:
        raise CheckpointError(f"{path} holds tensors of dtype {', '.join(unknown)}, which this loader does not read")
    return {
        name: TensorInfo(path, DTYPES[e["dtype"]], tuple(e["shape"]), *(8 + length + o for o in e["data_offsets"]))
        for name, e in entries.items()
    }


def read_index(found: Found, index: str) -> dict[str, TensorInfo]:
    """Every tensor of a sharded checkpoint, from the headers of the shards its index names (all must be there)."""
    path = found.root / index
    try:
        shards = sorted(index_shards(path))
    except MALFORMED as error:
        raise CheckpointError(f"{path} is not a valid index JSON ({error!r}). {found.repair_hint(path)}") from error
    problems, absent = [], []
    for shard in shards:
        if not (path.parent / shard).is_file():
            number = re.search(r"-(\d+)-of-(\d+)\.safetensors$", shard)
            what = f"shard {int(number[1])} of {int(number[2])}" if number else "a file"
            problems.append(f"{what}, {shard}, is missing")
            absent.append(path.parent / shard)
    if problems:
        raise CheckpointNotFoundError(
            f"{path} names {len(shards)} shard(s) in {path.parent}, but "
            + "; ".join(problems)
            + f". {found.repair_hint(*absent, missing=True)}"
        )
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_header(path.parent / shard, found).items():
            if name in tensors:
                raise CheckpointError(
                    f"{name} is in two shards, {tensors[name].path.name} and {shard}. {found.repair_hint(path)}"
                )
            tensors[name] = info
    return tensors


def read_weights(found: Found) -> dict[str, TensorInfo]:
    """Every tensor of the component: from its single file, or from all the shards of its index."""
    if found.index is not None:
        return read_index(found, found.index)
    return read_header(Path(found.where), found)


def read_config(found: Found) -> dict | None:
    """config.json of a folder layout, or the sidecar `{stem}_config.json` of a single file (None when it has none)."""
    sidecar = [f for f in found.files if f.endswith("_config.json")]
    if found.layout.kind == "file" and not sidecar:
        return None
    path = found.root / (sidecar[0] if sidecar else f"{found.layout.folder}/config.json".lstrip("/"))
    try:
        cfg = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}). {found.repair_hint(path)}") from error
    if not isinstance(cfg, dict):  # a list or a number: every loader reads it as an object of settings
        raise CheckpointError(f"{path} is a JSON {type(cfg).__name__}, not an object of settings. "
                              f"{found.repair_hint(path)}")  # fmt: skip
    return cfg


# ---- filling a meta-built model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Rows [part * n, (part + 1) * n) of a file tensor with parts * n rows (the whole tensor when parts == 1)."""

    key: str
    info: TensorInfo
    part: int = 0
    parts: int = 1

    @property
    def shape(self) -> tuple[int, ...] | None:
        if self.parts == 1:
            return self.info.shape
        if not self.info.shape or self.info.shape[0] % self.parts:
            return None
        return (self.info.shape[0] // self.parts, *self.info.shape[1:])


def stacked_shape(pieces: list[Piece]) -> tuple[int, ...] | None:
    """The shape of the pieces stacked along rows (None when their trailing dims differ or a piece cannot split)."""
    shapes = [piece.shape for piece in pieces]
    if len(shapes) == 1 or None in shapes:
        return shapes[0] if len(shapes) == 1 else None
    if len({s[1:] for s in shapes}) != 1 or not all(shapes):
        return None
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def read_into(file, piece: Piece, out: Tensor, staging: Tensor) -> Tensor:
    """Copy one row block of the file into `out`: straight into its memory when it is a CPU tensor of the file's dtype,
    else through `staging`, a CPU byte buffer reused for every tensor (returned, grown when too small)."""
    nbytes = out.numel() * piece.info.dtype.itemsize
    direct = out.device.type == "cpu" and out.dtype == piece.info.dtype
    if not direct and staging.numel() < nbytes:
        staging = torch.empty(nbytes, dtype=torch.uint8)
    destination = out.view(-1).view(torch.uint8) if direct else staging[:nbytes]
    file.seek(piece.info.start + piece.part * nbytes)
    if file.readinto(destination.numpy()) != nbytes:
        raise CheckpointError(f"{piece.info.path} ended while reading {piece.key}: the file is truncated")
    if not direct:
        out.copy_(destination.view(piece.info.dtype).view(out.shape))
    return staging


def fill(model: nn.Module, plan: dict[str, list[Piece]], device: torch.device, dtype: torch.dtype) -> None:
    """Replace the meta tensors with the files' data on `device` in `dtype` (floating tensors), one at a time: mapped
    where a whole, aligned file tensor is wanted as it is stored, on the CPU; read into memory of its own otherwise."""
    expected, state, staging = model.state_dict(), {}, torch.empty(0, dtype=torch.uint8)
    files, mapped = {}, {}  # path -> open file, path -> safetensors' reader of it
    on_cpu = torch.device(device).type == "cpu"
    order = sorted(plan, key=lambda name: (str(plan[name][0].info.path), plan[name][0].info.start))  # sequential I/O
    try:
        for name in order:
            target, pieces = expected[name], plan[name]
            out_dtype = dtype if target.is_floating_point() else target.dtype
            info, whole = pieces[0].info, len(pieces) == pieces[0].parts == 1
            if on_cpu and whole and info.dtype == out_dtype and info.start % ALIGNMENT == 0:  # kept mapped
                if info.path not in mapped:
                    mapped[info.path] = safe_open(info.path, "pt")
                tensor = mapped[info.path].get_tensor(pieces[0].key)
            else:
                tensor = torch.empty(stacked_shape(pieces), device=device, dtype=out_dtype)
                # a fused tensor gets each block read into its own rows: no concatenated temporary
                blocks = [tensor] if whole else tensor.split([piece.shape[0] for piece in pieces])
                for piece, block in zip(pieces, blocks, strict=True):
                    if piece.info.path not in files:
                        files[piece.info.path] = open(piece.info.path, "rb")  # noqa: SIM115 (closed below)
                    staging = read_into(files[piece.info.path], piece, block, staging)
            state[name] = tensor.reshape(target.shape)  # [C, C] -> [C, C, 1, 1] for 1x1 convs
    finally:
        for file in files.values():
            file.close()
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} keeps meta tensors after loading (built in __init__?): {left[:5]}")
