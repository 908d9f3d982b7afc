"""Comparing sensitivity strategies and schemes on measured fidelity frontiers (``vlq study``).

A *strategy* is one module under :mod:`vlq.study.strategies`, registered by name in :mod:`vlq.study.registry`:
a scored strategy gives a score per (decision group, candidate format) and is solved by the one solver
(:mod:`vlq.study.solve`, ModelOpt's LP over the saved candidate costs); a baseline gives allocations directly.
:mod:`vlq.study.layerwise` is the measured oracle's engine (one group quantized, the layers from it onward re-run),
:mod:`vlq.study.analysis` what the study concludes (rank correlation with the oracle, regret, area, additivity),
:mod:`vlq.study.records` what it writes.  :func:`vlq.pipeline.study` runs a study.

Nothing heavy is imported here (the CLI validates strategy names before torch loads).
"""
