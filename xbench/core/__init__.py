"""The pipeline core: TokenizerPool -> Batcher -> ModelPool, wired by Pipeline."""
