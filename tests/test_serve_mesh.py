"""`dsv2 serve --mesh`: the scheduler over weights sharded on a tensor x expert mesh (expert-parallel dispatch, the
latent pool replicated) gives transformers' greedy tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsv2_jax import load_model
from dsv2_jax.parallel.expert_parallel import ExpertParallel
from dsv2_jax.parallel.sharding import make_mesh
from dsv2_jax.serve.scheduler import Scheduler
from test_decode import hf_greedy
from test_serve_scheduler import run


def test_scheduler_on_an_expert_parallel_mesh_matches_transformers(hf_v2):
    path, torch_model = hf_v2
    mesh = make_mesh("tensor=2,expert=4")
    model = load_model(path, mesh=mesh)
    assert isinstance(model.moe_layers.mlp.dispatch, ExpertParallel)
    # One step shape (8 token rows x 2 pages of 32): the sharded program is compiled once.
    sched = Scheduler(model, page_size=32, num_pages=8, max_running=2, max_tokens_per_step=8, max_prefill_chunk=8,
                      max_model_len=64, cache_dtype=jnp.float32, cache_sharding=NamedSharding(mesh, PartitionSpec()))
    assert sched.bucket_shapes() == [(8, 2)]
    assert len(sched.cache.ckv[0].sharding.device_set) == 8
    rng = np.random.default_rng(3)
    # Four requests for two slots: prompts of one and of several prefill chunks (packed with decode rows), outputs
    # of different lengths.
    work = [([int(t) for t in rng.integers(3, 150, n)], m) for n, m in ((5, 9), (37, 6), (12, 11), (3, 7))]
    reqs = run(sched, work)
    assert sched.pages_in_use == 0
    for r, (p, m) in zip(reqs, work):
        assert r.output == hf_greedy(torch_model, p, m), f"request {r.id}"
