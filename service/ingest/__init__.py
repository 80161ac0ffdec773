"""Ingest: the DICOM listener and the one path every instance takes into the archive.

``acceptor`` (the DICOM upper layer carrying C-STORE and C-ECHO), ``scp`` (listener wiring,
one or more listener processes on one port), ``dicom_header`` (reading and checking the
header, Part 10 encoding), ``storage`` (files on disk, durably placed), ``ingestor`` (header,
file, row, answer, with the group-committing writer), ``importer`` (``import DIR`` through the
same path), ``sender`` (``send``: C-STORE to another receiver) and ``storage_commitment``
(the Storage Commitment Push Model SCP).
"""
