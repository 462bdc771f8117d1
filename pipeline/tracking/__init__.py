"""pipeline.tracking."""
