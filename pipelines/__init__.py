"""Batch pipelines: tag clustering and image annotation."""
