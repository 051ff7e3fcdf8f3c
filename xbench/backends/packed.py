"""Packed (unpadded) execution of an encoder cross-encoder in PyTorch.

A padded batch of `rows` pairs of up to `longest` tokens spends the dense layers (the GEMMs,
layer norms, GELU: ~85% of the FLOPs) on rows x longest positions, padding included. Here the
batch arrives flat, its real tokens back to back with their positions and each pair's offsets,
laid out on the host in numpy (`pack_inputs`: one copy to the device, and the device is never
asked where the real tokens are); every dense layer runs on the `[tokens, hidden]` matrix, as
one GEMM over the whole batch, and only attention sees the sequences. On CUDA it is
variable-length flash attention over the packed tokens (no padding at all). On the CPU the pairs
are split into groups of similar length (the same least-cost cut as the batch planner's, priced
in attention work plus a fixed cost per SDPA call), and each group is scattered into its own
padded `[rows, heads, longest, head_dim]` view for SDPA, then gathered back: attention costs
about the sum of each pair's own length squared, not rows x longest squared. The score reads
each pair's first token, so the last layer computes only that token: keys and values from every
token, one query per pair, and the output projection and feed-forward on `rows` tokens (three
quarters of that layer's work, about an eighth of a 6-layer model's). This is CTranslate2's and
FasterTransformer's "remove padding" done on the model's own weights: the embeddings, layers and
head are the transformers modules, re-wired, so every fp32 score matches the padded model's.

Architectures: BERT, RoBERTa/XLM-RoBERTa (bge-reranker), ELECTRA (post-norm BERT layers) and
DistilBERT (`PackedEncoder`), and ModernBERT (`PackedModernBert`: RoPE, local and global layers).
`packs(model)` says whether a model runs packed by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xbench.layout import positions_in_pair, run_positions

BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
SUPPORTED = (*BERT_LIKE, "distilbert")
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")  # positions count from the padding id + 1
HALF = (torch.float16, torch.bfloat16)  # what flash attention runs


# What one SDPA call costs beyond its work, in units of attention work (rows x length^2): about
# 40 us against 25 ns per unit per layer on a 2-core AVX2 CPU.
ATTENTION_CALL_UNITS = 2048


@dataclass
class AttentionGroup:
    """Pairs of similar length that share one padded SDPA call."""

    rows: int
    longest: int
    tokens: torch.Tensor  # packed positions of the group's tokens  [group tokens]
    slots: torch.Tensor  # where each of those tokens sits in the group's [rows * longest] layout
    key_mask: torch.Tensor | None  # [rows, 1, 1, longest]; None when every pair fills the group


@dataclass
class Packing:
    """Where one batch's real tokens sit in its padded [rows, longest] layout."""

    rows: int
    longest: int
    index: torch.Tensor | None  # flat padded positions of the real tokens, in order [tokens]; None: no padding
    key_mask: torch.Tensor | None  # [rows, 1, 1, longest] True where a key is real; None: no padding
    cu_seqlens: torch.Tensor  # int32 [rows + 1]: offsets of each pair in the packed tokens
    first: torch.Tensor  # int32: packed position of each pair's first token  [rows]
    groups: list[AttentionGroup] | None = None  # CPU attention groups (None: one padded call)
    # Attention straight on the packed tokens, each pair by its offsets (flash attention's
    # variable-length kernel on CUDA): no padded layout, so `index` and `key_mask` go unused.
    varlen: bool = False

    @classmethod
    def of_lengths(cls, lengths: np.ndarray, cu_seqlens: torch.Tensor, first: torch.Tensor,
                   grouped: bool = False) -> "Packing":
        """The padded layout of pairs of these lengths, worked out on the host (no device sync),
        beside their offsets and first tokens (`pack_inputs`' buffer holds both, on the device);
        `grouped`: attention in groups of similar length (the CPU's way)."""
        rows, longest, device = len(lengths), int(lengths.max()), cu_seqlens.device
        if (lengths == longest).all():  # no padding: no index, no mask, no copies
            return cls(rows, longest, None, None, cu_seqlens, first)
        index = torch.from_numpy(run_positions(np.arange(rows) * longest, lengths)).to(device)
        key_mask = torch.from_numpy(np.arange(longest) < lengths[:, None]).to(device)[:, None, None, :]
        packing = cls(rows, longest, index, key_mask, cu_seqlens, first)
        if grouped:  # the CPU's: reading the offsets back costs nothing there
            packing.groups = attention_groups(lengths.tolist(), cu_seqlens.tolist(), device)
        return packing

    @classmethod
    def of_offsets(cls, cu_seqlens: torch.Tensor, first: torch.Tensor, longest: int) -> "Packing":
        """A variable-length packing from pair offsets alone (no host sync: CUDA graphs)."""
        return cls(len(first), longest, None, None, cu_seqlens, first, varlen=True)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[rows, longest, ...] -> [tokens, ...]"""
        flat = padded.reshape(self.rows * self.longest, *padded.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[tokens, ...] -> [rows * longest, ...], zeros at the padding."""
        if self.index is None:
            return packed
        out = packed.new_zeros(self.rows * self.longest, *packed.shape[1:])
        return out.index_copy_(0, self.index, packed)


