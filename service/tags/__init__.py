"""Tags: the stages that work on the instances' DICOM tags.

``features`` (the ``tags`` queue stage and ``reparse``: tags parsed into
``instance_features``), ``analysis`` (``analyze``: every tag's frequency over the archive),
``tag_clusters`` (``recluster``: the clustering runs, stable labels, assignment of new
instances) and ``cluster_report`` (a run's HTML report).
"""
