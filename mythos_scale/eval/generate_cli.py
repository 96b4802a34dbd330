"""`mythos generate`: sample text from a trained model with its compressed MLA cache.

    mythos generate --run runs/tiny_cpu --prompt "def main(" --max-new-tokens 64
    mythos generate --checkpoint exported/ --prompt "import " --loops 8 --temperature 0 --exit kl

One process, CPU or GPU, no DeepSpeed.  The prompt is run once into the KV cache (MLA keeps the
latent c_KV and the shared rope key per token), then each new token is decoded through it with
weight absorption; sampling stops at the end-of-document token.  Prints the text, then the
decode speed (tokens/s), the mean loops used per token (--exit kl: the per-token KL early exit)
and the cache size.  Exit status 2 for a path or option that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys

from mythos_scale.eval.eval_cli import add_model_arguments, resolve_device
from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mythos generate", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--loops", type=int, help="loop count T (default: the model's, max_loops // 2)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set of this probability")
    parser.add_argument("--exit", choices=["none", "kl"], default="none", help="per-token early exit")
    parser.add_argument("--exit-threshold", type=float, default=5e-4, help="KL threshold in nats (--exit kl)")
    parser.add_argument("--no-absorb", action="store_true", help="expand per-head K/V from the cache each step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from mythos_scale.eval.generate import Sampling, generate
    from mythos_scale.eval.load import ModelLoadError, load_model

    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
        if args.loops is not None and args.loops < 1:
            raise ValueError(f"--loops must be >= 1, got {args.loops}")
        device = resolve_device(args.device, args.threads)
        loaded = load_model(args.run or args.checkpoint, device)
        if loaded.tokenizer is None:
            raise ModelLoadError(f"{args.run or args.checkpoint}: no tokenizer found (neither in the folder nor "
                                 f"the run's dataset) to encode the prompt with")
        if args.exit == "kl" and loaded.model.halting is not None:
            raise ValueError("--exit kl: this model halts by ACT (model.act.enabled), which already exits per token")
        tok = loaded.tokenizer
        ids = tok.tokenizer.encode(args.prompt, add_special_tokens=False).ids
        if not ids:
            raise ValueError("--prompt is empty")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        out = generate(loaded.model, torch.tensor([ids]), args.max_new_tokens, args.loops, sampling, tok.eos_id,
                       args.exit_threshold if args.exit == "kl" else None, absorb=not args.no_absorb,
                       generator=generator)
    except (ModelLoadError, ValueError) as exc:
        print(f"mythos generate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    new = out.tokens[0, :out.lengths[0]].tolist()
    text = tok.tokenizer.decode(new, skip_special_tokens=True)
    loops = args.loops or loaded.model.default_loops
    stats = {"new_tokens": len(new), "stopped_at_eos": bool(new and new[-1] == tok.eos_id),
             "decode_tokens_per_s": out.decode_tokens_per_s, "prefill_s": out.prefill_s, "decode_s": out.decode_s,
             "loops": loops, "mean_loops": out.mean_loops, "cache_bytes": out.cache_bytes,
             "cache_bytes_per_token": out.cache_bytes_per_token,
             "uncached_bytes_per_token": out.uncached_bytes_per_token, "device": str(device)}
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, "tokens": new, **stats}, indent=2))
        return EXIT_OK
    print(args.prompt + text)
    print(f"--- {len(new)} tokens{' (stopped at EOS)' if stats['stopped_at_eos'] else ''} on {device}: "
          f"{out.decode_tokens_per_s:.1f} tokens/s decoding, prefill {out.prefill_s * 1e3:.1f} ms; "
          f"mean loops {out.mean_loops:.2f} of {loops}; KV cache {out.cache_bytes_per_token} B/token "
          f"(per-head K/V: {out.uncached_bytes_per_token} B/token), {out.cache_bytes / 1024:.1f} KiB allocated",
          file=sys.stderr)
    return EXIT_OK
