"""A deterministic used-car catalog with drawn photos and deliberately planted defects.

`build_catalog` decides everything about every listing up front (cheap: a few milliseconds),
but draws a photo only when its bytes are first asked for, then keeps them. Each photo has
its own random stream derived from ``(seed, listing, photo)``, so its bytes do not depend on
the order in which photos are requested: the same seed always serves byte-identical JPEGs.

Planted defects, recorded in `DemoCatalog.defects` so that tests can check that every
pipeline stage notices them:

- duplicates: a few listings are re-listings of another car whose photo was resized and
  re-encoded at another JPEG quality (``duplicate_of`` maps copy -> original);
- dead links: image URLs that answer 404;
- a non-image: HTML bytes served under a ``.jpg`` URL as ``image/jpeg``;
- a truncated JPEG: the first part of a real photo's bytes only.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from PIL import Image

from carmodels.demo.drawing import BODY_TYPES, CAR_COLOURS, draw_car, random_size

DEFAULT_N_LISTINGS = 300
#: Enough listings to hold every planted defect in a distinct listing.
MIN_LISTINGS = 10


@dataclass(frozen=True)
class CarModelSpec:
    """A make and model sold in the catalog, with its price when new (USD)."""

    make: str
    model: str
    body_type: str
    new_price: int


CAR_MODELS: tuple[CarModelSpec, ...] = (
    CarModelSpec("Toyota", "Camry", "sedan", 28_000),
    CarModelSpec("Honda", "Accord", "sedan", 29_000),
    CarModelSpec("Nissan", "Altima", "sedan", 27_000),
    CarModelSpec("Hyundai", "Sonata", "sedan", 27_500),
    CarModelSpec("Chevrolet", "Malibu", "sedan", 25_500),
    CarModelSpec("BMW", "3 Series", "sedan", 45_000),
    CarModelSpec("Mercedes-Benz", "C-Class", "sedan", 47_000),
    CarModelSpec("Audi", "A4", "sedan", 42_000),
    CarModelSpec("Tesla", "Model 3", "sedan", 42_000),
    CarModelSpec("Toyota", "RAV4", "suv", 31_000),
    CarModelSpec("Honda", "CR-V", "suv", 32_000),
    CarModelSpec("Ford", "Explorer", "suv", 38_000),
    CarModelSpec("Jeep", "Grand Cherokee", "suv", 41_000),
    CarModelSpec("Chevrolet", "Tahoe", "suv", 56_000),
    CarModelSpec("Subaru", "Forester", "suv", 30_000),
    CarModelSpec("Mazda", "CX-5", "suv", 30_500),
    CarModelSpec("BMW", "X5", "suv", 65_000),
    CarModelSpec("Ford", "F-150", "pickup", 42_000),
    CarModelSpec("Chevrolet", "Silverado 1500", "pickup", 43_000),
    CarModelSpec("Ram", "1500", "pickup", 44_000),
    CarModelSpec("Toyota", "Tacoma", "pickup", 35_000),
    CarModelSpec("GMC", "Sierra 1500", "pickup", 46_000),
    CarModelSpec("Nissan", "Frontier", "pickup", 32_000),
    CarModelSpec("Volkswagen", "Golf", "hatchback", 25_000),
    CarModelSpec("Honda", "Civic Hatchback", "hatchback", 26_000),
    CarModelSpec("Mazda", "Mazda3 Hatchback", "hatchback", 25_500),
    CarModelSpec("Toyota", "Corolla Hatchback", "hatchback", 23_500),
    CarModelSpec("Ford", "Fiesta", "hatchback", 17_500),
    CarModelSpec("Chevrolet", "Bolt EV", "hatchback", 28_000),
    CarModelSpec("Ford", "Mustang", "coupe", 34_000),
    CarModelSpec("Chevrolet", "Camaro", "coupe", 33_000),
    CarModelSpec("BMW", "4 Series", "coupe", 50_000),
    CarModelSpec("Dodge", "Challenger", "coupe", 34_500),
    CarModelSpec("Nissan", "370Z", "coupe", 32_000),
    CarModelSpec("Porsche", "911", "coupe", 110_000),
)


@dataclass(frozen=True)
class CatalogSettings:
    """How listings and photos are drawn at random, and how many defects are planted."""

    body_type_weights: tuple[tuple[str, float], ...] = (
        ("sedan", 0.3),
        ("suv", 0.3),
        ("pickup", 0.15),
        ("hatchback", 0.13),
        ("coupe", 0.12),
    )
    second_photo_fraction: float = 0.25
    front_view_fraction: float = 0.1
    three_quarter_fraction: float = 0.45  # the rest are pure side views
    years: tuple[int, int] = (2008, 2024)  # inclusive
    reference_year: int = 2025  # "now", for depreciation and mileage
    miles_per_year: tuple[float, float] = (6_000, 15_000)
    yearly_depreciation: float = 0.87
    min_price: int = 2_500
    jpeg_quality: tuple[int, int] = (82, 95)  # inclusive
    duplicate_fraction: float = 0.05
    duplicate_scale: float = 0.85
    duplicate_quality: tuple[int, int] = (60, 75)  # always below the originals' qualities
    n_dead_links: int = 3
    truncated_fraction: float = 0.6


DEFAULT_CATALOG_SETTINGS = CatalogSettings()


@dataclass(frozen=True)
class ImageTruth:
    """What a drawn photo shows."""

    body_type: str
    view: str  # side | three_quarter | front
    facing: str  # left | right: where the nose points
    colour: str
    width: int
    height: int


@dataclass(frozen=True)
class DemoListing:
    id: str
    name: str
    make: str
    model: str
    year: int
    body_type: str
    colour: str
    price: int
    mileage: int
    image_paths: tuple[str, ...]  # URL paths, e.g. "/images/l0001-1.jpg"


@dataclass(frozen=True)
class DemoDefects:
    """Where the planted defects are (all values are image URL paths)."""

    duplicate_of: dict[str, str]  # re-encoded copy -> original
    dead_links: tuple[str, ...]
    non_image: str
    truncated: str


@dataclass(frozen=True)
class _PhotoRecipe:
    """How to produce one photo's bytes."""

    kind: str  # drawn | duplicate | truncated | non_image
    entropy: tuple[int, ...] = ()  # seeds this photo's random stream
    truth: ImageTruth | None = None
    quality: int = 90
    source: str = ""  # the original, for duplicates


