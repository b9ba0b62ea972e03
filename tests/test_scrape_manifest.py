"""Manifest reading and URL hygiene (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from carmodels.scrape import manifest_summary, read_manifest
from carmodels.scrape.urls import normalise_url

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEED_MANIFEST = SHARED / "data" / "seed-manifest" / "final_data.csv"

ROWS = [
    {"Make": "AUDI", "Model": "A3", "src": "cdn.example.com/1.jpg?v=1", "image-type": "original"},
    {
        "Make": "BMW",
        "Model": "M3",
        "src": "  https://cdn.example.com/2.jpg ",
        "image-type": "sample",
    },
    {"Make": "AUDI", "Model": "A4", "src": "cdn.example.com/1.jpg?v=1", "image-type": "original"},
    {"Make": "KIA", "Model": "Rio", "src": "", "image-type": "original"},
    {"Make": "FIAT", "Model": "500", "src": "javascript:alert(1)", "image-type": "original"},
    {"Make": "SEAT", "Model": "Ibiza", "src": "http://other.example.org/3.png", "image-type": "x"},
]


def write_manifest(tmp_path: Path, suffix: str, rows: list[dict] = ROWS) -> Path:
    frame = pd.DataFrame(rows)
    path = tmp_path / f"manifest{suffix}"
    if suffix == ".csv":
        frame.to_csv(path)  # with pandas' unnamed index column, like the seed manifest
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_read_manifest_normalises_urls_columns_and_duplicates(tmp_path, suffix):
    df = read_manifest(write_manifest(tmp_path, suffix))

    assert list(df.columns) == ["url", "make", "model", "image_type"]
    assert df["url"].tolist() == [
        "https://cdn.example.com/1.jpg?v=1",
        "https://cdn.example.com/2.jpg",
        "http://other.example.org/3.png",
    ]
    assert df.loc[0, "model"] == "A3"  # the first row of a duplicated URL is kept
    assert df.attrs["n_invalid_urls"] == 2
    assert df.attrs["n_duplicate_urls"] == 1
    assert all(str(df[c].dtype) == "string" for c in df.columns)


def test_row_filter_uses_original_column_names(tmp_path):
    path = write_manifest(tmp_path, ".csv")
    df = read_manifest(path, row_filter="`image-type` != 'sample'")
    assert "https://cdn.example.com/2.jpg" not in set(df["url"])
    assert df.attrs["n_filtered_out"] == 1
    assert manifest_summary(df) == {
        "rows": 2,
        "distinct_urls": 2,
        "hosts": 2,
        "top_hosts": {"cdn.example.com": 1, "other.example.org": 1},
        "rows_read": 6,
        "filtered_out": 1,
        "invalid_urls": 2,
        "duplicate_urls": 1,
    }


def test_bad_row_filter_names_the_columns(tmp_path):
    with pytest.raises(ValueError, match="image-type"):
        read_manifest(write_manifest(tmp_path, ".csv"), row_filter="image-type == 'x'")


def test_explicit_url_column_and_integer_metadata(tmp_path):
    rows = [
        {"Photo URL": "a.example.com/x.jpg", "year": 2015.0},
        {"Photo URL": "b.example.com/y.jpg", "year": None},
    ]
    path = write_manifest(tmp_path, ".parquet", rows)
    df = read_manifest(path, url_column="Photo URL")
    assert df["url"].tolist() == ["https://a.example.com/x.jpg", "https://b.example.com/y.jpg"]
    assert df["year"].tolist()[0] == "2015"  # not "2015.0"
    assert pd.isna(df["year"].tolist()[1])


def test_missing_url_column_lists_columns_found(tmp_path):
    path = write_manifest(tmp_path, ".csv", [{"make": "AUDI", "link": "x.com/a.jpg"}])
    with pytest.raises(KeyError, match=r"columns found: \['make', 'link'\]"):
        read_manifest(path)
    with pytest.raises(KeyError, match="no URL column 'photo'"):
        read_manifest(path, url_column="photo")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")
    bad = tmp_path / "manifest.xlsx"
    bad.write_bytes(b"PK")
    with pytest.raises(ValueError, match="unsupported suffix"):
        read_manifest(bad)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot read manifest"):
        read_manifest(broken)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cdn.example.com/a.jpg", "https://cdn.example.com/a.jpg"),
        ("//cdn.example.com/a.jpg", "https://cdn.example.com/a.jpg"),
        ("HTTP://cdn.example.com/a.jpg#frag", "http://cdn.example.com/a.jpg"),
        ("localhost:8080/a.jpg", "https://localhost:8080/a.jpg"),
        ("http://[::1]:81/a.jpg", "http://[::1]:81/a.jpg"),
        ("ftp://cdn.example.com/a.jpg", None),
        ("data:image/png;base64,AAAA", None),
        ("cdn.example.com/a b.jpg", None),
        ("http://exa mple.com/", None),
        ("http://host:99999/a.jpg", None),
        ("   ", None),
        (None, None),
        (3.0, None),
    ],
)
def test_normalise_url(raw, expected):
    assert normalise_url(raw) == expected


@pytest.mark.skipif(
    not SEED_MANIFEST.is_file(), reason=f"shared seed manifest absent ({SEED_MANIFEST})"
)
def test_seed_manifest_loads_as_is():
    df = read_manifest(SEED_MANIFEST)
    summary = manifest_summary(df)
    assert summary["rows_read"] == 12_426
    assert summary["distinct_urls"] == summary["rows"] == 12_214
    assert summary["invalid_urls"] == 0
    assert df["url"].str.startswith("https://").all()
    assert list(df.columns) == [
        "url", "make", "model", "trim", "type", "price", "mileage", "year", "image_type"
    ]  # fmt: skip
    assert df.loc[0, "price"] == "22200"

    originals = read_manifest(SEED_MANIFEST, row_filter="`image-type` != 'sample'")
    assert set(originals["image_type"]) == {"original"}
    assert manifest_summary(originals)["filtered_out"] == 120
