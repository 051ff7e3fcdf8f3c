"""TokenizerPool: N workers turning (query, document) pairs into truncated token ids.

Workers are threads by default: the Rust tokenizer releases the GIL inside encode_batch, so
threads run in parallel without copying ids between processes. `mode: process` gives each
worker its own process (one tokenizer each) for comparison. `parallelism` sets
TOKENIZERS_PARALLELISM, which the Rust library reads on every encode_batch call: on, one call
fans out over its rayon threads; off, it runs on the calling thread alone.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

Pair = tuple[str, str]


@dataclass
class Encoded:
    """Token ids of a list of pairs, unpadded, one int32 array per pair."""

    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    tokenize_s: float = 0.0  # time spent inside the tokenizer
    truncated: int = 0  # pairs cut to max_length

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    @property
    def total_tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def load_tokenizer(model_dir: Path, max_length: int) -> str:
    """The model's fast tokenizer, set to truncate pairs to max_length, as a JSON string
    (a string travels to worker processes; each worker builds its own Tokenizer from it)."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:  # older checkpoints ship only vocab.txt: let transformers convert it once
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True).backend_tokenizer
    tok.no_padding()
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    return tok.to_str()


def set_parallelism(on: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if on else "false"


def build_tokenizer(tokenizer_json: str, direction: str = "right") -> Tokenizer:
    """A Tokenizer from load_tokenizer's JSON; direction="left" cuts over-long pairs from the
    start instead (TEI's truncation_direction), keeping the end of the longer text."""
    tok = Tokenizer.from_str(tokenizer_json)
    if direction != "right":
        t = tok.truncation
        tok.enable_truncation(t["max_length"], stride=t["stride"], strategy=t["strategy"], direction=direction)
    return tok


def _full_length(enc: Any) -> int:
    """Tokens of a text before truncation cut it (stride 0: the overflow holds the rest)."""
    return len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)


def _encode(tok: Tokenizer, pairs: list[Pair]) -> Encoded:
    """Pairs as the tokenizer would encode them, each distinct query tokenized once.

    Encoding (query, document) pairs directly re-tokenizes the query for every document: a 25 KB
    query with 1,000 documents is 1,000 full tokenizations. Instead each query and document is
    tokenized alone (cut at max_length: nothing past it can survive the pair's truncation) and
    the tokenizer's own post-processing truncates and joins them. The one case where the pre-cut
    would change the result is two texts both over the limit: "longest first" then gives the
    odd leftover token to the longer one, so the document is cut one token shorter than the
    query when the query is truly longer (tests compare every case with plain pair encoding)."""
    t0 = time.perf_counter()
    queries = list(dict.fromkeys(q for q, _ in pairs))
    query_encodings = dict(zip(queries, tok.encode_batch(queries, add_special_tokens=False)))
    query_lengths = {q: _full_length(e) for q, e in query_encodings.items()}
    documents = tok.encode_batch([d for _, d in pairs], add_special_tokens=False)
    limit = tok.truncation["max_length"]
    budget = limit - tok.post_processor.num_special_tokens_to_add(True)
    ids, type_ids, truncated = [], [], 0
    for (q, _), doc in zip(pairs, documents):
        query = query_encodings[q]
        nq, nd = query_lengths[q], _full_length(doc)
        if nq + nd > budget:
            truncated += 1
            if min(nq, nd) > budget and nq > nd and len(doc.ids) >= len(query.ids):
                doc.truncate(len(query.ids) - 1, direction=tok.truncation["direction"])
        pair = tok.post_process(query, doc, add_special_tokens=True)
        ids.append(np.asarray(pair.ids, dtype=np.int32))
        type_ids.append(np.asarray(pair.type_ids, dtype=np.int32))
    return Encoded(ids, type_ids, time.perf_counter() - t0, truncated)


# Per-process state of `mode: process` workers: the JSON, and a tokenizer per direction.
_process_json = ""
_process_tokenizers: dict[str, Tokenizer] = {}


def _process_init(tokenizer_json: str, parallelism: bool) -> None:
    global _process_json
    set_parallelism(parallelism)
    _process_json = tokenizer_json
    _process_tokenizers["right"] = build_tokenizer(tokenizer_json)


def _process_encode(pairs: list[Pair], direction: str) -> Encoded:
    if direction not in _process_tokenizers:
        _process_tokenizers[direction] = build_tokenizer(_process_json, direction)
    return _encode(_process_tokenizers[direction], pairs)


class TokenizerPool:
    def __init__(self, tokenizer_json: str, workers: int = 1, parallelism: bool = True, mode: str = "thread"):
        self.workers = workers
        self.parallelism = parallelism
        self.mode = mode
        self.tokenizer_json = tokenizer_json
        self.max_length = int(Tokenizer.from_str(tokenizer_json).truncation["max_length"])
        set_parallelism(parallelism)
        self._local = threading.local()
        self._executor: Executor
        if mode == "process":
            import multiprocessing as mp

            # spawn: forking a process that already ran rayon threads can deadlock.
            self._executor = ProcessPoolExecutor(
                workers, mp_context=mp.get_context("spawn"), initializer=_process_init,
                initargs=(tokenizer_json, parallelism),
            )
        else:
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="xbench-tokenizer")

    @classmethod
    def for_model(cls, model_dir: Path, max_length: int, cfg: Any) -> "TokenizerPool":
        """The pool a `tokenizer_pool` config asks for, over the model's tokenizer."""
        return cls(load_tokenizer(model_dir, max_length), workers=cfg.workers, parallelism=cfg.parallelism, mode=cfg.mode)

    def _thread_tokenizer(self, direction: str) -> Tokenizer:
        toks = getattr(self._local, "toks", None)
        if toks is None:
            toks = self._local.toks = {}
        if direction not in toks:
            toks[direction] = build_tokenizer(self.tokenizer_json, direction)
        return toks[direction]

    def encode(self, pairs: list[Pair], direction: str = "right") -> Encoded:
        """Tokenize on the calling thread (tests, pre-tokenizing a workload)."""
        return _encode(self._thread_tokenizer(direction), pairs)

    def submit(self, pairs: list[Pair], direction: str = "right") -> Future[Encoded]:
        """Tokenize on a worker; `direction` is the side over-long pairs are cut from."""
        if self.mode == "process":
            return self._executor.submit(_process_encode, pairs, direction)
        return self._executor.submit(self.encode, pairs, direction)

    def cut_texts(self, texts: list[str], max_tokens: int) -> list[str]:
        """Each text cut after its first `max_tokens` tokens (Cohere v2's max_tokens_per_doc)."""
        tok = getattr(self._local, "whole", None)
        if tok is None:
            tok = self._local.whole = Tokenizer.from_str(self.tokenizer_json)
            tok.no_truncation()
        return [text[: enc.offsets[max_tokens - 1][1]] if len(enc.ids) > max_tokens else text
                for enc, text in zip(tok.encode_batch(texts, add_special_tokens=False), texts)]

    def warmup(self) -> None:
        """Start every worker (processes take a second) before anything is timed."""
        futures = [self.submit([("warm up", "the tokenizer pool")]) for _ in range(self.workers * 2)]
        for f in futures:
            f.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
