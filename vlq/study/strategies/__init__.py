"""One module per study strategy, each exposing ``STRATEGY`` (registered in :mod:`vlq.study.registry`)."""
