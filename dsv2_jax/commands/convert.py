"""`dsv2 convert HF_DIR OUT_DIR` (HF safetensors → Orbax) and `dsv2 export CKPT_DIR HF_DIR` (back to HF)."""

from __future__ import annotations

import ctypes
import json
import re

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise ValueError(f"size {text!r} not understood (e.g. 5GB, 500MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def return_freed_buffers_to_os() -> None:
    """Fixes glibc's mmap threshold (256 KiB) for this process.

    By default glibc raises the threshold as large buffers are freed, after which the per-layer buffers come
    from thread arenas that fragment, and resident memory creeps up with the number of layers converted.
    With a fixed threshold every large buffer is mmap'd and handed back when freed, so memory stays flat.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc: nothing to tune
        pass


def run_convert(args) -> int:
    from dsv2_jax.checkpoint.convert import convert_hf_to_orbax

    return_freed_buffers_to_os()

    stats = convert_hf_to_orbax(args.hf_dir, args.out_dir, dtype=args.dtype, force=args.force,
                                progress=not args.quiet)
    print(json.dumps({"out_dir": args.out_dir, **stats}))
    return 0


def run_export(args) -> int:
    from dsv2_jax.checkpoint.convert import export_orbax_to_hf
    from dsv2_jax.train.lora import export_merged, is_lora_run

    return_freed_buffers_to_os()
    if is_lora_run(args.ckpt_dir) != bool(args.merge_lora):
        raise ValueError(f"{args.ckpt_dir}: " + ("a LoRA run: pass --merge-lora to export base + adapters"
                                                  if args.merge_lora is False else "not a LoRA run (no lora.json)"))
    export = export_merged if args.merge_lora else export_orbax_to_hf
    stats = export(args.ckpt_dir, args.hf_dir, dtype=args.dtype, force=args.force,
                               max_shard_bytes=parse_size(args.max_shard_size), progress=not args.quiet)
    print(json.dumps({"hf_dir": args.hf_dir, **stats}))
    return 0


def register(sub) -> None:
    dtypes = ["bfloat16", "float32"]
    p = sub.add_parser("convert", help="HF safetensors checkpoint → Orbax checkpoint (streamed layer by layer)")
    p.add_argument("hf_dir", help="HF DeepSeek-V2 directory: config.json + *.safetensors")
    p.add_argument("out_dir", help="output directory (params/ Orbax tree, config.json, dsv2_config.json, tokenizer)")
    p.add_argument("--dtype", choices=dtypes, help="stored dtype (default: the checkpoint's own)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it is an earlier `dsv2 convert` output (nothing else is ever replaced)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)

    p = sub.add_parser("export", help="converted Orbax checkpoint or training run → HF safetensors directory")
    p.add_argument("ckpt_dir", help="directory written by `dsv2 convert`, or a `dsv2 train` workdir (newest step)")
    p.add_argument("hf_dir", help="output HF directory")
    p.add_argument("--dtype", choices=dtypes, help="exported dtype (default: the stored one)")
    p.add_argument("--max-shard-size", default="5GB", help="split safetensors files above this size (default 5GB)")
    p.add_argument("--merge-lora", action="store_true",
                   help="CKPT_DIR is a LoRA run: write its base with the adapters merged in (float32 by default)")
    p.add_argument("--force", action="store_true",
                   help="replace HF_DIR if it is an earlier `dsv2 export` output (nothing else is ever replaced)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_export)
