"""Tag parsers: raw DICOM tag values to clean features (issue 4)."""
