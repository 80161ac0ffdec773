"""PACS-side DICOM ingestion: a C-STORE SCP that lands every instance in PostgreSQL."""

__version__ = "0.1.0"
