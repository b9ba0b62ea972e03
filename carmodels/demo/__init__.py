"""The built-in demo: a deterministic used-car listing site with drawn car photos.

Runs fully offline. ``build_catalog`` makes the listings (and, on demand, their JPEGs) with
planted defects; ``DemoServer`` serves them on 127.0.0.1 for tests and the demo pipeline;
``run_demo_server`` is what ``carmodels demo-server`` runs.
"""

from carmodels.demo.catalog import (
    DEFAULT_N_LISTINGS,
    CatalogSettings,
    DemoCatalog,
    DemoDefects,
    DemoListing,
    ImageTruth,
    build_catalog,
)
from carmodels.demo.drawing import BODY_TYPES, CAR_COLOURS, FACINGS, VIEWS, draw_car
from carmodels.demo.server import (
    LISTINGS_PER_PAGE,
    DemoServer,
    RequestLog,
    RequestRecord,
    make_app,
    run_demo_server,
)

__all__ = [
    "BODY_TYPES",
    "CAR_COLOURS",
    "DEFAULT_N_LISTINGS",
    "FACINGS",
    "LISTINGS_PER_PAGE",
    "VIEWS",
    "CatalogSettings",
    "DemoCatalog",
    "DemoDefects",
    "DemoListing",
    "DemoServer",
    "ImageTruth",
    "RequestLog",
    "RequestRecord",
    "build_catalog",
    "draw_car",
    "make_app",
    "run_demo_server",
]
