"""Library pieces of training: targets from the stores, batches, sampling, the loader, the
process group, the optimiser schedule, checkpoints and the metrics log (the loop is the ``train``
stage, :mod:`stages.train.run`)."""
