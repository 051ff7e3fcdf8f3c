"""TokenizerPool: N workers turning (query, document) pairs into truncated token ids.

Workers are threads beside a CPU model and processes beside a CUDA one (`mode: auto`). Threads
share ids without copying them, and the Rust tokenizer releases the GIL inside encode_batch;
but the word-piece cache of `TextTokenizer` is Python and holds it, and a CUDA model worker needs
the GIL to launch kernels, so there each worker gets a process (one tokenizer each; see
core/processes.py) that hands back flat arrays. `parallelism` sets TOKENIZERS_PARALLELISM, which
the Rust library reads on every encode_batch call: on, one call fans out over its rayon threads;
off, it runs on the calling thread alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer
from tokenizers.normalizers import BertNormalizer

from xbench.core.processes import WorkerProcesses
from xbench.env import usable_cores
from xbench.errors import ConfigError
from xbench.layout import run_positions
from xbench.recipes import Recipe

Pair = tuple[str, str]


@dataclass
class Encoded:
    """Token ids of a list of pairs, unpadded and back to back: pair i's ids are
    flat_ids[starts[i]:starts[i] + lengths[i]], its token types the same run of flat_types.

    Flat arrays, not an array per pair: from a tokenizer process they come as three buffers, and
    the batcher copies them and gathers a batch's rows from them in a few numpy steps. Per-pair
    Python work runs under the GIL that a GPU's model workers need, once per pair per stage."""

    flat_ids: np.ndarray  # int32 [total tokens]
    flat_types: np.ndarray  # int32 [total tokens]
    lengths: np.ndarray  # int64 [pairs]
    tokenize_s: float = 0.0  # time spent inside the tokenizer
    truncated: int = 0  # pairs cut to max_length

    @classmethod
    def from_pairs(cls, ids: Sequence[np.ndarray], type_ids: Sequence[np.ndarray], tokenize_s: float = 0.0,
                   truncated: int = 0) -> "Encoded":
        """From one array of ids and one of token types per pair."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        if not len(ids):
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), lengths, tokenize_s, truncated)
        return cls(np.concatenate(ids).astype(np.int32, copy=False),
                   np.concatenate(type_ids).astype(np.int32, copy=False), lengths, tokenize_s, truncated)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return int(self.flat_ids.size)

    # Worked out once when asked for (an Encoded is never changed), and never pickled.
    @cached_property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths

    @cached_property
    def ids(self) -> list[np.ndarray]:
        """Each pair's ids as an array of its own (views into flat_ids)."""
        return split_at(self.flat_ids, self.starts + self.lengths)

    @cached_property
    def type_ids(self) -> list[np.ndarray]:
        return split_at(self.flat_types, self.starts + self.lengths)

    def take(self, rows: np.ndarray) -> "Encoded":
        """The pairs at positions `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        at = run_positions(self.starts[rows], self.lengths[rows])
        return Encoded(self.flat_ids[at], self.flat_types[at], self.lengths[rows], self.tokenize_s,
                       self.truncated)

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("flat_ids", "flat_types", "lengths", "tokenize_s", "truncated")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def split_at(flat: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """`flat` cut into runs ending at `ends` (np.split's result, at a third of its cost per piece)."""
    bounds = ends.tolist()
    return list(map(flat.__getitem__, map(slice, [0, *bounds[:-1]], bounds)))


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


# Text BERT's normalizer can only lowercase: printable ASCII, tabs and line breaks (which it turns
# into the spaces the pre-tokenizer splits on anyway). Not \v or \f: it deletes those.
NOT_PLAIN = re.compile(r"[^\t\n\r -~]")
# BERT's pre-tokenizer on such text: a run of letters and digits is a word, each punctuation
# character is one, whitespace goes.
ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9 \t\n\r]")
CACHED_WORDS = 100_000  # distinct words whose pieces a TextTokenizer keeps (cleared when full)


