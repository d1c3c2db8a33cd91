"""One module per output format, each holding one ``OutputFormat`` (``d2merge.export.protocol``) that
delegates to its exporter in ``d2merge/export/``; ``d2merge.export.registry`` lists them."""