@dataclass(frozen=True)
class Shape:
    """Sizes of a batch's packed inputs: tokens, pairs, and the longest pair attention allows for."""

    tokens: int
    rows: int
    longest: int

    @property
    def size(self) -> int:
        """int32 slots of the input buffer: ids, types, positions, pair offsets, first tokens."""
        return 3 * self.tokens + 2 * self.rows + 1

    def views(self, buffer):  # a numpy array on the host, a tensor on the device
        """(ids, token types, positions, pair offsets, first tokens) of an input buffer."""
        t, r = self.tokens, self.rows
        return buffer[:t], buffer[t:2 * t], buffer[2 * t:3 * t], buffer[3 * t:3 * t + r + 1], buffer[3 * t + r + 1:]


def pack_inputs(flat_ids: np.ndarray, flat_types: np.ndarray, lengths: np.ndarray, position_offset: int,
                shape: Shape | None = None) -> tuple[Shape, np.ndarray]:
    """A flat batch (xbench/layout.py) as the packed encoder's inputs, laid out in one int32 buffer
    that reaches the device in one copy: [ids | token types | positions] (tokens each), pair
    offsets (rows + 1), each pair's first token (rows). Built on the host in numpy, so the device
    is never asked where the real tokens are; int32, what flash attention takes its offsets in
    and what the embeddings and gathers take as indices.

    A larger `shape` (a CUDA graph's bucket) is filled with spare pairs: the extra tokens form
    pairs of at most shape.longest tokens, the rows beyond those hold no tokens and read token 0,
    and their scores are dropped. Attention runs per pair, so they never touch real ones."""
    tokens, rows = len(flat_ids), len(lengths)
    shape = shape or Shape(tokens, rows, int(lengths.max()))
    buffer = np.zeros(shape.size, dtype=np.int32)
    ids, types, positions, offsets, first = shape.views(buffer)
    ids[:tokens], types[:tokens] = flat_ids, flat_types
    positions[:tokens] = positions_in_pair(lengths)
    positions += position_offset
    np.cumsum(lengths, out=offsets[1:rows + 1])
    spare = shape.tokens - tokens
    offsets[rows + 1:] = tokens + np.minimum(np.arange(1, shape.rows - rows + 1) * shape.longest, spare)
    first[:rows] = offsets[:rows]
    return shape, buffer