class TextTokenizer:
    """A Tokenizer that encodes texts alone (no special tokens), ids only, as fast as it can.

    BERT's normalizer takes about 40% of the tokenizer's time, because it tracks every
    character's alignment. On plain text (printable ASCII, tabs, line breaks) it can only
    lowercase: no control characters to clean, no accents to strip, no CJK to space out. So a
    plain text is lowercased here and encoded by a twin without the normalizer: the same ids,
    about 2x faster on English passages, 5x with the word-piece cache of `encode_ids`. A text
    holding an added token's literal in any case goes through the full tokenizer ("[SEP]" in a
    document is the separator to it, matched before normalizing), as does any other text and
    any other normalizer. Tests hold every path to the full tokenizer's ids."""

    def __init__(self, tokenizer_json: str, direction: str = "right"):
        self.full = build_tokenizer(tokenizer_json, direction)
        self.twin: Tokenizer | None = None
        self.lowercase = False
        if isinstance(self.full.normalizer, BertNormalizer):
            self.lowercase = bool(self.full.normalizer.lowercase)
            self.twin = build_tokenizer(tokenizer_json, direction)
            self.twin.normalizer = None
        self._pieces: dict[str, tuple[int, ...]] = {}  # word -> its word pieces (encode_ids)
        added = [t.content for t in self.full.get_added_tokens_decoder().values() if t.content]
        self._added = re.compile("|".join(map(re.escape, added)), re.IGNORECASE) if added else None

    def _plain(self, text: str) -> bool:
        """Whether the twin gives this text the full tokenizer's ids."""
        return NOT_PLAIN.search(text) is None and (self._added is None or self._added.search(text) is None)

    def encode(self, texts: list[str]) -> list[Any]:
        """Each text's Encoding, in order (encode_batch_fast: no character offsets)."""
        if self.twin is None:
            return self.full.encode_batch_fast(texts, add_special_tokens=False)
        plain, others = self._split(texts)
        ready = [t.lower() if self.lowercase else t for t, p in zip(texts, plain) if p]
        fast = iter(self.twin.encode_batch_fast(ready, add_special_tokens=False))
        return [next(fast) if p else next(others) for p in plain]

    def encode_ids(self, texts: list[str]) -> list[Sequence[int]]:
        """Each text's ids, in order, not yet cut to a pair's budget. A plain text is split the
        way BERT's pre-tokenizer splits it (`ASCII_WORDS`) and each word's pieces come from a
        cache that the twin fills once per new word: natural text repeats its words, so most of
        a passage costs a dictionary lookup per word instead of a pass through the tokenizer."""
        if self.twin is None:
            return [e.ids for e in self.full.encode_batch_fast(texts, add_special_tokens=False)]
        plain, others = self._split(texts)
        words = [ASCII_WORDS.findall(t.lower() if self.lowercase else t) if p else None for t, p in zip(texts, plain)]
        pieces = self._pieces
        new = list({w for ws in words if ws is not None for w in ws if w not in pieces})
        if new:
            if len(pieces) + len(new) > CACHED_WORDS:
                pieces.clear()
            encoded = self.twin.encode_batch_fast(new, add_special_tokens=False)
            pieces.update(zip(new, (tuple(e.ids) for e in encoded)))
        return [list(itertools.chain.from_iterable(map(pieces.__getitem__, ws))) if ws is not None else next(others).ids
                for ws in words]

    def _split(self, texts: list[str]) -> tuple[list[bool], Iterator[Any]]:
        """Which texts are plain, and the full tokenizer's Encodings of the others, in order."""
        plain = list(map(self._plain, texts))
        rest = [t for t, p in zip(texts, plain) if not p]
        return plain, iter(self.full.encode_batch_fast(rest, add_special_tokens=False) if rest else ())


def _full_length(enc: Any) -> int:
    """Tokens of a text before truncation cut it (stride 0: the overflow holds the rest)."""
    return len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)


