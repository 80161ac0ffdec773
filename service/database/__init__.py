"""Database plumbing shared by every stage.

``engine`` (the configured or embedded PostgreSQL, engines, migrations), ``schema`` (the
tables, as the migrations create them), ``work_queue`` (the queue the later stages consume)
and ``driver_connection`` (the ingest committer's raw DBAPI connection).
"""
