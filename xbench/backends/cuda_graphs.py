"""CUDA graphs for the packed encoder: one captured forward per shape bucket, replayed.

A 6-layer encoder at fp16 on a Hopper GPU finishes its ~80 kernels faster than Python can
launch them, so an eager forward costs the host more than the GPU, and it holds the GIL that the
batcher and the tokenizer pool's results need. A captured forward replays as one call that
releases the GIL.

A graph has fixed shapes, so every flat batch is brought to a bucket on the host, in numpy,
without touching the GPU (`pack_inputs`: ids, token types, positions, pair offsets), the token count is
rounded up (at most ~6% more), and the extra tokens become spare pairs of at most `longest`
tokens each; the pair count is rounded up too, the rows beyond the spare pairs having no tokens.
Attention runs per pair through flash attention's variable-length kernel, so spare pairs never
touch real ones, and only the real pairs' scores are read. The inputs travel in one pinned,
non-blocking copy into the graph's input buffer. Graphs share one memory pool (they replay one at
a time, and each replay's scores are copied out before the next), and their number is capped:
past `max_graphs` a new shape runs eagerly on the same packed inputs.

The bucketed inputs and the eager path (`capture=False`) run anywhere, so the CPU tests hold the
host-side packing to the padded model's scores; only the capture needs CUDA.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from xbench.backends.packed import PackedEncoder, Packing, Shape, pack_inputs

log = logging.getLogger(__name__)

MAX_GRAPHS = 96  # captured shapes per model worker; each holds its static input buffer
MIN_TOKEN_STEP = 256
LENGTH_STEP = 64  # the attention kernel's `longest` is rounded up to this
ROW_STEP = 16
_CAPTURE_LOCK = threading.Lock()


def token_bucket(tokens: int) -> int:
    """Tokens rounded up to a step of 1/16 of their power of two (at least MIN_TOKEN_STEP)."""
    step = max(MIN_TOKEN_STEP, 1 << max(0, tokens.bit_length() - 5))
    return -(-tokens // step) * step


def bucket(shape: Shape, max_longest: int) -> Shape:
    """The graph shape a batch runs in: its tokens rounded up (`token_bucket`), `longest` rounded
    up to LENGTH_STEP, and rows for the spare pairs the extra tokens form, rounded up to ROW_STEP."""
    longest = min(max_longest, max(1, -(-shape.longest // LENGTH_STEP)) * LENGTH_STEP)
    tokens = token_bucket(shape.tokens)
    spare_pairs = -(-(tokens - shape.tokens) // longest)
    return Shape(tokens, -(-(shape.rows + spare_pairs) // ROW_STEP) * ROW_STEP, longest)


class GraphedEncoder:
    """Runs a PackedEncoder (on CUDA at fp16/bf16: variable-length attention) through CUDA graphs
    keyed by bucketed shape. `capture=False` runs the same bucketed inputs eagerly."""

    def __init__(self, encoder: PackedEncoder, device: torch.device, max_longest: int, capture: bool = True,
                 max_graphs: int = MAX_GRAPHS):
        self.encoder = encoder
        self.device = device
        self.max_longest = max_longest
        self.capture = capture
        self.max_graphs = max_graphs
        self.graphs: dict[Shape, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0
        self.eager_runs = 0

    def _run(self, shape: Shape, buffer: torch.Tensor) -> torch.Tensor:
        """The forward on an input buffer of this shape: float32 logits [rows, labels]."""
        _, _, _, offsets, first = shape.views(buffer)
        return self.encoder(buffer, shape, Packing.of_offsets(offsets, first, shape.longest)).float()

    @torch.inference_mode()
    def forward(self, flat_ids: np.ndarray, flat_types: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """Logits of a flat batch's pairs [rows, labels], on the host."""
        rows = len(lengths)
        shape, inputs = pack_inputs(flat_ids, flat_types, lengths, self.encoder.position_offset,
                                    bucket(Shape(len(flat_ids), rows, int(lengths.max())), self.max_longest))
        graph = self.graphs.get(shape)
        if graph is None and self.capture and len(self.graphs) < self.max_graphs:
            graph = self._capture(shape, inputs)
        if graph is None:
            self.eager_runs += 1
            return self._run(shape, torch.from_numpy(inputs).to(self.device))[:rows].cpu()
        g, staging, buffer, logits = graph
        staging.copy_(torch.from_numpy(inputs))
        buffer.copy_(staging, non_blocking=True)
        g.replay()
        self.replays += 1
        return logits[:rows].cpu()  # waits for the replay; the staging buffer is free again

    def _capture(self, shape: Shape, inputs: np.ndarray):
        staging = torch.from_numpy(inputs).pin_memory()
        buffer = staging.to(self.device)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # once eagerly: kernels and library handles load outside the capture
                self._run(shape, buffer)
            torch.cuda.current_stream(self.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            # One capture at a time in the process, and other threads' CUDA calls (another model
            # worker's launches) left alone by it.
            with _CAPTURE_LOCK, torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._run(shape, buffer)
        except RuntimeError as exc:  # a kernel that cannot be captured: this worker runs eagerly
            log.warning("CUDA graph capture failed (%s); running eagerly", exc)
            self.capture = False
            return None
        self.graphs[shape] = (g, staging, buffer, logits)
        return self.graphs[shape]

    def describe(self) -> dict:
        return {"cuda_graphs": self.capture, "graphs": len(self.graphs), "replays": self.replays,
                "eager_runs": self.eager_runs}
