"""Stage 3's library: scoring (:mod:`.scoring`), efficiency probes (:mod:`.efficiency`) and the
reports (:mod:`.report` for metrics.json, CSV curves and Markdown; :mod:`.html_report`). The stage
itself (config and the order of the steps) is :mod:`stages.evaluate.run`."""
