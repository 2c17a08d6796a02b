"""int8 vs bfloat16 on a trained checkpoint: greedy agreement over N new tokens and held-out perplexity.

    python tools/eval_quantize.py runs/tiny --heldout dsv2_jax --tokens 256 --batches 16

The held-out text defaults to this package's own sources (the main job trains on the standard library).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from dsv2_jax import load_model
from dsv2_jax.train.data import make_dataset
from dsv2_jax.infer.quantize import greedy_agreement, memory_report, perplexity
from dsv2_jax.tokenizer import load_tokenizer

PROMPT = "import os\n\n\ndef main(argv):\n    "


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--heldout", nargs="+", default=[str(Path(__file__).resolve().parents[1] / "dsv2_jax")])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    ref = load_model(args.checkpoint, "bfloat16")
    q = load_model(args.checkpoint, "bfloat16", quantize="int8")
    tok = load_tokenizer(args.checkpoint if (Path(args.checkpoint) / "tokenizer.json").is_file() else None)
    prompt = [tok.bos_id] + tok.encode(PROMPT)
    held = list(itertools.islice(iter(make_dataset(args.heldout, tok, args.seq_len, 8, num_epochs=1, shuffle=False)),
                                 args.batches))
    ppl_ref, ppl_q = perplexity(ref, held), perplexity(q, held)
    out = {"greedy": greedy_agreement(ref, q, prompt, args.tokens), "ppl_bf16": ppl_ref, "ppl_int8": ppl_q,
           "ppl_increase": ppl_q / ppl_ref - 1, "heldout_tokens": int(sum(b["loss_mask"].sum() for b in held)),
           "memory": memory_report(ref.config, "int8"), "memory_bf16": memory_report(ref.config)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
