"""Taking a student out: as an open_clip model (:mod:`~pipeline.export.open_clip_form`), as ONNX
image and text encoders (:mod:`~pipeline.export.onnx_form`), with a model card
(:mod:`~pipeline.export.card`)."""
