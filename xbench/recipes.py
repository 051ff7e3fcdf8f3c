"""Scoring recipes: how a reranker turns a (query, document) pair into one relevance score.

A cross-encoder is a model plus a recipe. Two kinds exist:

- `classifier`: a `*ForSequenceClassification` checkpoint; the pair goes through the tokenizer's
  own pair template and the score is its head's logit (one label), or l1 - l0 (two labels).
- label logits: a causal LM read at the last token of a prompt template; the score is
  logit(yes) - logit(no) over the template's label tokens (its sigmoid is P(yes) over {no, yes}),
  or logit(yes) alone when the recipe names one label. Only the last position and the label rows
  of the LM head are ever needed.

A template is cut where the query side ends, so the query side (prefix, instruction, query) is
tokenized once per request and each document once: `head` pieces, the `query` text, `middle`
pieces, the `document` text, `tail` pieces, each tokenized on its own (without the tokenizer's
special tokens), then joined. Where a recipe's reference tokenizes query and document as one
string, the cut sits after a ':' followed by the document's leading space, where a byte-level BPE
pre-tokenizer always splits, so the tokens are the reference's own. Truncation cuts the document
(the query side only past three quarters of the budget), never the tail that holds the label
position.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from xbench.errors import ConfigError

QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # "classifier" | "label-logits"
    head: tuple[str, ...] = ()
    query: str = "{query}"
    middle: tuple[str, ...] = ()
    document: str = "{document}"
    tail: tuple[str, ...] = ()
    # (negative, positive): score = logit(positive) - logit(negative); (positive,): logit(positive).
    labels: tuple[str, ...] = ()
    bos: bool = False  # the tokenizer's BOS token before everything (Gemma)
    instruction: str = ""
    source: str = ""  # where the recipe comes from

    @property
    def is_classifier(self) -> bool:
        return self.kind == "classifier"

    def query_text(self, query: str) -> str:
        return self.query.replace("{instruction}", self.instruction).replace("{query}", query)

    def document_text(self, document: str) -> str:
        return self.document.replace("{document}", document)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"recipe": self.name}
        if not self.is_classifier:
            out.update(labels=list(self.labels), source=self.source)
            if "{instruction}" in self.query:
                out["instruction"] = self.instruction
        return out


CLASSIFIER = Recipe("classifier", "classifier", source="the checkpoint's sequence-classification head")

QWEN3 = Recipe(
    "qwen3-reranker", "label-logits",
    head=("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
          "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n",),
    query="<Instruct>: {instruction}\n<Query>: {query}\n<Document>:",
    document=" {document}",
    tail=("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",),
    labels=("no", "yes"),
    instruction=QWEN3_INSTRUCTION,
    source="Qwen/Qwen3-Reranker model card (format_instruction, prefix/suffix, yes/no at the last position); "
           "vLLM's classifier_from_token ['no', 'yes']",
)

MXBAI_V2 = Recipe(
    "mxbai-rerank-v2", "label-logits",
    head=("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
          "<|im_start|>user\n",),
    query="query: {query}",
    middle=("\n",),
    document="document: {document}",
    tail=("\n", "You are a search relevance expert who evaluates how well documents match search queries. For "
          "each query-document pair, carefully analyze the semantic relationship between them, then provide your "
          "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:",
          "<|im_end|>\n<|im_start|>assistant\n"),
    labels=("0", "1"),
    source="mixedbread-ai/mxbai-rerank, mxbai_rerank_v2.py (prompt pieces tokenized apart, logit('1') - logit('0'))",
)

BGE_GEMMA = Recipe(
    "bge-reranker-gemma", "label-logits",
    query="A: {query}",
    middle=("\n",),
    document="B: {document}",
    tail=("\n", "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
          "providing a prediction of either 'Yes' or 'No'."),
    labels=("Yes",),
    bos=True,
    source="FlagEmbedding, FlagLLMReranker for BAAI/bge-reranker-v2-gemma (BOS, 'A: ', 'B: ', the prompt; "
           "logit('Yes') at the last position)",
)

KNOWN = {r.name: r for r in (CLASSIFIER, QWEN3, MXBAI_V2, BGE_GEMMA)}
SCORING_CHOICES = ("auto", *KNOWN, "yes-no")

# Hub ids (lower case, any owner) of the families whose recipe is not in their config.
KNOWN_IDS = {"qwen3-reranker": QWEN3.name, "mxbai-rerank-base-v2": MXBAI_V2.name,
             "mxbai-rerank-large-v2": MXBAI_V2.name, "bge-reranker-v2-gemma": BGE_GEMMA.name}


def custom_recipe(template: str, labels: list[str], instruction: str, key: str) -> Recipe:
    """The generic yes-no recipe: a template holding {query} before {document}. The query side runs
    to the document, whose leading spaces join the document (a byte-level BPE would merge them with
    its first word); the text after the document is tokenized apart, as Qwen's and mxbai's own
    suffixes are."""
    for part in ("{query}", "{document}"):
        if part not in template:
            raise ConfigError(f"{key}.template must hold {part} (and may hold {{instruction}}); got {template!r}")
    if template.index("{query}") > template.index("{document}"):
        raise ConfigError(f"{key}.template: {{query}} must come before {{document}}")
    if not 1 <= len(labels) <= 2:
        raise ConfigError(f"{key}.label_tokens: give [negative, positive] or [positive]; got {labels}")
    before, after = template.split("{document}", 1)
    query = before.rstrip(" ")
    return Recipe("yes-no", "label-logits", query=query, document=before[len(query):] + "{document}",
                  tail=(after,) if after else (),
                  labels=tuple(labels), instruction=instruction, source="xbench yes-no (template and label_tokens)")


def check_scoring(inst: Any, key: str) -> None:
    """Compose-time checks of a model instance's scoring options."""
    scoring = str(getattr(inst, "scoring", "auto"))
    if scoring not in SCORING_CHOICES:
        raise ConfigError(f"{key}.scoring={scoring!r} is not a recipe; choose one of {', '.join(SCORING_CHOICES)}")
    if scoring == "yes-no":
        if not inst.template or not inst.label_tokens:
            raise ConfigError(f"{key}.scoring=yes-no needs {key}.template (with {{query}} and {{document}}) and "
                              f"{key}.label_tokens ([negative, positive] or [positive])")
        custom_recipe(str(inst.template), list(inst.label_tokens), "", key)
    elif inst.template or inst.label_tokens:
        raise ConfigError(f"{key}.template and .label_tokens belong to scoring=yes-no (scoring is {scoring!r})")


