"""Shows that conversion memory is bounded by one layer: converts synthetic HF checkpoints of two depths.

Each checkpoint (bf16, one safetensors file per layer, like the published ones) is streamed to disk with
write_safetensors, converted by `dsv2 convert` in a child process and exported back by `dsv2 export`; the
child's peak RSS (getrusage ru_maxrss via wait4) and throughput are reported. Peak RSS should not depend
on depth: the ratio between the deep and the shallow run should be ≈ 1.

    python tools/bench_convert.py                       # 8 and 24 layers, hidden 1024, 64 experts (GB-scale)
    python tools/bench_convert.py --layers 2 4 --hidden 64 --experts 8 --moe-inter 32 --vocab 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsv2_jax.config import ModelConfig, to_hf_dict  # noqa: E402
from dsv2_jax.checkpoint.hf_checkpoint import hf_layer_names, top_entries  # noqa: E402
from dsv2_jax.checkpoint.safetensors_io import INDEX_FILE, write_safetensors  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def synthetic_config(layers: int, hidden: int, experts: int, moe_inter: int, vocab: int) -> ModelConfig:
    heads = max(hidden // 128, 2)
    return ModelConfig.preset("deepseek-v2").replace(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=moe_inter,
        num_hidden_layers=layers, num_attention_heads=heads, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=experts, n_shared_experts=2,
        num_experts_per_tok=min(6, experts // 4), n_group=min(8, experts), topk_group=min(3, experts),
        first_k_dense_replace=1)


def write_synthetic_hf(directory: Path, cfg: ModelConfig, seed: int = 0) -> int:
    """Random-valued bf16 checkpoint, one file per layer, never more than one tensor in memory."""
    rng = np.random.default_rng(seed)
    pool = (0.02 * rng.standard_normal(1 << 24, np.float32)).astype(BF16)  # 32 MB, sliced at random offsets

    def get_for(shapes):
        def get(name):
            n = int(np.prod(shapes[name]))
            if n > pool.size:
                return np.resize(pool, n).reshape(shapes[name])
            start = int(rng.integers(0, pool.size - n + 1))
            return pool[start:start + n].reshape(shapes[name])
        return get

    directory.mkdir(parents=True)
    files = [("model-top.safetensors", {e.hf: e.hf_shape for e in top_entries(cfg)})]
    files += [(f"model-layer{i:03d}.safetensors", hf_layer_names(cfg, i)) for i in range(cfg.num_hidden_layers)]
    total, weight_map = 0, {}
    for fname, shapes in files:
        total += write_safetensors(directory / fname, [(n, BF16, s) for n, s in shapes.items()], get_for(shapes))
        weight_map.update({n: fname for n in shapes})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(dict(to_hf_dict(cfg), torch_dtype="bfloat16")))
    return total


def run_child(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `dsv2 ARGV` in a fresh process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dsv2_jax.cli", *argv, "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"dsv2 {' '.join(argv)} failed:\n{err.decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def bench(layers: int, args, workdir: Path) -> dict:
    cfg = synthetic_config(layers, args.hidden, args.experts, args.moe_inter, args.vocab)
    hf, out, back = workdir / f"hf{layers}", workdir / f"orbax{layers}", workdir / f"back{layers}"
    try:
        size = write_synthetic_hf(hf, cfg)
        conv_s, conv_rss = run_child(["convert", str(hf), str(out)])
        exp_s, exp_rss = run_child(["export", str(out), str(back)])
    finally:
        for d in (hf, out, back):
            shutil.rmtree(d, ignore_errors=True)
    expert_block = cfg.n_routed_experts * cfg.hidden_size * cfg.moe_intermediate_size * BF16.itemsize
    return {"layers": layers, "checkpoint_mb": round(size / 1e6, 1), "expert_block_mb": round(expert_block / 1e6, 1),
            "convert_s": round(conv_s, 2), "convert_mb_s": round(size / 1e6 / conv_s, 1),
            "convert_peak_rss_mb": round(conv_rss / 1e6, 1), "export_s": round(exp_s, 2),
            "export_mb_s": round(size / 1e6 / exp_s, 1), "export_peak_rss_mb": round(exp_rss / 1e6, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs=2, default=[8, 24], help="the two depths to compare")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--moe-inter", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--workdir", help="scratch directory (default: a temp dir, removed afterwards)")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        rows = [bench(n, args, workdir) for n in args.layers]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for row in rows:
        print(json.dumps(row))
    ratio = {k: round(rows[1][k] / rows[0][k], 3) for k in ("convert_peak_rss_mb", "export_peak_rss_mb")}
    size_ratio = round(rows[1]["checkpoint_mb"] / rows[0]["checkpoint_mb"], 2)
    print(json.dumps({"peak_rss_ratio": ratio, "size_ratio": size_ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
