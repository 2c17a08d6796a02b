"""`dsv2 generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3)`: streamed generation from one prompt.

Text goes through the checkpoint's tokenizer.json (HF `tokenizers`) or, without one, the byte-level tokenizer.
With --prompt-ids and --json no tokenizer is needed: ids in, ids out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dsv2_jax.parallel import distributed


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def load_text_tokenizer(checkpoint: Path):
    from dsv2_jax.tokenizer import load_tokenizer

    if (checkpoint / "tokenizer.json").is_file():
        return load_tokenizer(checkpoint)
    print(f"dsv2 generate: note: no tokenizer.json in {checkpoint}; text is read and written as UTF-8 byte ids "
          "(0-255)", file=sys.stderr)
    return load_tokenizer(None)


def run(args) -> int:
    from dsv2_jax.cli import USER_ERRORS

    try:
        distributed.initialize_from_args(args, label="dsv2 generate")
    except distributed.DistributedError as e:
        print(f"dsv2 generate: error: {e}", file=sys.stderr)
        return 2
    # Every process runs the same decode over its shards of a multi-host mesh; process 0 prints. One that fails
    # alone stops the others rather than leave them hung in a collective.
    with distributed.stop_the_others_on_failure(USER_ERRORS):
        return _generate(args, show=distributed.is_primary())


def _generate(args, show: bool) -> int:
    from dsv2_jax import load_model
    from dsv2_jax.infer.engine import DecodeEngine
    from dsv2_jax.infer.sampling_args import check_max_new_tokens, check_sampling

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    needs_text = args.prompt is not None or not args.json
    check_max_new_tokens(args.max_new_tokens)  # bad sampling arguments fail before the model is loaded
    check_sampling(args.temperature, args.top_k, args.top_p, args.seed, vocab_size=1)  # (the engine clamps top_k)
    tokenizer = load_text_tokenizer(checkpoint) if needs_text else None
    mesh = None
    if args.mesh:
        from dsv2_jax.parallel.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    model = load_model(checkpoint, args.dtype, mesh=mesh, quantize=args.quantize)
    if args.prompt is not None:
        # Documents are trained as [bos, text..., eos]: a text prompt starts the same way.
        bos = model.config.bos_token_id
        ids = ([bos] if bos is not None and not args.no_bos else []) + tokenizer.encode(args.prompt)
    else:
        ids = parse_ids(args.prompt_ids)
    eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    eos = model.config.eos_token_id if eos is None else eos
    engine = DecodeEngine(model)
    new: list[int] = []
    shown = ""
    for step in engine.stream([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, eos_id=eos):
        new.append(step[0])
        if show and not args.json:  # print only the newly completed text (multi-byte characters may span tokens)
            text = tokenizer.decode(new)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    stats = engine.stats
    if not show:
        return 0
    if args.json:
        record = {"prompt_ids": ids, "new_ids": new, "tokens_per_s": round(stats.tokens_per_s, 2),
                  "prefill_s": round(stats.prefill_s, 4), "cache_bytes": stats.cache_nbytes}
        if tokenizer is not None:
            record["text"] = tokenizer.decode(new)
        print(json.dumps(record))
    else:
        print()
        print(f"[{len(new)} tokens, {stats.tokens_per_s:.1f} tok/s, latent cache {stats.cache_nbytes} bytes]",
              file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint with the latent KV cache")
    p.add_argument("--checkpoint", required=True, help="HF DeepSeek-V2 directory, a `dsv2 convert` output or a "
                                                       "`dsv2 train` workdir (a LoRA run loads base + adapters)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the checkpoint's tokenizer)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default="", help="shard the weights, e.g. tensor=4,expert=2 (with --distributed: "
                                              "over all hosts' devices)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the model's bos token to --prompt")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--quantize", choices=("int8",), help="weight-only int8 projections (per-channel scales)")
    p.add_argument("--json", action="store_true", help="print one JSON line (ids, text, tokens/s, cache bytes)")
    distributed.add_arguments(p)
    p.set_defaults(func=run)