def attention_groups(lengths: list[int], offsets: list[int], device: torch.device) -> list[AttentionGroup] | None:
    """Split the pairs into groups of similar length at the least estimated attention cost;
    None when one padded call is cheapest."""
    from xbench.core.cost_model import CostModel, plan

    price = CostModel(overhead_s=ATTENTION_CALL_UNITS, per_token_s=0.0, per_attention_s=1.0)
    cuts = plan(lengths, price, max_rows=len(lengths), max_padded_tokens=1 << 62)
    if len(cuts) == 1:
        return None
    groups = []
    for rows in cuts:
        longest = max(lengths[r] for r in rows)
        tokens, slots = [], []
        for k, r in enumerate(rows):
            tokens.extend(range(offsets[r], offsets[r] + lengths[r]))
            slots.extend(range(k * longest, k * longest + lengths[r]))
        key_mask = None
        if any(lengths[r] != longest for r in rows):
            own = torch.tensor([lengths[r] for r in rows], device=device)
            key_mask = (torch.arange(longest, device=device)[None, :] < own[:, None])[:, None, None, :]
        groups.append(AttentionGroup(len(rows), longest, torch.tensor(tokens, device=device),
                                     torch.tensor(slots, device=device), key_mask))
    return groups


def attention(qkv: torch.Tensor, heads: int, packing: Packing) -> torch.Tensor:
    """Self-attention of each pair over its own tokens: packed [tokens, 3 x hidden] in,
    packed [tokens, hidden] out."""
    tokens, width = qkv.shape
    hidden = width // 3
    head_dim = hidden // heads
    if packing.varlen:
        # q, k and v each contiguous, from one copy (one kernel, not three)
        q, k, v = qkv.view(tokens, 3, heads, head_dim).transpose(0, 1).contiguous().unbind(0)
        cu, longest = packing.cu_seqlens, packing.longest
        return varlen_attention(q, k, v, cu, cu, longest, longest).reshape(tokens, hidden)
    if packing.groups is not None:
        out = qkv.new_empty(tokens, hidden)
        for g in packing.groups:
            padded = qkv.new_zeros(g.rows * g.longest, width).index_copy_(0, g.slots, qkv.index_select(0, g.tokens))
            ctx = _sdpa(padded, g.rows, g.longest, heads, head_dim, g.key_mask)
            out.index_copy_(0, g.tokens, ctx.reshape(g.rows * g.longest, hidden).index_select(0, g.slots))
        return out
    rows, longest = packing.rows, packing.longest
    ctx = _sdpa(packing.unpack(qkv), rows, longest, heads, head_dim, packing.key_mask)
    return packing.pack(ctx)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, causal: bool = False, scale: float | None = None,
                     window: int | None = None) -> torch.Tensor:
    """Each pair's queries over its own keys, all packed [tokens, heads, head_dim]; pair i owns
    rows cu[i]:cu[i + 1]. Keys may have fewer heads than queries (grouped-query attention).
    `causal`: query j of n sees keys up to its own place counted from the end (bottom-right: a
    sequence's last queries over keys that begin with an earlier prefix's). On CUDA (fp16/bf16,
    Ampere or newer) flash attention's variable-length kernel, called without the Python wrapper
    around it (a host cost on every layer); elsewhere a loop of SDPA calls, the reference the
    tests hold the CUDA path's host-side packing to. `window` (queries and keys of one sequence,
    not causal): each query sees the keys at most `window` places away (ModernBERT's local
    layers); always the loop."""
    if q.is_cuda and window is None and flash_varlen_available(q.device, q.dtype):
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                      scale=scale)[0]
    out = q.new_zeros(q.shape)  # a pair without keys (a CUDA graph's spare rows) reads zeros, as in flash
    grouped = k.shape[1] != q.shape[1]
    qo, ko = cu_q.tolist(), cu_k.tolist()
    for a, b, c, d in zip(qo, qo[1:], ko, ko[1:]):
        if b > a and d > c:
            mask = None
            if causal and d - c != b - a:
                mask = torch.ones(b - a, d - c, dtype=torch.bool, device=q.device).tril_((d - c) - (b - a))
            elif window is not None and b - a > window + 1:
                place = torch.arange(b - a, device=q.device)
                mask = (place[:, None] - place[None, :]).abs() <= window
            heads_first = (t.transpose(0, 1)[None] for t in (q[a:b], k[c:d], v[c:d]))
            out[a:b] = F.scaled_dot_product_attention(*heads_first, attn_mask=mask, scale=scale, enable_gqa=grouped,
                                                      is_causal=causal and mask is None)[0].transpose(0, 1)
    return out


