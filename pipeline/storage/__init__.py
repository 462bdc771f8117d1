"""pipeline.storage."""