@dataclass(frozen=True)
class PairLayout:
    """Where a tokenizer's post-processor puts its special tokens around a pair, learned once:
    head + query + middle + document + tail, each special part with its token types, and one
    token type for each text. BERT: [CLS] q [SEP] d [SEP]; RoBERTa: <s> q </s></s> d </s>."""

    head: tuple[np.ndarray, np.ndarray]  # (ids, type ids)
    middle: tuple[np.ndarray, np.ndarray]
    tail: tuple[np.ndarray, np.ndarray]
    query_type: int
    document_type: int

    @classmethod
    def learn(cls, tok: Tokenizer) -> "PairLayout | None":
        """The layout, if the post-processor has one that two probe pairs of other lengths confirm
        token for token; None otherwise (the pairs are then joined by the post-processor itself)."""
        probes = [("alpha beta gamma", "delta"), ("one", "two three four five six")]
        q, d = (tok.encode(t, add_special_tokens=False) for t in probes[0])
        joined = tok.post_process(q, d, add_special_tokens=True)
        ids, types, nq, nd = joined.ids, joined.type_ids, len(q.ids), len(d.ids)

        def part(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
            return np.asarray(ids[a:b], dtype=np.int32), np.asarray(types[a:b], dtype=np.int32)

        for h in range(len(ids) - nq - nd + 1):  # where the query starts, then the document
            if ids[h:h + nq] != q.ids:
                continue
            for m in range(len(ids) - h - nq - nd + 1):
                s = h + nq + m
                if ids[s:s + nd] != d.ids:
                    continue
                layout = cls(part(0, h), part(h + nq, s), part(s + nd, len(ids)),
                             types[h] if nq else 0, types[s] if nd else 0)
                if all(layout._agrees(tok, *probe) for probe in probes):
                    return layout
        return None

    def _agrees(self, tok: Tokenizer, query: str, document: str) -> bool:
        q, d = (tok.encode(t, add_special_tokens=False) for t in (query, document))
        want = tok.post_process(q, d, add_special_tokens=True)
        joined = self.join(np.asarray(q.ids, dtype=np.int32), [d.ids], 10**9, "right")
        return joined.flat_ids.tolist() == want.ids and joined.flat_types.tolist() == want.type_ids

    @property
    def specials(self) -> int:
        return len(self.head[0]) + len(self.middle[0]) + len(self.tail[0])

    def join(self, query: np.ndarray, documents: list[list[int]], budget: int, direction: str) -> Encoded:
        """One query with each document, the documents cut to fit `budget` text tokens (the query
        is short enough to stay whole: longest-first cuts only the document), in numpy; `truncated`
        counts the documents cut. The only Python work per pair is reading its document's ids."""
        n = len(documents)
        doc_len = np.fromiter(map(len, documents), dtype=np.int64, count=n)
        flat_docs = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int32, count=int(doc_len.sum()))
        keep = np.minimum(doc_len, budget - len(query))
        lead_ids = np.concatenate([self.head[0], query, self.middle[0]])
        lead_types = np.concatenate([self.head[1], np.full(len(query), self.query_type, np.int32), self.middle[1]])
        tail_ids, tail_types = self.tail
        lengths = len(lead_ids) + keep + len(tail_ids)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        ids = np.empty(int(ends[-1]) if n else 0, dtype=np.int32)
        types = np.empty_like(ids)
        lead_at = starts[:, None] + np.arange(len(lead_ids))
        ids[lead_at], types[lead_at] = lead_ids, lead_types
        # Document tokens: pair r's kept run, from its start (or its end when cut from the left).
        first_kept = np.cumsum(doc_len) - doc_len + (doc_len - keep if direction == "left" else 0)
        to = run_positions(starts + len(lead_ids), keep)
        ids[to], types[to] = flat_docs[run_positions(first_kept, keep)], self.document_type
        tail_at = (starts + len(lead_ids) + keep)[:, None] + np.arange(len(tail_ids))
        ids[tail_at], types[tail_at] = tail_ids, tail_types
        return Encoded(ids, types, lengths, truncated=int((keep < doc_len).sum()))


