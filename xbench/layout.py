"""The two layouts of a batch's tokens, and the numpy steps between them.

Flat: the pairs' ids back to back, their token types the same way, and each pair's length. The
tokenizer pool hands pairs back like this, the batcher stores and gathers them like this, and a
packed backend (PyTorch's, on the CPU and on CUDA) takes them like this: its dense layers run
on the real tokens, so a padded layout would only be built to be taken apart again.

Padded: [rows, longest] ids, attention mask and token types, right-padded, as every other backend
takes them. Every step here is a few numpy calls for the whole batch, never a Python step per
pair: beside a GPU they run under the GIL the model workers need.
"""

from __future__ import annotations

import numpy as np


def round_up(n, multiple: int):
    """n (a number or a numpy array of them) rounded up to a multiple of `multiple`: a padded
    batch's width (CostModel.length_multiple)."""
    return -(-n // multiple) * multiple


def run_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions starts[0] .. starts[0] + lengths[0] - 1, then the second run's, and so on: the
    flat positions of runs, one numpy step for all of them."""
    total = int(lengths.sum())
    firsts = np.cumsum(lengths) - lengths  # where each run begins in the result
    return np.repeat(starts - firsts, lengths) + np.arange(total)


def positions_in_pair(lengths: np.ndarray) -> np.ndarray:
    """Each flat token's position within its own pair: 0 .. length - 1, pair after pair."""
    return run_positions(np.zeros_like(lengths), lengths)


def pad(flat_ids: np.ndarray, flat_types: np.ndarray, lengths: np.ndarray, width: int | None = None
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat pairs right-padded to the longest, or to `width` where given: (input_ids,
    attention_mask, token_type_ids), int64, filled through the mask in one step."""
    real = np.arange(max(int(lengths.max()), width or 0)) < lengths[:, None]  # row-major: each row's tokens in order
    input_ids = np.zeros(real.shape, dtype=np.int64)
    types = np.zeros(real.shape, dtype=np.int64)
    input_ids[real] = flat_ids
    types[real] = flat_types
    return input_ids, real.astype(np.int64), types


def unpad(input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A right-padded batch flat again: (ids, token types, lengths)."""
    real = attention_mask.astype(bool)
    return input_ids[real], token_type_ids[real], real.sum(1)
