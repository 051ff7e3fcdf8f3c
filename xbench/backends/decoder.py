"""LLM rerankers on PyTorch: a causal LM read at each pair's last real token, through the label rows
of its LM head only (recipes.py names the labels).

A reranker needs one position and two (or one) vocabulary rows of the LM head, so the head is cut
to those rows when the model loads: the full head is a [vocabulary x hidden] product per token
(151,936 x 1,024 on Qwen3-0.6B, about a quarter of the model's compute) whose every other output
would be thrown away. Pairs come right-padded: a causal model's real tokens never attend to the
padding after them, so the last real token's state is the unpadded one's.

Shared prefix: attention is causal, so a token's state depends only on the tokens before it. The
rows of a batch begin with the same tokens (the recipe's system prompt and instruction for every
request, and the query as well for the documents of one request): that common prefix runs once,
as one row, and every row's remaining tokens attend to its keys and values. The scores are the
unshared forward's (the same sums, in other shapes). Encoders attend both ways, so a document
changes every state of the query before it: this is for decoders only.

Two ways to run the same computation:
  PackedDecoder  (the default for Qwen3, Qwen2, Llama, Mistral and Gemma) the batch flat, its
                 real tokens back to back: the dense layers (projections, MLP, norms) run as one
                 GEMM over every token; RoPE takes each token's position in its own sequence;
                 attention is causal within each sequence, keys and values with fewer heads than
                 queries (GQA) as the model has them (flash attention's variable-length kernel on
                 CUDA, one SDPA call per sequence on the CPU). The shared prefixes form a tree
                 (`PrefixTree`): every request's template and query run once, and so does what all
                 requests of a batch begin with; each document's tokens attend to their
                 ancestors' keys. The last layer runs for each pair's last token only (keys and
                 values still from every token).
  LabelScorer    transformers' own decoder on right-padded rows (length-sorted by the planner),
                 the batch's common prefix run once through its KV cache: every other
                 architecture, and `packed=false`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xbench.backends.packed import rotate, varlen_attention
from xbench.layout import run_positions

MIN_SHARED = 8  # prefix tokens worth a pass of their own
# Decoder families PackedDecoder runs: pre-norm layers of (input norm, attention, post-attention
# norm, MLP), RoPE, optional per-head q/k norms (Qwen3). Gemma 2 and 3 (four norms a layer, logit
# soft-capping in attention, sliding windows) run padded.
PACKED_DECODERS = ("qwen3", "qwen2", "llama", "mistral", "gemma")
PREFIX_WIDTH = 2048  # leading tokens compared when looking for shared prefixes


def load_causal_lm(model_dir: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The reference causal LM: fp32, eval mode, safetensors only, SDPA attention."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                attn_implementation="sdpa", dtype=torch.float32).eval()


class LabelHead(torch.nn.Module):
    """The LM head cut to its label rows (with its bias and Gemma 2's soft cap, where present):
    final hidden states [rows, hidden] -> label logits [rows, labels]."""

    def __init__(self, lm: torch.nn.Module, label_ids: tuple[int, ...]):
        super().__init__()
        head = lm.get_output_embeddings()
        ids = torch.tensor(label_ids, dtype=torch.long)
        self.rows = torch.nn.Parameter(head.weight.detach()[ids].clone(), requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach()[ids].clone(), requires_grad=False)
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)  # a no-op but on Gemma 2

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        logits = state @ self.rows.T
        if self.bias is not None:
            logits = logits + self.bias
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class LabelScorer(torch.nn.Module):
    """logits [rows, labels] of the label tokens at each row's last real token, on right-padded rows."""

    def __init__(self, lm: torch.nn.Module, label_ids: tuple[int, ...], shared_prefix: bool = True):
        super().__init__()
        self.config = lm.config
        self.decoder = lm.get_decoder()
        self.shared_prefix = shared_prefix
        # transformers 5.24 renamed the decoder's `past_key_values` argument to `cache`.
        self.cache_arg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        self.label_head = LabelHead(lm, label_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = attention_mask.sum(dim=1) - 1
        shared = self.shared_length(input_ids, attention_mask, last) if self.shared_prefix else 0
        if shared < MIN_SHARED:
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            cache = self._new_cache()
            self.decoder(input_ids=input_ids[:1, :shared], use_cache=True, **{self.cache_arg: cache})
            cache.batch_repeat_interleave(len(input_ids))
            hidden = self.decoder(input_ids=input_ids[:, shared:], attention_mask=attention_mask, use_cache=True,
                                  **{self.cache_arg: cache}).last_hidden_state
            last = last - shared
        return self.label_head(hidden[torch.arange(len(last), device=hidden.device), last])

    @staticmethod
    def shared_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, last: torch.Tensor) -> int:
        """Leading tokens every row has in common, short of every row's last token (which must be
        computed in its own row, where the label logits are read)."""
        if len(input_ids) < 2:
            return 0
        same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(dim=0)
        differs = torch.nonzero(~same)
        common = int(differs[0]) if len(differs) else input_ids.shape[1]
        return min(common, int(last.min()))

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)
        except TypeError:  # transformers 4
            return DynamicCache()


