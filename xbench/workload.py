"""Workloads: deterministic synthetic pairs of a chosen length mix, or pairs read from JSONL.

A request is one query with `batch` documents. The synthetic generator draws queries of
4-10 words and passages from a fixed English word list with numpy's PCG64 stream, so the same
seed gives the same pairs on every machine. Passage lengths (`workload.lengths`):

- `msmarco`: N(56, 20) words clipped to [10, 200], about 66 word pieces per pair with the
  bert-base-uncased tokenizer: uniform enough to hide padding waste;
- `longtail`: log-normal words (median 75, a heavy right tail) clipped to [3, 600], as when one
  query's candidates range from a title to a 512-token chunk: about 120 word pieces per pair on
  average, median about 85, the longest cut at the model's limit;
- `fixed`: every passage `workload.fixed_words` words long.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xbench.config import LengthMix
from xbench.errors import DataError

_WORDS = """
the of and to in is for that on with as was by at from are this be or an it which have his
not has but were had they their its one all can more also been new other first may would
who when some time there what use into over most year than only about these people after
between two during many three used where such through world made state known water found
city called part under system high number while both then life each including school
however since well before group because family well name like best house small same area
large later back because public work day century best made human energy health body food
river history power water blood heart brain cancer cells disease pain treatment symptoms
doctor hospital medical drug virus infection skin bone muscle weight diet sugar protein
vitamin calcium iron salt coffee tea milk bread rice fruit apple banana orange chicken
fish meat egg cheese cost price money bank loan tax credit card account pay salary job
company business market stock service product customer sale store online phone email
internet computer software data network page site web search google windows apple file
code program user account password car engine fuel oil gas road drive mile speed distance
weather temperature rain snow wind summer winter spring season month week hour minute
average range rate percent degree size inch foot meter pound ounce gallon long short
definition meaning example type kind form word term language english spanish french name
country america united states china india japan europe africa canada mexico texas florida
california york london paris island ocean mountain lake forest animal dog cat bird horse
plant tree flower seed leaf soil light sun moon star earth planet space science physics
chemistry biology theory law court government president war army police fire art music
song film movie book story game sport team player ball football baseball basketball
""".split()

QUERY_WORDS = (4, 10)
PASSAGE_MEAN, PASSAGE_STD, PASSAGE_MIN, PASSAGE_MAX = 56, 20, 10, 200
LONGTAIL_MEDIAN, LONGTAIL_SIGMA, LONGTAIL_MIN, LONGTAIL_MAX = 75, 0.85, 3, 600
LENGTH_MIXES = tuple(m.value for m in LengthMix)

Pair = tuple[str, str]


@dataclass(frozen=True)
class Request:
    """One rerank request: a query and its documents (as pairs, for the pipeline)."""

    query: str
    documents: tuple[str, ...]

    @property
    def pairs(self) -> list[Pair]:
        return [(self.query, d) for d in self.documents]


class RequestSizes:
    """Documents per request drawn from a distribution, the same for request i on every run:
    `A:B` uniform integers in [A, B], or `lognormal:mean=M,sd=S` (optionally `,min=,max=`), the
    shape of a search stack's candidate lists (10 to 200 per query)."""

    def __init__(self, spec: str, seed: int = 0):
        self.spec, self.seed = spec, seed
        kind, _, rest = spec.partition(":")
        try:
            if kind.strip().isdigit() and rest.strip().isdigit():
                self.kind, self.low, self.high = "uniform", int(kind), int(rest)
            elif kind == "lognormal":
                args = {k.strip(): float(v) for k, v in (a.split("=") for a in rest.split(",") if a.strip())}
                self.kind, self.mean, self.sd = "lognormal", args.pop("mean"), args.pop("sd")
                self.low, self.high = int(args.pop("min", 1)), int(args.pop("max", 1000))
                if args:
                    raise ValueError(f"unknown {', '.join(args)}")
                if self.mean <= 0 or self.sd <= 0:
                    raise ValueError("mean and sd must be positive")
            else:
                raise ValueError("not a distribution")
        except (ValueError, KeyError) as exc:
            raise DataError(f"documents per request {spec!r}: write A:B (uniform) or lognormal:mean=M,sd=S[,min=,max=] "
                            f"({exc})") from None
        if not 1 <= self.low <= self.high:
            raise DataError(f"documents per request {spec!r}: need 1 <= min <= max")

    def draw(self, i: int) -> int:
        rng = np.random.Generator(np.random.PCG64([self.seed, i]))
        if self.kind == "uniform":
            return int(rng.integers(self.low, self.high + 1))
        sigma2 = np.log(1 + (self.sd / self.mean) ** 2)  # the lognormal with this mean and sd
        value = rng.lognormal(np.log(self.mean) - sigma2 / 2, np.sqrt(sigma2))
        return int(np.clip(round(value), self.low, self.high))

    @property
    def typical(self) -> int:
        """A label for tables: the mean, as a whole number."""
        return round((self.low + self.high) / 2) if self.kind == "uniform" else round(self.mean)


