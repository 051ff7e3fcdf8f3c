"""The rerank API dialects, one module each; `DIALECTS` maps `--api` names to them."""

from xbench.serve.apis.base import Dialect, RerankQuery
from xbench.serve.apis.cohere_v1 import CohereV1
from xbench.serve.apis.cohere_v2 import CohereV2
from xbench.serve.apis.tei import Tei

DIALECTS: dict[str, Dialect] = {d.name: d for d in (CohereV1(), CohereV2(), Tei())}

__all__ = ["DIALECTS", "Dialect", "RerankQuery"]