@dataclass
class PrefixTree:
    """A flat batch as the sequences PackedDecoder runs: every shared prefix once, then each pair's
    own remaining tokens. Node n's tokens are `ids[cu_q[n]:cu_q[n + 1]]`, at positions `start[n]`
    onwards in its pairs; its keys are its ancestors' tokens (positions 0 .. start[n] - 1) and its
    own, `key_index[cu_k[n]:cu_k[n + 1]]` into the node tokens. Every pair's last token lies in
    its own leaf: the label logits are read there, in the pair's own row of the output."""

    ids: np.ndarray  # int64 [node tokens]
    positions: np.ndarray  # int64 [node tokens]: each token's position in its pair
    cu_q: np.ndarray  # int32 [nodes + 1]
    key_index: np.ndarray  # int64 [keys]
    cu_k: np.ndarray  # int32 [nodes + 1]
    last: np.ndarray  # int64 [pairs]: each pair's last token among the node tokens
    last_keys: np.ndarray  # int64: each pair's keys (its leaf's), pair after pair
    cu_last_k: np.ndarray  # int32 [pairs + 1]

    @classmethod
    def of(cls, flat_ids: np.ndarray, lengths: np.ndarray, min_shared: int = MIN_SHARED) -> "PrefixTree":
        """The tree of a flat batch: the pairs sorted by their tokens, a node for each run of
        neighbours with at least `min_shared` more tokens in common than their ancestors have
        (0: no sharing, every pair its own sequence)."""
        rows = len(lengths)
        lengths = lengths.astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        order, common = np.arange(rows), np.zeros(max(rows - 1, 0), dtype=np.int64)
        if min_shared and rows > 1:
            order, common = _sorted_common_prefixes(flat_ids, lengths, offsets)
        nodes: list[tuple[int, int, int, int]] = []  # (pair, start, end, parent)
        leaf = np.empty(rows, dtype=np.int64)
        stack = [(0, rows - 1, 0, -1)]  # sorted pairs lo..hi, sharing `kept` tokens computed by `parent`
        while stack:
            lo, hi, kept, parent = stack.pop()
            if lo == hi:
                pair = int(order[lo])
                leaf[pair] = len(nodes)
                nodes.append((pair, kept, int(lengths[pair]), parent))
                continue
            shared = int(common[lo:hi].min())
            if min_shared and shared - kept >= min_shared:
                nodes.append((int(order[lo]), kept, shared, parent))
                parent, kept = len(nodes) - 1, shared
            cuts = [lo, *(lo + np.flatnonzero(common[lo:hi] == shared) + 1).tolist(), hi + 1]
            stack.extend((a, b - 1, kept, parent) for a, b in zip(cuts, cuts[1:]))
        pair, start, end, parent = (np.array(c, dtype=np.int64) for c in zip(*nodes))
        span = end - start
        cu_q = np.concatenate([[0], np.cumsum(span)])
        ids = flat_ids[run_positions(offsets[pair] + start, span)].astype(np.int64)
        positions = run_positions(start, span)
        keys: list[np.ndarray] = []  # a parent's keys, then the node's own tokens (parents come first)
        for n in range(len(nodes)):
            own = np.arange(cu_q[n], cu_q[n + 1])
            keys.append(own if parent[n] < 0 else np.concatenate([keys[parent[n]], own]))
        leaf_keys = [keys[n] for n in leaf]
        return cls(ids, positions, cu_q.astype(np.int32), np.concatenate(keys), _offsets(keys), cu_q[leaf + 1] - 1,
                   np.concatenate(leaf_keys), _offsets(leaf_keys))

    @property
    def nodes(self) -> int:
        return len(self.cu_q) - 1


def _offsets(runs: list[np.ndarray]) -> np.ndarray:
    """int32 [runs + 1]: where each run begins when they are laid back to back, and the end."""
    return np.concatenate([[0], np.cumsum([len(r) for r in runs])]).astype(np.int32)


