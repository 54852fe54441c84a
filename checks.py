"""Checks of what a user gives the pipeline and the command line, made before any model runs (and, on the command line,
before any weights load): the device, counts, seed and noise level, and the text (a prompt cut to the token limit,
concepts of unknown pieces, a single concept under the softmax), which gets warnings rather than errors.

Errors are `ValueError`s of one line that name the value and say what to do; warnings are `InputWarning`s.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import unicodedata
from contextlib import contextmanager
from pathlib import Path

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
        many = f" with {count} noise samples" if count > 1 else ""
        raise ValueError(f"seed = {seed}{many}: seeds {seed} .. {seed + count - 1} must lie in 0 .. 2^63 - 1")
    return seed


def check_t(t, what: str = "t") -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ValueError(f"{what} = {t!r}: the noise level must be a number in [0, 1]")
    return float(t)


def check_flag(value, what: str) -> bool:
    """True or False (also numpy's); "no", None or 2 would silently read as a choice."""
    if isinstance(value, str) or value not in (True, False):
        raise ValueError(f"{what} = {value!r}: give True or False")
    return bool(value)


def check_number(value, what: str, low: float | None = None, high: float | None = None) -> float:
    """A finite real number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} = {value!r}: give a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{what} = {value!r}: give a number in [{low}, {high}]")
    return float(value)


def check_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} = {value!r} is a {type(value).__name__}; give a string")
    return value


def concept_key(concept: str) -> str:
    """What a concept reads as: NFKC (full-width letters as ASCII), invisible format characters (zero-width spaces and
    joiners, soft hyphens) removed, runs of white space as one space. Two concepts with one key get one map."""
    text = unicodedata.normalize("NFKC", concept)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(text.split())


# ---- model folders -------------------------------------------------------------------------------------------------
MAX_RECIPE_STEPS = 1000


def model_recipe(source) -> dict:
    """A model folder's recipe.json (the built-in shapes model has one), checked where the pipeline reads it: "size"
    a multiple of 16, "sample_steps" in 1..1000, "sample_shift" true, false or null, "layers" (the concept-layer
    default) a list of distinct block indices. {} when there is none; a damaged
    one is a ValueError that names the file (never a silent fall-back to FLUX.1's 1024 px and 4 steps)."""
    path = Path(str(source)).expanduser() / "recipe.json"
    if not path.exists():
        return {}
    builtin = Path(__file__).resolve().parent / "shapes" / "weights"
    fix = (
        "restore it with git checkout -- shapes/weights/recipe.json"
        if path.parent.resolve() == builtin
        else "repair it, or remove it to use FLUX.1's defaults (1024 px, 4 steps)"
    )
    if not path.is_file():
        raise ValueError(f"{path} is not a file; {fix}")
    try:
        recipe = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} holds a {type(recipe).__name__}, not a JSON object; {fix}")
    rules = {
        "size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 16 and v % 16 == 0,
        "sample_steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RECIPE_STEPS,
        "sample_shift": lambda v: v is None or isinstance(v, bool),
        "max_length": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "layers": lambda v: (
            isinstance(v, list)
            and bool(v)
            and len(set(v)) == len(v)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
        ),
    }
    wanted = {"size": "a multiple of 16", "sample_steps": "a whole number from 1 to 1000",
              "sample_shift": "true, false or null", "max_length": "a whole number of T5 tokens",
              "layers": "a list of distinct double-block indices"}  # fmt: skip
    for key, ok in rules.items():
        if key in recipe and not ok(recipe[key]):
            raise ValueError(f"{path}: {key} = {recipe[key]!r}, expected {wanted[key]}; {fix}")
    return recipe


def check_run_finite(value: torch.Tensor, what: str, models, dtype: torch.dtype) -> None:
    """Stop a run whose `value` (a step's prediction, the decoded pixels, the maps) holds NaN or an infinity, and say
    why. Only then are the weights scanned: every model the loader marked (its `checkpoint`: file and repair hint) and
    every other module of `models`, so a damaged checkpoint is named by file and tensor at no cost to a healthy run;
    with every weight finite, the run's arithmetic left the range of its dtype."""
    if bool(torch.isfinite(value).all()):
        return
    for model in models:
        for module in model.modules():
            if hasattr(module, "checkpoint"):
                check_finite(module, *module.checkpoint)
        check_finite(model, type(model).__name__)
    fix = "; run it in float32 (--dtype float32)" if dtype == torch.float16 else ""
    raise ValueError(f"the {what} holds NaN or infinite values while every weight is finite: the run overflowed in "
                     f"{str(dtype).removeprefix('torch.')}{fix}")  # fmt: skip


def check_finite(module: torch.nn.Module, where: str, hint: str = "") -> None:
    """Raise a ValueError naming the first parameter or buffer that holds NaN or an infinity. One sum per tensor, no
    copy: a sum is finite exactly when every element is, short of an overflow. float32, bfloat16 and float64 are summed
    in their own dtype (bfloat16 has float32's range, which sums of weights never reach; casting to float32 would copy
    every tensor and cost 10x the time on the CPU); float16 (largest value 65,504) and 1-byte floats through float32
    accumulation."""
    from weights.errors import CheckpointError

    streamed = [(f"{name}.{key}", t) for name, sub in module.named_modules() if hasattr(sub, "host_tensors")
                for key, t in sub.host_tensors()]  # fmt: skip  # blocks streamed from host memory hold no parameters
    for name, tensor in (*module.named_parameters(), *module.named_buffers(), *streamed):
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        if tensor.dtype.itemsize == 1:  # float8 has no sum
            tensor = tensor.float()
        total = tensor.sum(dtype=torch.float32) if tensor.dtype == torch.float16 else tensor.sum()
        if not torch.isfinite(total):
            raise CheckpointError(f"{where}: {name} holds NaN or infinite values; the file is damaged. {hint}".strip())


# ---- command lines -------------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: ...`, exit 2 (as every other error of the commands)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def index(text: str) -> int:
    """An argparse type: a block or step index, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0: indices count from 0")
    return value


# ---- interruptions -------------------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that its clean-up runs (the temporary folder is removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def terminate_as_interrupt():
    """Inside: SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt), as Ctrl-C raises KeyboardInterrupt. For
    a command's `__main__` block (signal handlers can only be set from the main thread)."""

    def handler(signum, frame):
        raise Terminated(signum)

    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def interrupted(stop: KeyboardInterrupt, cleanup: str = "nothing was written") -> int:
    """One line on stderr for Ctrl-C or a termination signal; -> the shell's exit status (128 + the signal)."""
    signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
    name = signal.Signals(signum).name if signum != signal.SIGINT else "Ctrl-C"
    print(f"error: interrupted ({name}); {cleanup}", file=sys.stderr)
    return 128 + int(signum)


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
    check_text(prompt, "prompt")
    notes = []
    pieces = len(tokenizer.encode(prompt)) if prompt else 0
    if pieces > max_length:
        notes.append(f"the prompt is {pieces} T5 tokens with its end token; only the first {max_length} are used")
    for concept in concepts:
        pieces = len(tokenizer.encode(concept))
        if pieces > max_length:
            notes.append(f"the concept {concept[:40]!r} is {pieces} T5 tokens with its end token; only the first "
                         f"{max_length} are used")  # fmt: skip
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


def unseen_words(concepts: list[str], known: frozenset[str] | None) -> list[str]:
    """A warning for concepts with words a built-in model's captions never held (`known`: its world's words, None for
    a real model): its tokenizer splits them into pieces from other worlds, and their maps mean little."""
    if known is None:
        return []
    unseen = [c for c in concepts if any(word not in known for word in c.lower().split())]
    if not unseen:
        return []
    words = ", ".join(sorted(w for w in known if w not in ("a", "and", "on", "at", "in", "the")))
    return [f"the built-in model never saw {', '.join(map(repr, unseen))} in training; its maps for them mean little. "
            f"Its words: {words}"]  # fmt: skip
