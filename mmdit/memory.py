"""Memory modes for cards smaller than the bf16 transformer: block streaming and fp8 weight storage.

Neither follows a reference implementation line by line. Streaming is the pattern of accelerate's and diffusers'
"sequential/group offload" (weights in pinned host memory, copied in on a side CUDA stream ahead of use), written
here as two weight slots per block kind; fp8 storage is the weight-only scheme of torchao's float8 weight-only
config, reduced to what Flux needs: `float8_e4m3fn` weights with one float32 scale per output row, turned back into
the activation dtype per layer as it runs (no fp8 matmul, so any GPU and the CPU run it).

- `stream_blocks(flux, device)`: the double and single blocks move to (pinned) host memory and leave the module tree;
  each block is copied into one of two device slots of its kind just before it runs, the next one on a side stream
  while the current one computes. The image is bit-identical to the resident model's: the same kernels on the same
  weights. On the CPU the same path runs with plain copies into the slots, so it is tested there.
- `stream_t5(t5, device)`: the same for the T5 encoder's blocks (block 0 stays), so that T5 (9.5 GB in bf16) never
  sits on the device whole beside the transformer.
- `to_fp8(flux)`: every `nn.Linear` inside the blocks (99.5 % of FLUX.1-schnell's parameters) becomes an `FP8Linear`.
  Embedders, the final layer, biases and norm scales stay in the model dtype.
- `prepare_flux` and `prepare_t5(module, mode, device)`: the pipeline's entry points for `MEMORY_MODES`.

Differs from accelerate/diffusers offload in: no hooks; the streamed blocks are small wrapper modules that the
unchanged `Flux.forward` and T5 stack call like the blocks they stand for.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Flux

__all__ = [
    "FP8_MAX",
    "MEMORY_MODES",
    "BlockStreamer",
    "FP8Linear",
    "StreamedBlock",
    "dequantize_fp8",
    "prepare_flux",
    "quantize_fp8",
    "prepare_t5",
    "stream_blocks",
    "stream_module_list",
    "stream_t5",
    "to_fp8",
]

# full: everything resident on the device; offload: the text encoders wait on the CPU between uses; stream: the
# transformer's and T5's blocks streamed from host memory (CLIP offloaded); fp8: fp8 transformer weights, T5 streamed
MEMORY_MODES = ("full", "offload", "stream", "fp8")
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


# ---- fp8 weight storage ------------------------------------------------------------------------------------------
def quantize_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (out, in) -> (float8_e4m3fn (out, in), float32 scale (out, 1)) with weight ~ w8 * scale.

    Each row is scaled so that its largest magnitude becomes 448, the format's largest value; an all-zero row gets
    scale 1. Elementwise error: at most 2^-4 of the value (3 mantissa bits, round to nearest) or, below the smallest
    normal 2^-6 (scaled), at most half the subnormal step 2^-9, i.e. 2^-10 * scale.
    """
    if weight.ndim != 2:
        raise ValueError(f"fp8 storage takes (out, in) linear weights, got shape {tuple(weight.shape)}")
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    w8 = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w8, scale


