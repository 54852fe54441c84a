"""Our T5 encoder against transformers' `T5EncoderModel` holding the same weights, in one process.

    python benchmarks/bench_t5.py [--device cuda] [--d-model 4096 --d-kv 64 --d-ff 10240 --heads 64 --layers 24]

Random weights (the cost does not depend on their values), 256 tokens as Flux runs T5, on an encoder narrower than
T5-XXL by default on the CPU (the attention share grows with tokens per width, so a narrow model shows it best).
Variants, interleaved round by round: our SDPA path (the default), our manual path (`manual_attention=True`), and
transformers with `attn_implementation` "sdpa" and "eager". Prints medians with their spread and the ratios against
transformers' SDPA path, after checking that every variant gives the same output.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import torch
from timing import interleaved, report

from t5 import T5Config, T5Encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-kv", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=1280)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = T5Config(vocab_size=32128, d_model=args.d_model, d_kv=args.d_kv, d_ff=args.d_ff, num_layers=args.layers,
                      num_heads=args.heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      layer_norm_epsilon=1e-6)  # fmt: skip
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
        num_layers=config.num_layers, num_heads=config.num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    theirs = {}
    for implementation in ("sdpa", "eager"):
        hf_config = copy.deepcopy(hf_config)
        hf_config._attn_implementation = implementation
        model = transformers.T5EncoderModel(hf_config)
        if theirs:
            model.load_state_dict(next(iter(theirs.values())).state_dict())
        theirs[implementation] = model.to(device, dtype).eval()
    state = {k: v for k, v in theirs["sdpa"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    ours = {}
    for manual in (False, True):
        model = T5Encoder(replace(config, manual_attention=manual))
        model.load_state_dict(state, strict=True)
        ours[manual] = model.to(device, dtype).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.tokens), device=device)
    calls = {
        "ours (SDPA)": lambda: ours[False](ids),
        "ours (manual_attention)": lambda: ours[True](ids),
        "transformers sdpa": lambda: theirs["sdpa"](input_ids=ids).last_hidden_state,
        "transformers eager": lambda: theirs["eager"](input_ids=ids).last_hidden_state,
    }
    with torch.no_grad():
        outputs = {name: call().float() for name, call in calls.items()}
    reference = outputs["transformers sdpa"]
    errors = {name: (out - reference).abs().max().item() for name, out in outputs.items()}
    shape = f"{config.d_model} wide, {config.num_layers} layers, {config.num_heads} heads, {args.tokens} tokens"
    print(f"T5 {shape}, batch {args.batch}, {device.type} {dtype}, {torch.get_num_threads()} threads")
    print("max abs difference from transformers sdpa: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    for line in report(interleaved(calls, args.rounds, device), "transformers sdpa", width=26):
        print(line)


if __name__ == "__main__":
    main()
