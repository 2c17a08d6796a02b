"""Shared fixtures: tiny random DeepSeek-V2 checkpoints written by transformers itself (offline)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Eight simulated CPU devices for the sharding tests; must be set before jax is imported anywhere. Compiling is
# most of this suite's time and the tiny programs hardly run, so XLA's backend optimisation level 0 (less LLVM
# work) pays: a cold tiny train() 44 -> 27 CPU-s. The programs (the StableHLO the lowering tests read, sharding)
# are the same; tests that run a lot (Pallas interpret mode, serving) measured no slower.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, inherited by every subprocess and notebook kernel: the
# same train/decode step is compiled by many tests (each Trainer jits afresh), and a hit loads it instead (a tiny
# train(): 130 s compiling, 18 s on a hit, on a loaded box). Keys cover the HLO, XLA_FLAGS and jax version, so only
# identical programs are shared. Tests that time compilation opt out (@pytest.mark.no_compile_cache).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="dsv2-test-jax-cache-")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _compile_cache_off_when_timed(request):
    """Tests marked no_compile_cache (their assertions are about compile time) compile with the cache off."""
    if request.node.get_closest_marker("no_compile_cache") is None:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


# CI runs two pytest-xdist workers (pyproject's addopts: `-n 2 --dist loadfile --no-loadscope-reorder`): a file's
# tests stay on one worker, so its module/session fixtures (a trained run, a two-process cluster) are built once and
# its tests that reuse each other's compiled programs still run one after another. Files are handed out in
# collection order: the slowest first, longest first (per-file seconds of a `-n 2` run), so the two workers end
# together on the short files; then the rest (each under ~10 s) in name order. A stale entry only costs balance,
# never coverage.
SLOW_FILES_FIRST = ("test_notebooks.py", "test_multihost.py", "test_decode.py", "test_model_parity.py",
                    "test_finetune.py", "test_quantize.py", "test_grouped_gemm.py", "test_train.py",
                    "test_memory_plan.py", "test_expert_parallel.py", "test_lowering.py", "test_convert.py",
                    "test_serve_scheduler.py", "test_serve_http.py", "test_reliability.py", "test_generate_cli.py",
                    "test_kernels_flash.py", "test_kernels_decode.py", "test_serve_mesh.py", "test_serve_kernel.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: name order within each rank


# Tiny configs covering both published variants. (a) V2-style: q compression, group-limited routing, YaRN with
# mscale, routed_scaling_factor != 1, a dense first layer. (b) V2-Lite-style: no q compression, greedy.
V2_STYLE = dict(
    vocab_size=160, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
    topk_method="group_limited_greedy", first_k_dense_replace=1, routed_scaling_factor=2.5,
    norm_topk_prob=False, max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                         beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
)
LITE_STYLE = dict(
    V2_STYLE, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
    num_experts_per_tok=2, num_hidden_layers=2,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                         beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
)
HF_CONFIGS = {"v2": V2_STYLE, "lite": LITE_STYLE}


def make_hf_checkpoint(path, overrides: dict, seed: int = 0, max_shard_size=None, init_std: float = 0.15):
    """Saves a random DeepseekV2ForCausalLM with save_pretrained; returns the torch model (fp32, eval).

    Weights are drawn larger than HF's default 0.02 so routing, RoPE and attention are all exercised.
    """
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV2Config(**overrides)
    model = DeepseekV2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(init_std * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


@pytest.fixture(scope="session", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(name, directory, torch model) for each tiny config."""
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    model = make_hf_checkpoint(path, HF_CONFIGS[request.param])
    return request.param, path, model


@pytest.fixture(scope="session")
def hf_v2(tmp_path_factory):
    """(directory, torch model) of the V2-style tiny checkpoint."""
    path = tmp_path_factory.mktemp("hf_v2_only")
    return path, make_hf_checkpoint(path, V2_STYLE)