def dequantize_fp8(w8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(out, in) fp8 and (out, 1) float32 scales -> the weight in `dtype`.

    The product is taken in `dtype` itself (fp8 values are exact in bf16; the scale and the product each round by at
    most 2^-9 in bf16, far below fp8's 2^-4), which moves 7 bytes per weight instead of 19 through float32; float16,
    whose range small scales can leave, multiplies in float32.
    """
    compute = torch.float32 if dtype == torch.float16 else dtype
    return (w8.to(compute) * scale.to(compute)).to(dtype)


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored as float8_e4m3fn with a per-row float32 scale (half the bytes of bf16).

    The weight is dequantised to the input's dtype at every call (a temporary the size of one bf16 weight) and the
    product is an ordinary `F.linear`. `weight` and `scale` are buffers, so `module.to(device)` moves them; do not
    call `module.to(dtype)` on it (it would cast the fp8 weights).
    """

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (out, in) float8_e4m3fn
        self.register_buffer("scale", scale)  # (out, 1) float32
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        w8, scale = quantize_fp8(linear.weight.detach())
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(w8, scale, bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, dequantize_fp8(self.weight, self.scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float8_e4m3fn per-row scale"


def to_fp8(flux: Flux, device=None) -> Flux:
    """Replace, in place, every nn.Linear of the blocks (`block_lists`: Flux's double and single blocks, SD3's joint
    blocks) by an `FP8Linear`. Block by block: each is first moved to `device` (if given; quantising there is fast on a
    GPU), and a layer's bf16 weight is freed as soon as its fp8 copy exists, so memory holds at most one bf16 block
    beyond the result. Returns `flux`."""
    for blocks in (getattr(flux, name) for name in flux.block_lists):
        for block in blocks:
            if device is not None:
                block.to(device)
            linears = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
            for name, linear in linears:
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, FP8Linear.from_linear(linear))
    return flux


# ---- block streaming ---------------------------------------------------------------------------------------------
class BlockStreamer:
    """Host copies of a sequence of blocks and two device slots per block kind; `run(i, ...)` runs block i in a slot.

    Block i lives in slot i' % 2 of its kind (i' = its rank among the blocks of that kind), so block i and block i + 1
    never share a slot. Before block i computes, block i + 1 is copied into its slot (and after the last block, block
    0, for the next forward, unless it shares the last block's slot). On CUDA that copy runs on `copy_stream`, waits
    for the last compute that read the slot (`free` event) and signals the compute stream when done (`ready` event).
    On other devices the copies are plain synchronous copies. `loads` counts block copies: at most one per block and
    forward, fewer where a slot still holds its block from the last forward.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host: list[list[Tensor]] = []  # per block, its tensors in state_dict order
        self.slot_of: list[int] = []  # per block, its slot
        self.slots: list[nn.Module] = []  # device modules whose tensors receive the host copies
        self.loaded: list[int | None] = []  # per slot, the block it holds (or is receiving)
        self.first_slot: dict[type, int] = {}  # block kind -> its first slot
        self.count: dict[type, int] = {}  # block kind -> blocks added so far
        self.loads = 0
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready: list[torch.cuda.Event] = []  # per slot, recorded on copy_stream when its copy is done
        self.free: list[torch.cuda.Event] = []  # per slot, recorded on the compute stream after its block ran

    def add(self, block: nn.Module) -> int:
        """Take a host copy of `block` (pinned when the slots are on CUDA: page-locked memory is what lets a copy run
        asynchronously); the first block of a kind also gives that kind its two device slots. Returns its index."""
        # blocks of one kind share slots: the same class and the same tensor shapes (SD3's last block and SD3.5
        # Medium's blocks with a second attention are kinds of their own)
        kind = (type(block), tuple((k, tuple(v.shape)) for k, v in block.state_dict().items()))
        if kind not in self.first_slot:
            self.first_slot[kind] = len(self.slots)
            for _ in range(2):
                self.slots.append(copy.deepcopy(block).to(self.device).requires_grad_(False))
                self.loaded.append(None)
                if self.cuda:
                    self.ready.append(torch.cuda.Event())
                    self.free.append(torch.cuda.Event())
        self.slot_of.append(self.first_slot[kind] + self.count.get(kind, 0) % 2)
        self.count[kind] = self.count.get(kind, 0) + 1
        tensors = [t.detach().to("cpu") for t in block.state_dict().values()]
        self.host.append([t.pin_memory() for t in tensors] if self.cuda else tensors)
        return len(self.host) - 1

    @torch.no_grad()
    def load(self, i: int) -> None:
        """Copy block i into its slot (asynchronously on CUDA)."""
        slot = self.slot_of[i]
        targets = list(self.slots[slot].state_dict().values())  # views of the slot's own tensors
        if self.cuda:
            self.copy_stream.wait_event(self.free[slot])  # the block that last used this slot has finished
            with torch.cuda.stream(self.copy_stream):
                for dst, src in zip(targets, self.host[i], strict=True):
                    dst.copy_(src, non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        else:
            for dst, src in zip(targets, self.host[i], strict=True):
                dst.copy_(src)
        self.loaded[slot] = i
        self.loads += 1

    def run(self, i: int, *args, **kwargs):
        """Block i's forward on the device: make sure it is in its slot, start copying the next block, compute."""
        slot = self.slot_of[i]
        if self.loaded[slot] != i:
            self.load(i)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        following = (i + 1) % len(self.host)  # block 0 after the last: the next forward starts there
        # (with an odd number of blocks of one kind and no other kind, the last block and block 0 share a slot)
        if self.slot_of[following] != slot and self.loaded[self.slot_of[following]] != following:
            self.load(following)  # overlaps with the compute below
        out = self.slots[slot](*args, **kwargs)
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        return out


class StreamedBlock(nn.Module):
    """Stands in the model for block `index` of a `BlockStreamer`; holds no weights itself.

    The arguments are passed on unchanged to the block (a DoubleStreamBlock's or a SingleStreamBlock's forward).
    """

    def __init__(self, streamer: BlockStreamer, index: int, kind: str):
        super().__init__()
        self.streamer, self.index, self.kind = streamer, index, kind

    def forward(self, *args, **kwargs):
        return self.streamer.run(self.index, *args, **kwargs)

    def host_tensors(self) -> list[tuple[str, Tensor]]:
        """The block's weights as they wait in host memory, by their names in the block."""
        names = self.streamer.slots[self.streamer.slot_of[self.index]].state_dict().keys()
        return list(zip(names, self.streamer.host[self.index], strict=True))

    def extra_repr(self) -> str:
        return f"{self.kind} block {self.index}, streamed from host memory"


def stream_module_list(blocks: nn.ModuleList, streamer: BlockStreamer, kind: str, start: int = 0) -> None:
    """Replace blocks[start:] by `StreamedBlock`s of `streamer`, one block at a time (each original is dropped as soon
    as its host copy exists, so host memory holds about one copy of the model)."""
    for j in range(start, len(blocks)):
        blocks[j] = StreamedBlock(streamer, streamer.add(blocks[j]), kind)


def stream_blocks(flux: Flux, device) -> BlockStreamer:
    """Move the blocks of `flux` to (pinned) host memory behind a `BlockStreamer` and everything else to `device`.
    In place; returns the streamer.

    The streamed model's `state_dict()` no longer holds the blocks' weights (they are `streamer.host`): stream a model
    after loading it, for inference.
    """
    streamer = BlockStreamer(device)
    for name in flux.block_lists:  # Flux: double_blocks, single_blocks; SD3: joint_blocks
        stream_module_list(getattr(flux, name), streamer, name.removesuffix("_blocks"))
    flux.to(streamer.device)
    return streamer


def stream_t5(t5: nn.Module, device) -> BlockStreamer:
    """Stream the blocks of a `t5.T5Encoder` the same way, except block 0, which holds the relative position bias
    table the stack reads directly (the embedding, block 0 and the final norm stay in the module: 0.7 GB for T5-XXL
    in bf16, against 9.5 GB for the whole encoder). In place; returns the streamer."""
    streamer = BlockStreamer(device)
    stream_module_list(t5.encoder.block, streamer, "t5", start=1)
    return streamer


def prepare_flux(flux: Flux, mode: str, device) -> Flux:
    """`flux` ready to run on `device` in memory mode `mode` (see `MEMORY_MODES`); in place. For "stream" and "fp8"
    load the model on the CPU first, so the bf16 model never has to fit on the device."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r}: choose one of {', '.join(MEMORY_MODES)}")
    if mode == "stream":
        stream_blocks(flux, device)
    elif mode == "fp8":
        to_fp8(flux, device)
    return flux.to(device)


def prepare_t5(t5: nn.Module, mode: str, device) -> nn.Module:
    """The T5 encoder for memory mode `mode`: in "stream" and "fp8" its blocks stream from host memory (`stream_t5`);
    otherwise unchanged. The pipeline moves what stays in the module (all of it in "full" and "offload")."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r}: choose one of {', '.join(MEMORY_MODES)}")
    if mode in ("stream", "fp8"):
        stream_t5(t5, device)
    return t5
