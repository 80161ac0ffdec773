"""Batch pipelines: tag clustering and image annotation (issues 5-7)."""