class Workload:
    """A source of requests of `batch` documents (or of `sizes`' draws), cycling over a fixed set
    of pairs."""

    def __init__(self, queries: list[str], documents: list[list[str]], source: str, sha256: str | None = None):
        if not queries:
            raise DataError(f"workload {source} holds no requests")
        self.queries = queries
        self.documents = documents  # documents[i] belongs to queries[i]
        self.source = source
        self.sha256 = sha256  # of a data file's bytes (a synthetic workload is named by its seed)
        self._flat = [d for docs in documents for d in docs]
        self.sizes: RequestSizes | None = None  # documents per request from a distribution
        self.as_recorded = False  # request i is line i with its own documents (a trace)

    def request(self, i: int, batch: int) -> Request:
        """Request i: query i (cyclic) with `batch` documents (or `sizes`' draw for request i) taken
        cyclically from its own list, topped up from the whole pool so any batch size works with
        any file."""
        if self.as_recorded:
            q = i % len(self.queries)
            return Request(self.queries[q], tuple(self.documents[q]))
        if self.sizes is not None:
            batch = self.sizes.draw(i)
        q = i % len(self.queries)
        own = self.documents[q]
        if len(own) >= batch:
            docs = own[:batch]
        else:
            start = (i * batch + len(own)) % len(self._flat)
            docs = list(own)
            while len(docs) < batch:  # the pool from `start` on, wrapping around
                docs += self._flat[start:start + batch - len(docs)]
                start = 0
        return Request(self.queries[q], tuple(docs))

    @property
    def size(self) -> int:
        """Distinct pairs the workload holds."""
        return len(self._flat)

    def pairs(self, n: int) -> list[Pair]:
        """The first n (query, document) pairs of the workload, cycling if needed."""
        every = [(q, d) for q, docs in zip(self.queries, self.documents) for d in docs]
        return [every[k % len(every)] for k in range(n)]


