"""One module per quantization format, each defining ``FORMAT``: a :class:`vlq.formats.spec.QuantFormat` with
everything vlq knows about it.  :mod:`vlq.formats.registry` finds every module here by itself: adding a format
is adding a module (plus its decoder in :mod:`vlq.export.dequant`, which checks exports independently, and
its variants in ``tests/matrix/search_variants.yaml``).
"""
