"""PyTorch eager backend: transformers' BertForSequenceClassification with SDPA attention."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_torch_model(model_dir: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The reference model: fp32, eval mode, safetensors only."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, use_safetensors=True, trust_remote_code=trust_remote_code,
        attn_implementation="sdpa", dtype=torch.float32,
    )
    return model.eval()


class TorchBackend:
    def __init__(self, model_dir: str, device: str, precision: str, threads: int, trust_remote_code: bool = False):
        # Called on the worker's own thread: set_num_threads sets that thread's intra-op pool.
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.precision = precision
        self.threads = threads
        model = load_torch_model(model_dir, trust_remote_code)
        self.model = model.to(device=self.device, dtype=DTYPES[precision])

    @torch.inference_mode()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        dev = self.device
        out = self.model(
            input_ids=torch.from_numpy(input_ids).to(dev),
            attention_mask=torch.from_numpy(attention_mask).to(dev),
            token_type_ids=torch.from_numpy(token_type_ids).to(dev),
        )
        return out.logits[:, 0].float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"engine": "torch-eager", "torch": torch.__version__, "threads": self.threads,
                "device": str(self.device), "precision": self.precision}