def _sorted_common_prefixes(flat_ids: np.ndarray, lengths: np.ndarray, offsets: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The pairs in lexicographic order of their first PREFIX_WIDTH tokens, and the tokens each
    has in common with the next, short of either's last token (which stays in its own row)."""
    width = int(min(lengths.max(), PREFIX_WIDTH))
    cols = np.arange(width)
    real = cols[None, :] < np.minimum(lengths, width)[:, None]
    leading = np.full((len(lengths), width), -1, dtype=np.int64)
    leading[real] = flat_ids[(offsets[:-1, None] + cols[None, :])[real]]
    order = np.lexsort(leading.T[::-1])
    ordered = leading[order]
    differ = ordered[1:] != ordered[:-1]
    common = np.where(differ.any(axis=1), differ.argmax(axis=1), width)
    by_length = lengths[order]
    return order, np.minimum(common, np.minimum(by_length[1:], by_length[:-1]) - 1)


class PackedDecoder(torch.nn.Module):
    """A causal LM's decoder on a PrefixTree of packed tokens, read through its label rows: the
    model's own modules (embeddings, norms, projections, MLPs, rotary tables), re-wired, so every
    fp32 score is the padded forward's."""

    def __init__(self, lm: torch.nn.Module, label_ids: tuple[int, ...], shared_prefix: bool = True):
        super().__init__()
        if not self.supports(lm.config):
            raise ValueError(f"packed execution does not implement decoder {lm.config.model_type!r}; "
                             f"it runs {', '.join(PACKED_DECODERS)}")
        self.config = lm.config
        decoder = lm.get_decoder()
        self.embed_tokens, self.layers, self.norm = decoder.embed_tokens, decoder.layers, decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.label_head = LabelHead(lm, label_ids)
        self.shared_prefix = shared_prefix
        # Gemma scales its embeddings by sqrt(hidden): inside the embedding module from
        # transformers 5 on, in the model's forward before.
        scaled = lm.config.model_type == "gemma" and not hasattr(self.embed_tokens, "embed_scale")
        self.embed_scale = lm.config.hidden_size ** 0.5 if scaled else None

    @staticmethod
    def supports(config: Any) -> bool:
        """Whether a model config (transformers' object or config.json's dict) is one this runs."""
        get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
        if get("model_type") not in PACKED_DECODERS:
            return False
        # A sliding window attends to fewer keys than the packed path gives every token.
        return not get("use_sliding_window", False) and all(t == "full_attention" for t in get("layer_types") or [])

    def tree(self, flat_ids: np.ndarray, lengths: np.ndarray) -> PrefixTree:
        return PrefixTree.of(flat_ids, lengths, MIN_SHARED if self.shared_prefix else 0)

    def forward(self, tree: PrefixTree) -> torch.Tensor:
        """Label logits [pairs, labels] of a PrefixTree's pairs, on the model's device."""
        device = self.label_head.rows.device
        ids, positions, cu_q, key_index, cu_k, last, last_keys, cu_last_k = (
            torch.from_numpy(a).to(device) for a in (tree.ids, tree.positions, tree.cu_q, tree.key_index, tree.cu_k,
                                                     tree.last, tree.last_keys, tree.cu_last_k))
        spans, key_spans = np.diff(tree.cu_q), np.diff(tree.cu_k)
        max_q, max_k = int(spans.max()), int(key_spans.max())
        x = self.embed_tokens(ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        cos, sin = (t[0, :, None, :] for t in self.rotary_emb(x[None], positions[None]))
        for layer in self.layers[:-1]:
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h, cos, sin)
            ctx = varlen_attention(q, k.index_select(0, key_index), v.index_select(0, key_index), cu_q, cu_k,
                                   max_q, max_k, causal=True, scale=layer.self_attn.scaling)
            x = x + layer.self_attn.o_proj(ctx.flatten(1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        # The last layer: keys and values from every token, everything else at each pair's last token.
        layer = self.layers[-1]
        h = layer.input_layernorm(x)
        q, k, v = self._qkv(layer.self_attn, h, cos, sin, queries=last)
        one_each = torch.arange(len(last) + 1, dtype=torch.int32, device=device)
        ctx = varlen_attention(q, k.index_select(0, last_keys), v.index_select(0, last_keys), one_each, cu_last_k,
                               1, int(np.diff(tree.cu_last_k).max()), causal=True, scale=layer.self_attn.scaling)
        x = x.index_select(0, last) + layer.self_attn.o_proj(ctx.flatten(1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.label_head(self.norm(x))

    @staticmethod
    def _qkv(attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             queries: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (at `queries` only, if given), keys and values [tokens, heads, head_dim], normed
        per head where the family does so (Qwen3) and rotated."""
        dim = attn.head_dim
        hq, cq, sq = (h, cos, sin) if queries is None else (h.index_select(0, queries), cos[queries], sin[queries])
        q = attn.q_proj(hq).unflatten(-1, (-1, dim))
        k = attn.k_proj(h).unflatten(-1, (-1, dim))
        v = attn.v_proj(h).unflatten(-1, (-1, dim))
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return rotate(q, cq, sq), rotate(k, cos, sin), v