@dataclass
class DemoCatalog:
    """Listings, their photos (drawn on first use, then cached) and the planted defects."""

    seed: int
    listings: list[DemoListing]
    truth: dict[str, ImageTruth]  # by image path, for every photo that shows a drawn car
    defects: DemoDefects
    settings: CatalogSettings = DEFAULT_CATALOG_SETTINGS
    _recipes: dict[str, _PhotoRecipe] = field(default_factory=dict, repr=False)
    _cache: dict[str, bytes] = field(default_factory=dict, repr=False)
    # One lock per photo, so that a photo is drawn once however many requests ask for it
    # while different photos are drawn in parallel (Pillow releases the GIL while it works).
    _photo_locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _locks_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def image_paths(self) -> list[str]:
        """Every image path referenced by a listing, dead links included, in listing order."""
        return [path for listing in self.listings for path in listing.image_paths]

    def listing(self, listing_id: str) -> DemoListing:
        for listing in self.listings:
            if listing.id == listing_id:
                return listing
        raise KeyError(f"no listing {listing_id!r} in the demo catalog")

    def serves(self, path: str) -> bool:
        """Whether ``path`` answers with bytes (False for dead links and unknown paths)."""
        return path in self._recipes

    def image_bytes(self, path: str) -> bytes:
        """The bytes served at ``path``; drawn on first use. KeyError for dead links."""
        if path not in self._recipes:
            if path in self.defects.dead_links:
                raise KeyError(f"{path} is a planted dead link: it has no bytes (404)")
            raise KeyError(f"{path} is not an image of the demo catalog")
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        with self._locks_lock:
            lock = self._photo_locks.setdefault(path, threading.Lock())
        with lock:
            if path not in self._cache:
                self._cache[path] = self._make(self._recipes[path])
        return self._cache[path]

    def etag(self, path: str) -> str:
        """A strong HTTP entity tag of the bytes at ``path``."""
        return '"' + hashlib.sha256(self.image_bytes(path)).hexdigest()[:32] + '"'

    def manifest_frame(self, base_url: str) -> pd.DataFrame:
        """One row per image URL, with the listing's metadata: a ready-made manifest file."""
        base = base_url.rstrip("/")
        rows = [
            {
                "url": base + path,
                "make": listing.make,
                "model": listing.model,
                "year": listing.year,
                "type": listing.body_type,
                "price": listing.price,
                "mileage": listing.mileage,
                "listing_url": f"{base}/listing/{listing.id}",
            }
            for listing in self.listings
            for path in listing.image_paths
        ]
        return pd.DataFrame(rows)

    def _make(self, recipe: _PhotoRecipe) -> bytes:
        if recipe.kind == "non_image":
            return _NON_IMAGE_HTML
        if recipe.kind == "duplicate":
            with Image.open(io.BytesIO(self.image_bytes(recipe.source))) as original:
                original.load()
                size = tuple(round(v * self.settings.duplicate_scale) for v in original.size)
                resized = original.resize(size, Image.Resampling.LANCZOS)
            return _encode_jpeg(resized, recipe.quality)
        assert recipe.truth is not None
        truth = recipe.truth
        image = draw_car(
            np.random.default_rng(list(recipe.entropy)),
            body_type=truth.body_type,
            colour=truth.colour,
            facing=truth.facing,
            view=truth.view,
            size=(truth.width, truth.height),
        )
        data = _encode_jpeg(image, recipe.quality)
        if recipe.kind == "truncated":
            return data[: int(len(data) * self.settings.truncated_fraction)]
        return data