def _sdpa(padded_qkv: torch.Tensor, rows: int, longest: int, heads: int, head_dim: int,
          key_mask: torch.Tensor | None) -> torch.Tensor:
    """[rows * longest, 3 x hidden] -> [rows, longest, hidden] through SDPA with a key mask."""
    q, k, v = padded_qkv.view(rows, longest, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [rows, heads, longest, dim]
    return out.transpose(1, 2).reshape(rows, longest, heads * head_dim)


def first_token_attention(qkv: torch.Tensor, heads: int, packing: Packing) -> torch.Tensor:
    """Attention of each pair's first token over the pair's tokens: packed [tokens, 3 x hidden]
    in, [rows, hidden] out. One query per pair makes it cheap in any layout: the padded one, or
    the packed one with one query row per pair."""
    hidden = qkv.shape[1] // 3
    head_dim = hidden // heads
    rows, longest = packing.rows, packing.longest
    if packing.varlen:
        tokens = qkv.shape[0]
        q = qkv.index_select(0, packing.first)[:, :hidden].reshape(rows, heads, head_dim)
        k, v = qkv.view(tokens, 3, heads, head_dim)[:, 1:].transpose(0, 1).contiguous().unbind(0)
        one_each = torch.arange(rows + 1, dtype=torch.int32, device=qkv.device)
        return varlen_attention(q, k, v, one_each, packing.cu_seqlens, 1, longest).reshape(rows, hidden)
    padded = packing.unpack(qkv).view(rows, longest, 3, heads, head_dim)
    q = padded[:, :1, 0].transpose(1, 2)  # [rows, heads, 1, dim]
    k, v = (padded[:, :, i].transpose(1, 2) for i in (1, 2))  # [rows, heads, longest, dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.key_mask)
    return out.reshape(rows, hidden)


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash attention's variable-length kernel runs here: CUDA at fp16/bf16 on an Ampere
    or newer GPU (older ones, a T4 say, take the padded SDPA call)."""
    return (device.type == "cuda" and dtype in HALF and hasattr(torch.ops.aten, "_flash_attention_forward")
            and torch.backends.cuda.flash_sdp_enabled() and torch.cuda.get_device_capability(device) >= (8, 0))


class PackedLayer(nn.Module):
    """One post-norm transformer layer on packed tokens: fused QKV projection, per-pair
    attention, output projection + residual + norm, feed-forward + residual + norm."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, attn_out: nn.Module, attn_norm: nn.Module,
                 ffn_in: nn.Module, act: Callable, ffn_out: nn.Module, ffn_norm: nn.Module, heads: int):
        super().__init__()
        self.qkv = nn.Linear(q.in_features, 3 * q.out_features, bias=True)
        with torch.no_grad():  # one GEMM instead of three: better use of the cores on small batches
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.attn_out, self.attn_norm = attn_out, attn_norm
        self.ffn_in, self.act, self.ffn_out, self.ffn_norm = ffn_in, act, ffn_out, ffn_norm
        self.heads = heads

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        h = self.attn_norm(self.attn_out(attention(self.qkv(x), self.heads, packing)) + x)
        return self.ffn_norm(self.ffn_out(self.act(self.ffn_in(h))) + h)

    def forward_first(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The layer's output at each pair's first token only [rows, hidden]: the last layer of a
        classifier that reads that token. Keys and values still come from every token, but only
        one query per pair attends, and the output projection and feed-forward (three quarters
        of a layer's FLOPs) run on `rows` tokens instead of all of them."""
        first = x.index_select(0, packing.first)
        h = self.attn_norm(self.attn_out(first_token_attention(self.qkv(x), self.heads, packing)) + first)
        return self.ffn_norm(self.ffn_out(self.act(self.ffn_in(h))) + h)


def _layers(model: nn.Module) -> list[PackedLayer]:
    cfg = model.config
    if cfg.model_type == "distilbert":
        return [PackedLayer(b.attention.q_lin, b.attention.k_lin, b.attention.v_lin, b.attention.out_lin,
                            b.sa_layer_norm, b.ffn.lin1, b.ffn.activation, b.ffn.lin2, b.output_layer_norm, cfg.n_heads)
                for b in model.distilbert.transformer.layer]
    return [PackedLayer(b.attention.self.query, b.attention.self.key, b.attention.self.value,
                        b.attention.output.dense, b.attention.output.LayerNorm, b.intermediate.dense,
                        b.intermediate.intermediate_act_fn, b.output.dense, b.output.LayerNorm,
                        cfg.num_attention_heads)
            for b in model.base_model.encoder.layer]


class PackedEncoder(nn.Module):
    """A transformers sequence-classification encoder, run on packed tokens: takes `pack_inputs`'
    buffer and returns the head's logits [rows, labels]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not self.supports(model):
            raise ValueError(f"packed execution does not implement {model.config.model_type!r}; "
                             f"it runs {', '.join(SUPPORTED)} and modernbert")
        self.config = model.config
        self.kind = model.config.model_type
        base = model.base_model
        self.embeddings = base.embeddings
        self.embeddings_project = getattr(base, "embeddings_project", None)  # ELECTRA-small style
        self.layer = nn.ModuleList(_layers(model))
        # The head modules keep their names (pooler, classifier): quantizers keep them in fp32.
        self.pooler = getattr(base, "pooler", None) if self.kind == "bert" else None
        self.pre_classifier = getattr(model, "pre_classifier", None)
        self.classifier = model.classifier
        # Position id of a pair's first token: RoBERTa counts from its padding id + 1.
        self.position_offset = base.embeddings.padding_idx + 1 if self.kind in ROBERTA_LIKE else 0

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) in SUPPORTED

    def forward(self, buffer: torch.Tensor, shape: Shape, packing: Packing) -> torch.Tensor:
        """Logits [shape.rows, labels] of `pack_inputs`' buffer, on the model's device."""
        ids, types, positions, _, _ = shape.views(buffer)
        return self.encode(self.embed_packed(ids, types, positions), packing)

    def embed_packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor
                     ) -> torch.Tensor:
        """Embeddings of packed tokens [tokens] -> [tokens, hidden], positions given (the padded
        layout is never built): the model's own embedding module (DistilBERT's parts), on one row
        of all the tokens."""
        e = self.embeddings
        if self.kind == "distilbert":  # its module takes no position ids before transformers 5: its sum here
            return e.dropout(e.LayerNorm(e.word_embeddings(input_ids) + e.position_embeddings(position_ids)))
        x = e(input_ids=input_ids[None], token_type_ids=token_type_ids[None], position_ids=position_ids[None])[0]
        return self.embeddings_project(x) if self.embeddings_project is not None else x

    def encode(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The layers and the head on embedded packed tokens [tokens, hidden] -> logits [rows, labels]."""
        for layer in self.layer[:-1]:
            x = layer(x, packing)
        return self._head(self.layer[-1].forward_first(x, packing))

    def _head(self, first: torch.Tensor) -> torch.Tensor:
        if self.kind == "distilbert":
            return self.classifier(F.relu(self.pre_classifier(first)))
        if self.kind == "bert":
            return self.classifier(self.pooler(first[:, None, :]) if self.pooler is not None else first)
        return self.classifier(first[:, None, :])  # RoBERTa/ELECTRA heads read features[:, 0]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on packed [tokens, heads, head_dim], cos/sin [tokens, 1, head_dim] (the halves
    convention of transformers' Llama family and ModernBERT)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class PackedModernBert(nn.Module):
    """ModernBertForSequenceClassification on packed tokens (gte-reranker-modernbert-base and
    kin): pre-norm layers of a fused QKV projection, RoPE at each pair's own positions, attention
    within each pair (global every `global_attn_every_n_layers` layers, a window of
    ±config.sliding_window tokens in the others), a GeGLU MLP; then the final norm, the pooling
    (the first token, or the mean of the pair's tokens), the head and the classifier. Attention is
    one SDPA call per pair, the local layers' keys banded. Measured on the ModernBERT-base
    stand-in (2-core CPU, fp32, 64 pairs), this runs at 1.01-1.04x transformers' padded forward on
    the planner's length groups, where the BERT family's grouped padded calls gave 0.93-0.97x
    (their copies in and out cost more than the padding they save). Every layer runs on every
    token (mean pooling reads them all)."""

    position_offset = 0

    def __init__(self, model: nn.Module):
        super().__init__()
        base = model.model
        self.config = model.config
        self.embeddings, self.layers, self.final_norm = base.embeddings, base.layers, base.final_norm
        self.rotary_emb = base.rotary_emb
        self.head, self.classifier = model.head, model.classifier
        self.kinds = list(model.config.layer_types)
        self.window = int(model.config.sliding_window)
        self.mean = model.config.classifier_pooling == "mean"

    def forward(self, buffer: torch.Tensor, shape: Shape, packing: Packing) -> torch.Tensor:
        ids, _, positions, cu, first = shape.views(buffer)
        tokens = shape.tokens
        x = self.embeddings(input_ids=ids[None])[0]
        rope = {}
        for kind in set(self.kinds):
            cos, sin = self.rotary_emb(x[None], positions[None], kind)
            rope[kind] = cos[0, :, None, :], sin[0, :, None, :]
        for layer, kind in zip(self.layers, self.kinds):
            attn = layer.attn
            q, k, v = attn.Wqkv(layer.attn_norm(x)).view(tokens, 3, -1, attn.head_dim).unbind(1)
            q, k = (rotate(t, *rope[kind]) for t in (q, k))
            ctx = varlen_attention(q, k, v, cu, cu, shape.longest, shape.longest, scale=attn.head_dim ** -0.5,
                                   window=self.window if kind == "sliding_attention" else None)
            x = x + attn.Wo(ctx.flatten(1))
            x = x + layer.mlp(layer.mlp_norm(x))
        x = self.final_norm(x)
        if self.mean:
            lengths = cu[1:shape.rows + 1] - cu[:shape.rows]
            pair = torch.repeat_interleave(torch.arange(shape.rows, device=x.device), lengths.long())
            pooled = x.new_zeros(shape.rows, x.shape[1]).index_add_(0, pair, x) / lengths[:, None].to(x.dtype)
        else:
            pooled = x.index_select(0, first[:shape.rows])
        return self.classifier(self.head(pooled))


def packs(model: nn.Module, device: torch.device | None = None) -> bool:
    """Whether packed execution runs this classifier by default: BERT's family everywhere,
    ModernBERT on the CPU (its local layers' windows take the per-pair loop, not flash attention's
    variable-length kernel)."""
    kind = getattr(model.config, "model_type", None)
    return kind in SUPPORTED or (kind == "modernbert" and (device is None or device.type == "cpu"))


def packed_classifier(model: nn.Module) -> nn.Module:
    """The packed form of a sequence classifier; raises, naming the architectures, where none exists."""
    if getattr(model.config, "model_type", None) == "modernbert":
        return PackedModernBert(model)
    return PackedEncoder(model)
