"""Measurements of generated images against real ones.

The metrics take images (or a generator as an argument) and never import the trainer or the
generation stage, so both can use them. :mod:`carmodels.metrics.pixel`: pixel-space Fréchet
distance and diversity, cheap enough to run every epoch.
"""