#: What a misconfigured CDN might return for a missing photo: an HTML page, status 200.
_NON_IMAGE_HTML = (
    b"<!doctype html>\n<html><head><title>Photo unavailable</title></head>\n"
    b"<body><h1>Photo unavailable</h1><p>This photo has been removed by the seller.</p>"
    b"</body></html>\n"
)


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _price(
    rng: np.random.Generator, spec: CarModelSpec, age: int, mileage: int, s: CatalogSettings
) -> int:
    """Depreciated by age and mileage, with some dealer-to-dealer spread, rounded to $100."""
    value = spec.new_price * s.yearly_depreciation**age
    value *= float(np.clip(1.08 - mileage / 300_000, 0.6, 1.08)) * float(rng.uniform(0.92, 1.08))
    return max(s.min_price, int(round(value / 100) * 100))


def _random_truth(
    rng: np.random.Generator, body_type: str, colour: str, s: CatalogSettings
) -> ImageTruth:
    roll = rng.uniform()
    if roll < s.front_view_fraction:
        view = "front"
    elif roll < s.front_view_fraction + s.three_quarter_fraction:
        view = "three_quarter"
    else:
        view = "side"
    width, height = random_size(rng)
    facing = "left" if rng.uniform() < 0.5 else "right"
    return ImageTruth(body_type, view, facing, colour, width, height)


_COLOURS = tuple(CAR_COLOURS)


def _image_path(index: int, number: int) -> str:
    return f"/images/l{index + 1:04d}-{number}.jpg"


@dataclass(frozen=True)
class _DefectPlan:
    """Which listings carry which planted defect: disjoint groups drawn from one permutation."""

    original_of: dict[int, int]  # re-listing -> the listing whose car it repeats
    dead: list[int]
    non_image_at: int
    truncated_at: int


def _plan_defects(
    rng: np.random.Generator, n_listings: int, settings: CatalogSettings
) -> _DefectPlan:
    n_duplicates = max(1, round(settings.duplicate_fraction * n_listings))
    order = [int(i) for i in rng.permutation(n_listings)]
    copies, order = order[:n_duplicates], order[n_duplicates:]
    originals, order = order[:n_duplicates], order[n_duplicates:]
    dead, order = order[: settings.n_dead_links], order[settings.n_dead_links :]
    return _DefectPlan(dict(zip(copies, originals, strict=True)), dead, order[0], order[1])


