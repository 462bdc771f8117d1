"""pipeline.training."""
