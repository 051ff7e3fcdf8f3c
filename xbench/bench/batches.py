"""Pre-tokenized pairs cut into batches outside the pipeline: for timing a backend alone
(benchmarks, the GPU check) and scoring a fixed set of pairs (fidelity tests), the cuts the
batcher itself would make."""

from __future__ import annotations

import numpy as np

from xbench.core.batcher import ModelBatch, plan_batches
from xbench.core.cost_model import CostModel
from xbench.core.tokenizer_pool import Encoded
from xbench.layout import pad


def model_batches(enc: Encoded, max_batch_size: int, max_batch_tokens: int = 10**9, bucketing: bool = True,
                  cost: CostModel | None = None) -> list[tuple[np.ndarray, ModelBatch]]:
    """Pre-tokenized pairs cut as the batcher would: (their positions, the batch) per batch. For
    measuring a backend alone, or scoring a fixed set of pairs, outside the pipeline."""
    batches = []
    for rows in plan_batches(enc.lengths, max_batch_size, max_batch_tokens, bucketing, cost):
        part = enc.take(rows)
        batches.append((rows, ModelBatch(part.flat_ids, part.flat_types, part.lengths,
                                         length_multiple=cost.length_multiple if cost else 1)))
    return batches


def padded_batches(enc: Encoded, max_batch_size: int, max_batch_tokens: int = 10**9, bucketing: bool = True,
                   cost: CostModel | None = None) -> list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """`model_batches`, each padded: (positions, (ids, mask, types))."""
    return [(rows, batch.padded) for rows, batch in model_batches(enc, max_batch_size, max_batch_tokens, bucketing, cost)]


def collate(ids: list[np.ndarray], type_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad token ids to the longest row: (input_ids, attention_mask, token_type_ids)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return pad(np.concatenate(ids), np.concatenate(type_ids), lengths)