@dataclass
class _CatalogBuilder:
    """The listings and photo recipes drawn so far, with the defects planted among them."""

    seed: int
    settings: CatalogSettings
    plan: _DefectPlan
    body_types: list[str]
    body_type_p: np.ndarray
    listings: list[DemoListing | None]
    recipes: dict[str, _PhotoRecipe] = field(default_factory=dict)
    truth: dict[str, ImageTruth] = field(default_factory=dict)
    duplicate_of: dict[str, str] = field(default_factory=dict)
    dead_links: list[str] = field(default_factory=list)
    non_image: str = ""
    truncated: str = ""

    def add_listing(self, index: int) -> None:
        """Draw listing ``index`` from its own random stream, planting its defects."""
        settings = self.settings
        listing_rng = np.random.default_rng([self.seed, 1, index])
        source = None
        if index in self.plan.original_of:
            source = self.listings[self.plan.original_of[index]]
            assert source is not None
            spec = next(m for m in CAR_MODELS if (m.make, m.model) == (source.make, source.model))
            year, colour = source.year, source.colour
        else:
            spec, year, colour = self._new_car(listing_rng)
        age = max(settings.reference_year - year, 0)
        mileage = int(round(age * listing_rng.uniform(*settings.miles_per_year), -1)) + int(
            listing_rng.integers(5, 3_000)
        )
        price = _price(listing_rng, spec, age, mileage, settings)

        n_photos = 2 if listing_rng.uniform() < settings.second_photo_fraction else 1
        paths = self._draw_photos(listing_rng, index, n_photos, spec.body_type, colour)
        if source is not None:
            self._plant_duplicate(listing_rng, paths[0], source.image_paths[0])
        paths.extend(self._plant_extra_link(index, _image_path(index, n_photos + 1)))
        self.listings[index] = DemoListing(
            id=f"L{index + 1:04d}",
            name=f"{year} {spec.make} {spec.model}",
            make=spec.make,
            model=spec.model,
            year=year,
            body_type=spec.body_type,
            colour=colour,
            price=price,
            mileage=mileage,
            image_paths=tuple(paths),
        )

    def _new_car(self, listing_rng: np.random.Generator) -> tuple[CarModelSpec, int, str]:
        pick = int(listing_rng.choice(len(self.body_types), p=self.body_type_p))
        body_type = self.body_types[pick]
        candidates = [m for m in CAR_MODELS if m.body_type == body_type]
        spec = candidates[int(listing_rng.integers(len(candidates)))]
        year = int(listing_rng.integers(self.settings.years[0], self.settings.years[1] + 1))
        colour = _COLOURS[int(listing_rng.integers(len(_COLOURS)))]
        return spec, year, colour

    def _draw_photos(
        self,
        listing_rng: np.random.Generator,
        index: int,
        n_photos: int,
        body_type: str,
        colour: str,
    ) -> list[str]:
        paths = []
        for number in range(1, n_photos + 1):
            path = _image_path(index, number)
            paths.append(path)
            photo_truth = _random_truth(listing_rng, body_type, colour, self.settings)
            low, high = self.settings.jpeg_quality
            quality = int(listing_rng.integers(low, high + 1))
            kind = "truncated" if (index == self.plan.truncated_at and number == 1) else "drawn"
            entropy = (self.seed, 2, index, number)
            self.recipes[path] = _PhotoRecipe(kind, entropy, photo_truth, quality)
            self.truth[path] = photo_truth
            if kind == "truncated":
                self.truncated = path
        return paths

    def _plant_duplicate(
        self, listing_rng: np.random.Generator, copy_path: str, source_path: str
    ) -> None:
        """The re-listing's first photo: the original's first photo, resized and re-saved."""
        low, high = self.settings.duplicate_quality
        quality = int(listing_rng.integers(low, high + 1))
        self.recipes[copy_path] = _PhotoRecipe("duplicate", quality=quality, source=source_path)
        original = self.truth[source_path]
        self.truth[copy_path] = replace(
            original,
            width=round(original.width * self.settings.duplicate_scale),
            height=round(original.height * self.settings.duplicate_scale),
        )
        self.duplicate_of[copy_path] = source_path

    def _plant_extra_link(self, index: int, extra: str) -> list[str]:
        """The extra image path of a listing chosen for a dead link or the non-image, if any."""
        paths = []
        if index in self.plan.dead:
            paths.append(extra)
            self.dead_links.append(extra)
        if index == self.plan.non_image_at:
            paths.append(extra)
            self.recipes[extra] = _PhotoRecipe("non_image")
            self.non_image = extra
        return paths


def build_catalog(
    seed: int = 0,
    n_listings: int = DEFAULT_N_LISTINGS,
    settings: CatalogSettings = DEFAULT_CATALOG_SETTINGS,
) -> DemoCatalog:
    """Listings and photo recipes for ``seed``; photos are drawn when first requested."""
    if n_listings < MIN_LISTINGS:
        raise ValueError(
            f"n_listings must be at least {MIN_LISTINGS} so that every planted defect has its "
            f"own listing, got {n_listings}"
        )
    rng = np.random.default_rng([seed, 0])
    body_types = [b for b, _ in settings.body_type_weights]
    unknown = set(body_types) - set(BODY_TYPES)
    if unknown:
        raise ValueError(f"settings.body_type_weights names unknown body types {sorted(unknown)}")
    weights = np.array([w for _, w in settings.body_type_weights])
    plan = _plan_defects(rng, n_listings, settings)
    builder = _CatalogBuilder(
        seed, settings, plan, body_types, weights / weights.sum(), [None] * n_listings
    )
    # Originals first, so that each copy can repeat its original's car.
    for index in sorted(range(n_listings), key=lambda i: i in plan.original_of):
        builder.add_listing(index)

    defects = DemoDefects(
        duplicate_of=builder.duplicate_of,
        dead_links=tuple(sorted(builder.dead_links)),
        non_image=builder.non_image,
        truncated=builder.truncated,
    )
    return DemoCatalog(
        seed=seed,
        listings=[listing for listing in builder.listings if listing is not None],
        truth=builder.truth,
        defects=defects,
        settings=settings,
        _recipes=builder.recipes,
    )
