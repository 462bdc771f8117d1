"""pipeline.stages."""
