"""Alembic migrations; applied by ``pacs-annotate migrate`` and on ``serve``."""
