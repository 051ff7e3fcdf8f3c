"""`xbench serve`: the pipeline behind the rerank HTTP APIs clients already speak."""