@dataclass(frozen=True)
class TemplateLayout:
    """A label-logits recipe's prompt as token ids (recipes.py): the fixed pieces tokenized once
    here, the query side once per request and each document once, joined in numpy by a
    PairLayout whose head, middle and tail are the prompt's fixed pieces. The label tokens are
    checked here, against the model's own tokenizer."""

    recipe: Recipe
    layout: PairLayout
    label_ids: tuple[int, ...]
    query_budget: int  # query-side tokens kept: three quarters of what the prompt leaves

    @classmethod
    def build(cls, recipe: Recipe, tok: Tokenizer, bos_token: str | None) -> "TemplateLayout":
        def ids(texts: tuple[str, ...]) -> np.ndarray:
            out = [i for t in texts for i in tok.encode(t, add_special_tokens=False).ids]
            return np.asarray(out, dtype=np.int32)

        labels = {label: tok.encode(label, add_special_tokens=False).ids for label in recipe.labels}
        if bad := {label: got for label, got in labels.items() if len(got) != 1}:
            named = ", ".join(f"{label!r} is {len(got)} tokens" for label, got in bad.items())
            raise ConfigError(f"recipe {recipe.name}: its label tokens must each be one token of the model's "
                              f"tokenizer; {named}")
        head = ids(recipe.head)
        if recipe.bos:
            bos = tok.token_to_id(bos_token) if bos_token else None
            if bos is None:
                raise ConfigError(f"recipe {recipe.name} starts with the tokenizer's BOS token, and this tokenizer "
                                  f"names none (bos_token in tokenizer_config.json)")
            head = np.concatenate([np.asarray([bos], dtype=np.int32), head])
        middle, tail = ids(recipe.middle), ids(recipe.tail)
        layout = PairLayout((head, np.zeros_like(head)), (middle, np.zeros_like(middle)), (tail, np.zeros_like(tail)),
                            0, 0)  # a decoder has one token type
        budget = int(tok.truncation["max_length"]) - layout.specials if tok.truncation else 0
        if budget < 8:
            raise ConfigError(f"recipe {recipe.name}: its prompt takes {layout.specials} tokens, leaving {budget} "
                              f"of max_length for the query and document; raise max_length")
        return cls(recipe, layout, tuple(got[0] for got in labels.values()), budget * 3 // 4)

    def encode(self, tokenizer: "TextTokenizer", pairs: list[Pair]) -> Encoded:
        """Pairs in the prompt, each distinct query side tokenized once, documents cut to fit."""
        t0 = time.perf_counter()
        if not pairs:
            return Encoded.from_pairs([], [])
        limit, direction = tokenizer.full.truncation["max_length"], tokenizer.full.truncation["direction"]
        budget = limit - self.layout.specials
        queries = list(dict.fromkeys(q for q, _ in pairs))
        query_ids = {q: np.asarray(e.ids[:self.query_budget], dtype=np.int32) for q, e in
                     zip(queries, tokenizer.full.encode_batch_fast([self.recipe.query_text(q) for q in queries],
                                                                   add_special_tokens=False))}
        documents = tokenizer.encode_ids([self.recipe.document_text(d) for _, d in pairs])
        by_query: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            by_query.setdefault(q, []).append(i)
        groups = [self.layout.join(query_ids[q], [documents[i] for i in rows], budget, direction)
                  for q, rows in by_query.items()]
        return in_pair_order(groups, by_query, t0)


def in_pair_order(groups: list[Encoded], by_query: dict[str, list[int]], t0: float) -> Encoded:
    """The pairs of each query's group (`by_query`: the pair indices of each) back in the pairs'
    own order, timed from `t0`."""
    if len(groups) == 1:  # one query: its documents are the pairs, in order
        return dataclasses.replace(groups[0], tokenize_s=time.perf_counter() - t0)
    together = Encoded(np.concatenate([g.flat_ids for g in groups]), np.concatenate([g.flat_types for g in groups]),
                       np.concatenate([g.lengths for g in groups]), truncated=sum(g.truncated for g in groups))
    ordered = together.take(np.argsort(np.concatenate(list(by_query.values())), kind="stable"))
    return dataclasses.replace(ordered, tokenize_s=time.perf_counter() - t0)


def bos_token(model_dir: Path) -> str | None:
    """The BOS token a tokenizer_config.json names, if any."""
    path = Path(model_dir) / "tokenizer_config.json"
    token = json.loads(path.read_text()).get("bos_token") if path.is_file() else None
    return token.get("content") if isinstance(token, dict) else token


def _encode(tokenizer: TextTokenizer, pairs: list[Pair], layout: PairLayout | TemplateLayout | None = None) -> Encoded:
    """Pairs as the tokenizer would encode them, each distinct query tokenized once.

    Encoding (query, document) pairs directly re-tokenizes the query for every document: a 25 KB
    query with 1,000 documents is 1,000 full tokenizations. Instead each query and document is
    tokenized alone (`TextTokenizer`), then joined. With a `layout`, and every query within half
    the budget, the documents' ids are joined to their query in numpy (`PairLayout.join`, which
    also cuts them to the budget): per-pair Python work is what caps tokenizer workers on a
    many-core GPU host. Otherwise the tokenizer's own post-processing truncates and joins each
    pair, from texts the tokenizer already cut at max_length. The one case where that pre-cut
    would change the result is two texts both over the limit: "longest first" then gives the
    odd leftover token to the longer one, so the document is cut one token shorter than the
    query when the query is truly longer (tests compare every case with plain pair encoding).
    A TemplateLayout (an LLM reranker's prompt) encodes the pairs its own way."""
    if isinstance(layout, TemplateLayout):
        return layout.encode(tokenizer, pairs)
    t0 = time.perf_counter()
    if not pairs:
        return Encoded.from_pairs([], [])
    tok = tokenizer.full  # truncation settings and the pair post-processor
    queries = list(dict.fromkeys(q for q, _ in pairs))
    query_encodings = dict(zip(queries, tokenizer.encode(queries)))
    limit, direction = tok.truncation["max_length"], tok.truncation["direction"]
    budget = limit - tok.post_processor.num_special_tokens_to_add(True)
    # Joined in numpy when every query fits in half the budget: then documents need ids alone.
    joined = layout is not None and all(2 * _full_length(e) <= budget for e in query_encodings.values())
    texts = [d for _, d in pairs]
    documents = tokenizer.encode_ids(texts) if joined else tokenizer.encode(texts)
    by_query: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(pairs):
        by_query.setdefault(q, []).append(i)
    if joined:
        groups = [layout.join(np.asarray(query_encodings[q].ids, dtype=np.int32), [documents[i] for i in rows],
                              budget, direction) for q, rows in by_query.items()]
        return in_pair_order(groups, by_query, t0)
    ids: list[np.ndarray] = [None] * len(pairs)  # type: ignore[list-item]
    type_ids: list[np.ndarray] = [None] * len(pairs)  # type: ignore[list-item]
    truncated = 0
    for q, rows in by_query.items():
        query = query_encodings[q]
        nq = _full_length(query)
        for i in rows:
            doc = documents[i]
            nd = _full_length(doc)
            if nq + nd > budget:
                truncated += 1
                if min(nq, nd) > budget and nq > nd and len(doc.ids) >= len(query.ids):
                    doc.truncate(len(query.ids) - 1, direction=direction)
            pair = tok.post_process(query, doc, add_special_tokens=True)
            ids[i] = np.asarray(pair.ids, dtype=np.int32)
            type_ids[i] = np.asarray(pair.type_ids, dtype=np.int32)
    return Encoded.from_pairs(ids, type_ids, time.perf_counter() - t0, truncated)


# Per-process state of `mode: process` workers: the JSON, the layout, a tokenizer per direction.
_process_json = ""
_process_layout: PairLayout | TemplateLayout | None = None
_process_tokenizers: dict[str, TextTokenizer] = {}


def _process_init(tokenizer_json: str, parallelism: bool, layout: PairLayout | TemplateLayout | None) -> None:
    global _process_json, _process_layout
    set_parallelism(parallelism)
    _process_json, _process_layout = tokenizer_json, layout
    _process_tokenizers["right"] = TextTokenizer(tokenizer_json)


def _process_encode(pairs: list[Pair], direction: str) -> Encoded:
    if direction not in _process_tokenizers:
        _process_tokenizers[direction] = TextTokenizer(_process_json, direction)
    return _encode(_process_tokenizers[direction], pairs, _process_layout)


def default_workers(device: str) -> int:
    """Tokenizer workers when the config leaves them open: beside a CUDA model the GPU scores
    pairs faster than several cores tokenize them, so half the cores, up to 8; beside a CPU
    model one, which leaves the cores to the model."""
    return max(1, min(8, usable_cores() // 2)) if str(device).startswith("cuda") else 1


class TokenizerPool:
    def __init__(self, tokenizer_json: str, workers: int = 1, parallelism: bool = True, mode: str = "thread",
                 template: TemplateLayout | None = None):
        self.workers = workers
        self.parallelism = parallelism
        self.mode = mode
        self.tokenizer_json = tokenizer_json
        set_parallelism(parallelism)  # before this process's first encode
        probe = build_tokenizer(tokenizer_json)
        self.max_length = int(probe.truncation["max_length"])
        # Learned once; worker processes receive it. A prompt template takes its place.
        self.layout: PairLayout | TemplateLayout | None = template or PairLayout.learn(probe)
        self._local = threading.local()
        self._executor: Executor
        if mode == "process":
            self._executor = WorkerProcesses(workers, _process_init, (tokenizer_json, parallelism, self.layout),
                                             name="xbench-tokenizer")
        else:
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="xbench-tokenizer")

    @classmethod
    def for_model(cls, model_dir: Path, max_length: int, cfg: Any, device: str = "cpu",
                  recipe: Recipe | None = None) -> "TokenizerPool":
        """The pool a `tokenizer_pool` config asks for, over the model's tokenizer, for a model on
        `device` (mode auto: processes beside a CUDA model, whose worker needs the GIL to launch
        kernels; threads beside a CPU model, which has the cores to itself), in the prompt of a
        label-logits `recipe`."""
        mode = str(cfg.mode)
        if mode == "auto":
            mode = "process" if str(device).startswith("cuda") else "thread"
        tokenizer_json = load_tokenizer(model_dir, max_length)
        template = None
        if recipe is not None and not recipe.is_classifier:
            template = TemplateLayout.build(recipe, build_tokenizer(tokenizer_json), bos_token(model_dir))
        return cls(tokenizer_json, workers=cfg.workers or default_workers(device), parallelism=cfg.parallelism,
                   mode=mode, template=template)

    @property
    def template(self) -> TemplateLayout | None:
        return self.layout if isinstance(self.layout, TemplateLayout) else None

    def _thread_tokenizer(self, direction: str) -> TextTokenizer:
        toks = getattr(self._local, "toks", None)
        if toks is None:
            toks = self._local.toks = {}
        if direction not in toks:
            toks[direction] = TextTokenizer(self.tokenizer_json, direction)
        return toks[direction]

    def encode(self, pairs: list[Pair], direction: str = "right") -> Encoded:
        """Tokenize on the calling thread (tests, pre-tokenizing a workload)."""
        return _encode(self._thread_tokenizer(direction), pairs, self.layout)

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

    def fault(self) -> str | None:
        """What keeps the pool from tokenizing (a worker process that keeps dying), or None."""
        broken = getattr(self._executor, "broken", None)
        return f"tokenizer pool: {broken}" if broken else None

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
