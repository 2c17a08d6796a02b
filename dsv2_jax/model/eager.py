"""Eager model calls compile once: `model(ids)` outside any jax trace runs one cached `jax.jit` of the method.

Called eagerly, a method that runs the layer stack would re-trace and re-compile its `lax.scan` on every call
(~3 s for the tiny config on CPU). `compiled_when_eager` instead jits the method over `nnx.split(model)`: the
graphdef and the static arguments are the cache key, the parameters are arguments (so `nnx.update`, merged LoRA
weights or re-sharded params take effect on the next call, with no recompile for the same shapes and shardings).
Under a trace (the project's jitted steps, jax.grad, nnx.jit, jax.export) the method runs as written, so what
those steps lower to is unchanged.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.extend
from flax import nnx

from dsv2_jax.ops.attention_backend import current_platform

with jax.ensure_compile_time_eval():
    _EAGER_TRACE = jax.extend.core.get_opaque_trace_state()  # the top-level (no-trace) state, whatever imports us


def is_eager() -> bool:
    """True outside every jax transformation (and with jit enabled, else the jitted method would call itself)."""
    return not jax.config.jax_disable_jit and jax.extend.core.get_opaque_trace_state() == _EAGER_TRACE


@functools.partial(jax.jit, static_argnums=(0, 1, 3, 5))
def _jitted(method, graphdef, state, static: tuple, dynamic: dict, platform: str):
    # platform: attention_backend.current_platform() at the call, so lowering_platform(...) keys the cache too.
    return method(nnx.merge(graphdef, state), **dynamic, **dict(static))


def compiled_when_eager(*static_argnames: str):
    """Decorates a model method: eager calls run a cached jit of it, traced calls run it directly.
    static_argnames: the method's Python-valued (hashable) parameters; all others must be arrays, None or pytrees."""
    def decorate(method):
        signature = inspect.signature(method)

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if not is_eager():
                return method(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(list(bound.arguments.items())[1:])  # without self
            static = tuple((k, arguments.pop(k)) for k in static_argnames)
            graphdef, state = nnx.split(self)
            return _jitted(method, graphdef, state, static, arguments, current_platform())
        return wrapper
    return decorate
