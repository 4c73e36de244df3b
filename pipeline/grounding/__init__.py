"""Visual grounding: a referring expression and an image in, the box of the object meant out.

``boxes`` (conversions, IoU, GIoU, Acc@0.5), ``scenes`` (the demo's emoji scenes), ``data``
(annotation readers for ``distill prepare`` and the reader of prepared grounding shards),
``model`` (TransVG-style students), ``losses`` (box and distillation losses), ``train``,
``evaluate`` and ``report``.
"""
