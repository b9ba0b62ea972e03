"""Measurements of generated images against real ones.

The metrics take images (or a generator or classifier as an argument) and never import the
trainer, the generation stage or the evaluation, so all of them can use the metrics.

* :mod:`carmodels.metrics.pixel`: pixel-space Fréchet distance and diversity, cheap enough to
  run every epoch;
* :mod:`carmodels.metrics.fid`: FID and KID with the published Inception weights, offline-aware;
* :mod:`carmodels.metrics.domain`: ``judge_fd``, ``judge_kid``, precision/recall/density/
  coverage and ``type_overlap``, in the features of the judge (a car classifier).
"""
