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
"""

from __future__ import annotations

import inspect

import torch

MIN_SHARED = 8  # prefix tokens worth a pass of their own


def load_causal_lm(model_dir: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The reference causal LM: fp32, eval mode, safetensors only, SDPA attention."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                attn_implementation="sdpa", dtype=torch.float32).eval()


class LabelScorer(torch.nn.Module):
    """logits [rows, labels] of the label tokens at each row's last real token."""

    def __init__(self, lm: torch.nn.Module, label_ids: tuple[int, ...], shared_prefix: bool = True):
        super().__init__()
        self.config = lm.config
        self.decoder = lm.get_decoder()
        self.shared_prefix = shared_prefix
        # transformers 5.24 renamed the decoder's `past_key_values` argument to `cache`.
        self.cache_arg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        head = lm.get_output_embeddings()
        ids = torch.tensor(label_ids, dtype=torch.long)
        self.rows = torch.nn.Parameter(head.weight.detach()[ids].clone(), requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach()[ids].clone(), requires_grad=False)
        # Gemma 2 caps the LM head's logits (tanh); a no-op elsewhere.
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

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
        state = hidden[torch.arange(len(last), device=hidden.device), last]
        logits = state @ self.rows.T
        if self.bias is not None:
            logits = logits + self.bias
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

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
