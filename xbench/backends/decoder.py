"""LLM rerankers on PyTorch: a causal LM read at each pair's last real token, through the label rows
of its LM head only (recipes.py names the labels).

A reranker needs one position and two (or one) vocabulary rows of the LM head, so the head is cut
to those rows when the model loads: the full head is a [vocabulary x hidden] product per token
(151,936 x 1,024 on Qwen3-0.6B, about a quarter of the model's compute) whose every other output
would be thrown away. Pairs come right-padded: a causal model's real tokens never attend to the
padding after them, so the last real token's state is the unpadded one's.
"""

from __future__ import annotations

import torch


def load_causal_lm(model_dir: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The reference causal LM: fp32, eval mode, safetensors only, SDPA attention."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                attn_implementation="sdpa", dtype=torch.float32).eval()


class LabelScorer(torch.nn.Module):
    """logits [rows, labels] of the label tokens at each row's last real token."""

    def __init__(self, lm: torch.nn.Module, label_ids: tuple[int, ...]):
        super().__init__()
        self.config = lm.config
        self.decoder = lm.get_decoder()
        head = lm.get_output_embeddings()
        ids = torch.tensor(label_ids, dtype=torch.long)
        self.rows = torch.nn.Parameter(head.weight.detach()[ids].clone(), requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach()[ids].clone(), requires_grad=False)
        # Gemma 2 caps the LM head's logits (tanh); a no-op elsewhere.
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        state = hidden[torch.arange(len(last), device=hidden.device), last]
        logits = state @ self.rows.T
        if self.bias is not None:
            logits = logits + self.bias
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
