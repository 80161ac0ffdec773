"""Images: the stages that work on the pixels.

``image_worker`` (the ``image`` queue stage: DenseNet121 features of stored images),
``feature_store`` (their feature maps on disk), ``backbone_data`` (``train-backbone``'s
training set from the tag clusters), ``image_annotation`` (``image-model``: the fitted
dictionary pipeline, every image's cluster and code, query by image), ``image_report`` (the
image model's and a query's HTML reports, montages of tag clusters) and ``evaluation``
(``evaluate``: retrieval quality against site labels, the paper's Table 1).
"""
