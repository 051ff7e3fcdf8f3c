"""xbench: measure and serve cross-encoder (reranker) models."""

__version__ = "0.1.0"
