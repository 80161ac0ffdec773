"""pacs-annotate: PACS-side DICOM ingestion and auto-annotation, by stage.

* ``service.ingest``: the DICOM listener and everything that lands an instance in the archive
  (file on disk, row in PostgreSQL), the file import, the sender, storage commitment.
* ``service.tags``: the tag stages: parsing tags into features, the frequency analysis, the
  tag clustering runs and their report.
* ``service.images``: the image stages: feature extraction (the image worker and its feature
  store), the backbone's training data, the image model (annotation, query by image), its
  report and the retrieval evaluation.
* ``service.database``: the database plumbing: engine and migrations, schema, work queue,
  the committer's driver connection.
* ``service.cli``: the ``pacs-annotate`` command on top of them; nothing else imports it.

Beside them, shared by every stage: ``config`` (settings), ``logs``, ``progress`` (progress
bars and lines), ``processes``, ``status`` (what ``status`` reports) and ``html_report``
(pieces of the self-contained HTML reports).
"""

__version__ = "0.1.0"
