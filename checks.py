"""Checks of what a user gives the pipeline and the command line, made before any model runs (and, on the command line,
before any weights load): the device, counts, seed and noise level, and the text (a prompt cut to the token limit,
concepts of unknown pieces, a single concept under the softmax), which gets warnings rather than errors.

Errors are `ValueError`s of one line that name the value and say what to do; warnings are `InputWarning`s.
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class InputWarning(UserWarning):
    """A run that will work but probably not as meant (a cut prompt, unknown concepts, a constant map)."""


def check_device(device) -> torch.device:
    """A device that exists on this machine: CUDA and MPS are checked before anything loads."""
    try:
        device = torch.device(device) if device is not None else default_device()
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device ({err}); use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: this machine has no usable CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0 ..)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device}: only cpu, cuda and mps are supported")
    return device


def check_count(value, what: str, low: int, high: int | None = None) -> int:
    """An int in [low, high]: num_steps, num_samples."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} = {value!r}: give a whole number")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{what} = {value}: give a number from {low} to {high}" if high else f"{what} = {value}: give "
                         f"at least {low}")  # fmt: skip
    return value


def check_seed(seed, count: int = 1) -> int:
    """Seeds seed .. seed + count - 1 must each seed torch's generator: 0 .. 2^63 - 1."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed = {seed!r}: give a whole number")
    if seed < 0 or seed + count - 1 > 2**63 - 1:
        raise ValueError(f"seed = {seed}: seeds {seed} .. {seed + count - 1} must lie in 0 .. 2^63 - 1")
    return seed


def check_t(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ValueError(f"t = {t!r}: the noise level must be a number in [0, 1]")
    return float(t)


def unknown_ids(tokenizer) -> set[int]:
    """The ids of <unk> and of the bare word-start piece "▁" (which carries no meaning of its own)."""
    backend = tokenizer.backend
    if hasattr(backend, "piece_to_id"):  # sentencepiece
        ids = {backend.piece_to_id("<unk>"), backend.piece_to_id("▁")}
    else:  # tokenizers
        ids = {backend.token_to_id("<unk>"), backend.token_to_id("▁")}
    return {i for i in ids if i is not None}


def text_warnings(tokenizer, max_length: int, prompt: str, concepts: list[str], softmax: bool) -> list[str]:
    """What will work but probably not as meant: a prompt longer than the model's token limit, concepts made only of
    unknown pieces (they all get the same map), and a single concept under the softmax over concepts (a constant 1)."""
    notes = []
    pieces = len(tokenizer.encode(prompt)) if prompt else 0
    if pieces > max_length:
        notes.append(f"the prompt is {pieces} T5 tokens with its end token; only the first {max_length} are used")
    unk = unknown_ids(tokenizer)
    unknown = [c for c in concepts if set(tokenizer.encode(c)[:-1]) <= unk and set(tokenizer.encode(c)[:-1]) & unk]
    if unknown:
        notes.append(
            f"concept(s) {', '.join(map(repr, unknown))} are made only of pieces the tokenizer does not know; every "
            "such concept gets the same map"
        )
    if len(concepts) == 1 and softmax:
        notes.append(
            f"a single concept ({concepts[0]!r}) with the softmax over concepts gives a map of 1 everywhere; add a "
            "second concept such as 'background', or use --no-softmax (softmax=False)"
        )
    return notes