def recipe_named(name: str, inst: Any, key: str) -> Recipe:
    """The recipe `name` with the instance's own options (instruction, template, labels)."""
    if name == "yes-no":
        return custom_recipe(str(inst.template), list(inst.label_tokens), str(inst.instruction or ""), key)
    recipe = KNOWN[name]
    if getattr(inst, "instruction", None) and "{instruction}" in recipe.query:
        recipe = replace(recipe, instruction=str(inst.instruction))
    return recipe


def recipe_for_id(model_id: str) -> str | None:
    """A known family's recipe from a hub id or folder name."""
    tail = model_id.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((recipe for prefix, recipe in KNOWN_IDS.items() if tail.startswith(prefix)), None)


@dataclass
class Checkpoint:
    """What a model folder says about its scoring head, read from its files (no weights loaded)."""

    architectures: list[str]
    model_type: str
    tensor_names: set[str] = field(default_factory=set)

    @property
    def causal_lm(self) -> bool:
        return any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in self.architectures)

    @property
    def classifier(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in self.architectures)

    def has_head(self) -> bool:
        """Weights of a sequence-classification head are in the checkpoint (not to be drawn at load):
        `classifier.*` (BERT, RoBERTa, ELECTRA, ModernBERT, DeBERTa), `score.*` (decoders)."""
        return any(name.startswith(("classifier.", "score.")) or ".classifier." in name for name in self.tensor_names)
