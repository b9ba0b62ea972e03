"""carmodels: car-listing photos to new car designs."""

__version__ = "0.1.0"
