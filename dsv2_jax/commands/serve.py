"""`dsv2 serve --checkpoint DIR`: an OpenAI-compatible HTTP server with continuous batching over a paged cache."""

from __future__ import annotations

import sys
from pathlib import Path

MIB = 1 << 20


def run(args) -> int:
    import jax.numpy as jnp
    import uvicorn

    from dsv2_jax import load_model
    from dsv2_jax.commands.generate import load_text_tokenizer
    from dsv2_jax.serve.app import create_app
    from dsv2_jax.serve.async_engine import AsyncEngine
    from dsv2_jax.serve.chat_template import ChatTemplate
    from dsv2_jax.serve.scheduler import Scheduler

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    tokenizer = load_text_tokenizer(checkpoint)
    template = ChatTemplate.from_checkpoint(checkpoint)
    mesh = sharding = None
    if args.mesh:
        from jax.sharding import NamedSharding, PartitionSpec

        from dsv2_jax.parallel.sharding import make_mesh

        mesh = make_mesh(args.mesh)
        sharding = NamedSharding(mesh, PartitionSpec())  # the latent is shared by all heads: replicate it
    model = load_model(checkpoint, args.dtype, mesh=mesh)
    cfg = model.config
    sched = Scheduler(model, page_size=args.page_size, num_pages=args.num_pages,
                      cache_memory_bytes=int(args.cache_memory_mib * MIB), max_running=args.max_running,
                      max_tokens_per_step=args.max_tokens_per_step, max_prefill_chunk=args.max_prefill_chunk,
                      max_prefill_tokens=args.max_prefill_tokens, max_model_len=args.max_model_len,
                      cache_dtype=jnp.dtype(args.cache_dtype), cache_sharding=sharding)
    if not args.no_warmup:
        print(f"dsv2 serve: compiling {len(sched.bucket_shapes())} step shapes", file=sys.stderr, flush=True)
        sched.warmup()
    eos = getattr(tokenizer, "eos_id", None)
    eos = cfg.eos_token_id if eos is None else eos
    bos = cfg.bos_token_id if not args.no_bos else None
    engine = AsyncEngine(sched, max_waiting=args.max_waiting)
    name = args.served_model_name or checkpoint.resolve().name
    app = create_app(engine, tokenizer, name, template, bos, () if eos is None else (eos,))
    print(f"dsv2 serve: {name} on http://{args.host}:{args.port} — {sched.allocator.capacity} pages x "
          f"{args.page_size} tokens ({sched.cache.nbytes / MIB:.1f} MiB latent cache), max_running "
          f"{args.max_running}, max_model_len {sched.max_model_len}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, paged latent cache)")
    p.add_argument("--checkpoint", required=True, help="HF DeepSeek-V2 directory, a `dsv2 convert` output or a `dsv2 train` workdir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--mesh", default="", help="shard the weights over this host's devices, e.g. tensor=8 or tensor=4,expert=2")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--cache-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--page-size", type=int, default=64, help="tokens per cache page")
    p.add_argument("--cache-memory-mib", type=float, default=1024, help="latent-cache pool size")
    p.add_argument("--num-pages", type=int, default=None, help="pool size in pages (overrides --cache-memory-mib)")
    p.add_argument("--max-running", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-tokens-per-step", type=int, default=512, help="tokens computed per step (prefill + decode)")
    p.add_argument("--max-prefill-chunk", type=int, default=None, help="longest prefill chunk of one request")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prefill tokens in a step that also decodes (default --max-tokens-per-step): bounds TPOT")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion limit")
    p.add_argument("--max-waiting", type=int, default=128, help="queued requests beyond max-running before HTTP 429")
    p.add_argument("--no-bos", action="store_true", help="do not prepend bos to /v1/completions text prompts")
    p.add_argument("--no-warmup", action="store_true", help="compile step shapes on first use, not at start")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=run)
