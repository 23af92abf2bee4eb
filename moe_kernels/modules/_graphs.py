"""CUDA graphs of a module's inference steps at decode sizes, made and replayed inside its ``forward``.

An eager decode step of an MoE block launches about ten small kernels; in Python each launch (argument binding,
descriptors, the torch.library dispatch around it) costs tens of microseconds, so a step of an HF model's
``generate`` spends more time on the host than the kernels take on the GPU. A replay of a graph launches them all
with one call. What a graph needs, and what this helper checks on every call:

- nothing in the step may depend on host values that change between calls: the shape (the token count T), dtype,
  device and inference mode are part of the key, and so are the addresses of the module's parameters and buffers
  (a replaced tensor means a new graph; an in-place update is read by the replay, as by an eager call);
- no autograd (``torch.is_grad_enabled()`` is False), no outer capture or ``torch.compile`` tracing (they graph the
  step themselves);
- the caller's eager checks that read values (``MOE_KERNELS_VALUE_CHECKS``, host syncs) are off: a replay skips
  them, so with them on every call stays eager.

The first call of a key runs eagerly (its kernels compile, lazily made state appears, its result is the real
one); the second captures and replays. A module keeps at most ``max_graphs`` graphs and then runs new keys
eagerly: a server whose token count changes every step never recaptures in a loop. Inputs are copied into the
graph's input buffer and the output cloned out of its output buffer (one copy each: the buffers are reused by the
next replay), so one memory pool serves all of a module's graphs, which replay one at a time on the caller's
stream. The pool is the module's own and is dropped with its last graph: a CUDA graph pool whose graphs are all
gone may not take a new capture (the caching allocator asserts on it, H100, torch 2.11, 2026-12-07: a pool shared
by every module of a device failed that way once a test's layers were freed). ``MOE_KERNELS_CUDA_GRAPHS=0`` turns
it off.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

from .._checks import value_checks_enabled


def graphs_enabled_by_env() -> bool:
    return os.environ.get("MOE_KERNELS_CUDA_GRAPHS", "1") != "0"


class DecodeGraphs:
    """Up to ``max_graphs`` graphs for inputs of 1..``max_tokens`` rows (then new keys run eagerly)."""

    def __init__(self, max_tokens: int = 256, max_graphs: int = 8):
        self.max_tokens, self.max_graphs = max_tokens, max_graphs
        self._graphs: dict = {}  # key -> (graph, static input, static output), or None: its capture failed
        self._seen: set = set()  # keys that ran once eagerly
        self._pool = None  # the memory pool of this module's graphs (made at the first capture)
        self.replays = 0  # replays served (tests and benchmarks read it)

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def applies(self, x: torch.Tensor) -> bool:
        """Whether a call on the 2-D input ``x`` may take a graph (the caller adds its own conditions)."""
        if not (x.is_cuda and 0 < x.shape[0] <= self.max_tokens and not torch.is_grad_enabled()
                and graphs_enabled_by_env() and not torch.compiler.is_compiling()
                and not torch.cuda.is_current_stream_capturing()):
            return False
        if value_checks_enabled(x):
            _hint_value_checks()
            return False
        return True

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module,
                 x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled(), module.training,
               _addresses(module))
        entry = self._graphs.get(key, False)
        if entry is False:
            if key not in self._seen or len(self._graphs) >= self.max_graphs:
                # first call of this key (compiles, warms; its result is the real one), or no room: eager
                if len(self._seen) > 64 * self.max_graphs:
                    self._seen.clear()
                self._seen.add(key)
                return fn(x)
            entry = self._capture(fn, x, key)
        if entry is None:  # this key could not be captured: eager
            return fn(x)
        graph, x_in, y_out = entry
        x_in.copy_(x)
        graph.replay()
        self.replays += 1
        return y_out.clone()

    def _capture(self, fn, x, key):
        x_in = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        x_in.copy_(x)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                y_out = fn(x_in)
        except Exception as e:  # noqa: BLE001 (anything the step does that a capture refuses: stay eager)
            warnings.warn(f"moe_kernels: a CUDA graph of this step could not be captured ({type(e).__name__}: "
                          f"{str(e)[:200]}); it runs eagerly", stacklevel=4)
            self._graphs[key] = None
            if not any(self._graphs.values()):  # no graph holds the pool: the next capture takes a new one
                self._pool = None
            return None
        self._graphs[key] = (graph, x_in, y_out)
        return self._graphs[key]


@functools.lru_cache(maxsize=None)
def _hint_value_checks() -> None:
    """Once a process: a decode-sized inference step ran eagerly only because value checks are on."""
    warnings.warn("moe_kernels: MoELayer inference steps of <= 256 tokens run eagerly while value checks are on "
                  "(MOE_KERNELS_VALUE_CHECKS=1: a host sync per check). For serving set MOE_KERNELS_VALUE_CHECKS=0: "
                  "no syncs, and each layer replays CUDA graphs of its decode steps (docs/serving.md)", stacklevel=5)


def _addresses(module: torch.nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in module.parameters()) + tuple(t.data_ptr() for t in module.buffers())