def synthetic(num_pairs: int = 4096, seed: int = 0, docs_per_query: int = 1, lengths: str = "msmarco",
              fixed_words: int = PASSAGE_MEAN) -> Workload:
    """Seeded pairs: `num_pairs` passages of the `lengths` mix, one query per `docs_per_query`."""
    if lengths not in LENGTH_MIXES:
        raise DataError(f"workload.lengths={lengths!r} is not one of {', '.join(LENGTH_MIXES)}")
    rng = np.random.Generator(np.random.PCG64(seed))
    words = np.array(_WORDS)
    # Zipf-like word frequencies, as in natural text.
    weights = 1.0 / np.arange(1, len(words) + 1) ** 0.8
    weights /= weights.sum()

    def text(n: int) -> str:
        return " ".join(rng.choice(words, size=n, p=weights))

    queries, documents = [], []
    for _ in range(max(1, num_pairs // docs_per_query)):
        queries.append(text(int(rng.integers(QUERY_WORDS[0], QUERY_WORDS[1] + 1))))
        docs = []
        for _ in range(docs_per_query):
            docs.append(text(passage_words(rng, lengths, fixed_words)))
        documents.append(docs)
    mix = "" if lengths == "msmarco" else f", lengths={lengths}"
    return Workload(queries, documents, source=f"synthetic(seed={seed}, pairs={num_pairs}{mix})")


def passage_words(rng: np.random.Generator, lengths: str, fixed_words: int) -> int:
    if lengths == "longtail":
        n = rng.lognormal(np.log(LONGTAIL_MEDIAN), LONGTAIL_SIGMA)
        return int(np.clip(round(n), LONGTAIL_MIN, LONGTAIL_MAX))
    if lengths == "fixed":
        return fixed_words
    return int(np.clip(round(rng.normal(PASSAGE_MEAN, PASSAGE_STD)), PASSAGE_MIN, PASSAGE_MAX))


def load_jsonl(path: str | Path) -> Workload:
    """Read `{"query", "document"}` or `{"query", "documents": [...]}` lines.

    Consecutive pair lines with the same query are one request's documents.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--data {path}: no such file")
    queries: list[str] = []
    documents: list[list[str]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            query, docs, is_pair = parse_line(line, f"{path}:{lineno}")
            if is_pair and queries and queries[-1] == query:
                documents[-1].extend(docs)
            else:
                queries.append(query)
                documents.append(docs)
    return Workload(queries, documents, source=str(p), sha256=hashlib.sha256(p.read_bytes()).hexdigest())


def load_trace(path: str | Path, speedup: float = 1.0) -> tuple[Workload, list[float]]:
    """A recorded trace, `{"timestamp": seconds, "query", "documents": [...]}` a line, as a workload
    whose request i is line i as recorded, and each request's send time in seconds from the first
    (divided by `speedup`). Timestamps must not go backwards: a line that does is named."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--trace {path}: no such file")
    if speedup <= 0:
        raise DataError(f"--speedup {speedup}: must be positive")
    queries: list[str] = []
    documents: list[list[str]] = []
    stamps: list[float] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            query, docs, _ = parse_line(line, where)
            stamp = json.loads(line).get("timestamp")
            if not isinstance(stamp, (int, float)) or isinstance(stamp, bool):
                raise DataError(f'{where}: expected a number "timestamp" (seconds)')
            if stamps and stamp < stamps[-1]:
                raise DataError(f"{where}: timestamp {stamp} goes back before the previous line's {stamps[-1]}")
            queries.append(query)
            documents.append(docs)
            stamps.append(float(stamp))
    if not stamps:
        raise DataError(f"--trace {path} holds no requests")
    workload = Workload(queries, documents, source=f"trace {p}" + (f" at {speedup:g}x" if speedup != 1 else ""),
                        sha256=hashlib.sha256(p.read_bytes()).hexdigest())
    workload.as_recorded = True
    return workload, [(t - stamps[0]) / speedup for t in stamps]


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(value: Any) -> Any:
    """JSON data with every lone UTF-16 surrogate (from a "\\ud800" escape, or raw bytes that
    Python's JSON reader lets through) replaced by U+FFFD, as a parser that validates UTF-8 would
    decode it: such text then tokenizes like any other instead of failing in the tokenizer.
    Walks nested data iteratively, so depth costs no recursion."""
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    root = [value]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        container, key = stack.pop()
        item = container[key]
        if isinstance(item, str):
            container[key] = LONE_SURROGATE.sub("\ufffd", item)
        elif isinstance(item, list):
            stack.extend((item, i) for i in range(len(item)))
        elif isinstance(item, dict):
            stack.extend((item, k) for k in item)
    return root[0]


def document_text(document: Any) -> str | None:
    """A document as rerank APIs and workload files give it: a string or {"text": string}.
    None for anything else. The one normalizer of documents, for files and HTTP bodies alike."""
    if isinstance(document, dict):
        document = document.get("text")
    return document if isinstance(document, str) else None


def parse_line(line: str, where: str) -> tuple[str, list[str], bool]:
    try:
        obj = without_lone_surrogates(json.loads(line))
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    except (RecursionError, ValueError) as exc:  # nested too deeply; an integer past Python's digit limit
        raise DataError(f"{where}: not valid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("query"), str):
        raise DataError(f'{where}: expected an object with a string "query"')
    if "documents" in obj:
        docs = obj["documents"]
        if not isinstance(docs, list) or not docs:
            raise DataError(f'{where}: "documents" must be a non-empty list')
        out = []
        for k, d in enumerate(docs):
            text = document_text(d)
            if text is None:
                raise DataError(f'{where}: documents[{k}] must be a string or {{"text": string}}')
            out.append(text)
        return obj["query"], out, False
    if isinstance(obj.get("document"), str):
        return obj["query"], [obj["document"]], True
    raise DataError(f'{where}: expected "document" (string) or "documents" (list)')


def make_workload(data: str | Path | None, cfg: Any) -> Workload:
    """The workload a composed config asks for: the JSONL file `data`, else synthetic pairs."""
    w = cfg.workload
    workload = load_jsonl(data) if data else synthetic(num_pairs=cfg.experiment.num_pairs, seed=cfg.experiment.seed,
                                                       docs_per_query=w.docs_per_query, lengths=w.lengths,
                                                       fixed_words=w.fixed_words)
    if w.docs_per_request:
        workload.sizes = RequestSizes(str(w.docs_per_request), int(cfg.experiment.seed))
        workload.source += f", {w.docs_per_request} documents a request"
    return workload


def length_stats(lengths: list[int] | np.ndarray) -> dict:
    """How many, mean, p50, p90, p99 and max of a list of lengths."""
    a = np.asarray(lengths, dtype=np.int64)
    return {"pairs": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "max": int(a.max())}


def char_profile(workload: Workload, pairs: int = 4096) -> dict:
    """Pair lengths in characters (query + document), for targets whose tokenizer is not ours."""
    return length_stats([len(q) + len(d) for q, d in workload.pairs(min(pairs, workload.size))])


def length_profile(lengths: list[int] | np.ndarray, max_length: int) -> dict:
    """Pair lengths in tokens: mean, percentiles and a histogram (32-token bins up to max_length),
    so a result file says which length mix produced its figures."""
    edges = list(range(0, max_length + 32, 32))
    counts, _ = np.histogram(np.asarray(lengths, dtype=np.int64), bins=edges)
    return {**length_stats(lengths), "histogram": {"bin_tokens": 32, "counts": counts.tolist()}}
