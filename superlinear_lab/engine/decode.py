"""`Decoder`: the one-token step of a model over one static cache, as a captured CUDA graph on CUDA (eager otherwise).

A session's cache is static (`HybridCache`: K/V [B, H_KV, max_len, D] per attention layer, conv/SSM states), so
the whole one-token forward — embedding, every block, the head — has fixed shapes and fixed tensor addresses.
Only the token and its position change from step to step; both live in device tensors (`ids` [1, 1], `position`
[1]) that the step reads on the device (`model.step`, attention through a pre-validated
`superlinear_kernels.DecodeAttention` per layer). One captured graph therefore serves every position up to the
capacity; a reallocated cache (`Session.grow`) gets a new `Decoder` and a new capture.

Capture runs two warm-up steps (Triton compiles, cuBLAS handles) and records one step, all at the last
position ``max_len - 1``, which a session never uses (cursor + n < max_len), and restores the conv/SSM states
afterwards: the session's observable state is unchanged. If anything fails (a model whose step reads a device
value, an op that cannot be captured) the reason is logged and the same step runs eagerly.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DECODE_MODES = ("auto", "eager", "forward")


def hooks_attached(model) -> bool:
    """True while a trace or intervention hook is attached (token recorders, routing/qkv recorders, routing
    overrides): then only the model's `forward` calls them, so steps must go through it."""
    if getattr(model, "token_recorders", None):
        return True
    return any(getattr(layer, "routing_recorders", None) or getattr(layer, "routing_overrides", None)
               or getattr(layer, "qkv_recorders", None) for _, layer in model.routing_layers())


def can_step(model) -> bool:
    """Does `model` offer the one-token step (`decode_entries` + `step`, as `HybridLM` and `SuperlinearExpLM`)?"""
    return callable(getattr(model, "step", None)) and callable(getattr(model, "decode_entries", None))


class Decoder:
    """One-token forwards of `model` over `cache` (batch 1): ``decoder(token, position)`` -> fp32 logits [vocab].

    Args:
        model: a model with `step` / `decode_entries` (`can_step`), in eval mode.
        cache: its static cache (the session's); conv/SSM states must belong to the position of each call.

    The first call asking for a graph captures it (CUDA only; on failure the reason is in `fallback_reason` and
    the log, and steps run eagerly). The returned logits are a view of a buffer the next call overwrites: clone
    them to keep them. `path` says how the last step ran: "graph" or "eager".
    """

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        device = model.device
        self.entries = model.decode_entries(cache)
        self.ids = torch.zeros(1, 1, dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fallback_reason: str | None = None
        self._tried = False  # capture is attempted once
        self._out: torch.Tensor | None = None
        self.path = "eager"

    def _run(self) -> torch.Tensor:
        """One step at the device-held token and position; then, on the device, the greedy next token (argmax of
        the logits, as the session's sampler at temperature 0) goes into `ids` and `position` advances, so
        consecutive steps need nothing from the host (`Session.generate`'s pipelined greedy loop)."""
        logits = self.model.step(self.ids, self.cache, self.position, self.entries)
        self.ids.copy_(torch.argmax(logits[:, -1], dim=-1, keepdim=True))
        self.position.add_(1)
        return logits

    def _capture(self) -> None:
        cache = self.cache
        saved = (cache.conv_states.clone(), cache.ssm_states.clone())
        # The warm-up steps launch the attention kernels directly: an entry's own graph (DecodeAttention's
        # default) would be captured by them and never used while the whole step replays (its memory wasted).
        own_graphs = [entry.use_graph for entry in self.entries]
        for entry in self.entries:
            entry.use_graph = False
        self.ids.fill_(0)
        self.position.fill_(cache.max_len - 1)  # never a context position: K/V written there are never read
        try:
            side = torch.cuda.Stream(device=self.position.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(2):
                    self.position.fill_(cache.max_len - 1)
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.position.fill_(cache.max_len - 1)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._run()
            self.graph, self._out = graph, out
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to the eager step
            self.graph, self._out = None, None
            self.fallback_reason = f"{type(e).__name__}: {e}"
            logger.warning("CUDA-graph capture of the one-token step failed (%s); decoding eagerly",
                           self.fallback_reason)
        finally:
            cache.conv_states.copy_(saved[0])
            cache.ssm_states.copy_(saved[1])
            for entry, on in zip(self.entries, own_graphs):  # eager steps (fallback, decode="eager") use them
                entry.use_graph = on

    def __call__(self, token: int, position: int, graph: bool = True) -> torch.Tensor:
        """Run `token` at `position` (0 < position < max_len - 1, both checked by the caller on the host): writes its
        K/V and advances the conv/SSM states in the cache; returns fp32 logits [vocab] (a reused buffer). With
        `graph` the step replays the captured graph (captured now if not tried yet), else it runs eagerly."""
        self.ids.fill_(token)
        self.position.fill_(position)
        return self.launch(graph)

    def launch(self, graph: bool = True) -> torch.Tensor:
        """One step at the token and position the device holds (`ids`, `position`: the previous step's greedy
        next token and position + 1, or what `__call__` wrote); returns fp32 logits [vocab] (a reused buffer).
        Nothing is read on the host."""
        if graph and not self._tried:
            self._tried = True
            device = self.position.device
            if device.type != "cuda":
                self.fallback_reason = f"the model is on {device}, CUDA graphs need a CUDA device"
            else:
                saved = (self.ids.clone(), self.position.clone())
                self._capture()
                self.ids.copy_(saved[0])
                self.position.copy_(saved[1])
        if graph and self.graph is not None:
            self.graph.replay()
            self.path = "graph"
            return self._out[0, -1]
        self.path = "eager"
        with torch.no_grad():
            return self._run()[0, -1]
