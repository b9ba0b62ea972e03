"""Listing manifests: the table of image URLs, with listing metadata, that a scrape starts from."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from carmodels.errors import (
    ManifestError,
    MissingColumnError,
    MissingInputError,
    one_line,
)
from carmodels.scrape.urls import host_of, normalise_url

#: Candidate URL columns, in order of preference, when the caller does not name one.
DEFAULT_URL_COLUMNS: tuple[str, ...] = ("url", "src", "image_url", "image")
#: File suffixes understood by :func:`read_manifest`, by format.
MANIFEST_SUFFIXES: dict[str, tuple[str, ...]] = {
    "csv": (".csv", ".csv.gz"),
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".ndjson", ".jsonl.gz"),
}
#: How many of the busiest hosts :func:`manifest_summary` lists.
SUMMARY_TOP_HOSTS = 10

# The index column pandas writes with ``to_csv()`` and reads back as "Unnamed: 0".
_UNNAMED_INDEX = re.compile(r"^Unnamed: \d+$")


def normalise_column_name(name: object) -> str:
    """``Image-Type`` → ``image_type``: lower case, spaces and hyphens become underscores."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def _manifest_format(path: Path) -> str:
    name = path.name.lower()
    for file_format, suffixes in MANIFEST_SUFFIXES.items():
        if name.endswith(suffixes):
            return file_format
    known = ", ".join(s for suffixes in MANIFEST_SUFFIXES.values() for s in suffixes)
    raise ManifestError(f"manifest {path} has an unsupported suffix; use one of {known}")


def _read_table(path: Path) -> pd.DataFrame:
    file_format = _manifest_format(path)
    if not path.is_file():
        raise MissingInputError(
            f"manifest {path} does not exist (or is not a file); check the path"
        )
    if path.stat().st_size == 0:
        # pandas would say "No columns to parse from file", which hides what is wrong.
        raise ManifestError(f"manifest {path} has no rows (the file is empty); add image URLs")
    try:
        if file_format == "csv":
            return pd.read_csv(path)
        if file_format == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True)
    except OSError:
        raise  # unreadable for reasons of the file system (permissions, ...): its own message
    except Exception as error:  # each reader raises its own zoo of exceptions
        raise ManifestError(
            f"cannot read manifest {path} as {file_format} ({one_line(error)}); fix the file "
            f"or save it as valid {file_format}"
        ) from error


def _as_strings(column: pd.Series) -> pd.Series:
    """Metadata as nullable strings, with whole floats shown as integers (``2015`` not ``2015.0``).

    CSV readers turn an integer column with a gap into floats; writing those back as
    ``"2015.0"`` would be a surprise for every later stage.
    """
    if pd.api.types.is_float_dtype(column):
        finite = column.dropna()
        if (finite == finite.round()).all():
            column = column.astype("Int64")
    strings = column.map(lambda value: None if _is_missing(value) else str(value))
    return strings.astype("string")


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, arrays: present
        return False


def tidy_listing_frame(frame: pd.DataFrame, url_column: str) -> pd.DataFrame:
    """Normalise a listing table whose column names are already normalised.

    ``url`` first (normalised, invalid rows dropped, first row of each URL kept), every other
    column as nullable strings. Counts of what was dropped go into ``attrs``.
    """
    urls = frame[url_column].map(normalise_url)
    valid = urls.notna()
    kept = frame.loc[valid].drop(columns=[url_column])
    kept.insert(0, "url", urls[valid].astype("string"))
    duplicated = kept["url"].duplicated(keep="first")
    kept = kept.loc[~duplicated].reset_index(drop=True)
    for column in kept.columns[1:]:
        kept[column] = _as_strings(kept[column])
    kept.attrs = {
        "n_invalid_urls": int((~valid).sum()),
        "n_duplicate_urls": int(duplicated.sum()),
    }
    return kept


def read_manifest(
    path: str | os.PathLike[str],
    url_column: str | None = None,
    row_filter: str | None = None,
) -> pd.DataFrame:
    """Read a listing manifest (CSV, Parquet or JSONL) into one row per distinct image URL.

    Args:
        path: the manifest file; its suffix picks the reader.
        url_column: the column holding image URLs (as written in the file, or normalised);
            default: the first of ``url, src, image_url, image`` that is present.
        row_filter: a :meth:`pandas.DataFrame.query` string evaluated on the file's original
            columns before anything is dropped, e.g. ``"`image-type` != 'sample'"``.

    Returns:
        A DataFrame with a normalised ``url`` column first (``https://`` added when there is
        no scheme, whitespace stripped, rows without a usable URL dropped, the first row of
        each URL kept), then every other column as nullable strings under a normalised name
        (lower case, ``-`` and spaces → ``_``; the unnamed index column of a pandas CSV is
        dropped). ``attrs`` holds ``n_rows_read``, ``n_filtered_out``, ``n_invalid_urls`` and
        ``n_duplicate_urls``.

    Raises:
        MissingInputError: no such file.
        ManifestError: unsupported suffix, unreadable file, bad ``row_filter``, no rows, or
            no row with a usable URL.
        MissingColumnError: no URL column (a ``KeyError`` too).
    """
    path = Path(path)
    frame = _read_table(path)
    n_rows_read = len(frame)
    if n_rows_read == 0:
        # A scrape of nothing would "succeed" and leave every later stage without images.
        raise ManifestError(f"manifest {path} has no rows; add image URLs to it")
    if row_filter:
        try:
            frame = frame.query(row_filter)
        except Exception as error:  # query raises anything from SyntaxError to KeyError
            raise ManifestError(
                f"row_filter {row_filter!r} failed on manifest {path} (columns: "
                f"{list(frame.columns)}; quote names with hyphens in backticks): "
                f"{one_line(error)}"
            ) from error
    n_filtered_out = n_rows_read - len(frame)

    frame = frame.loc[:, [c for c in frame.columns if not _UNNAMED_INDEX.match(str(c))]]
    normalised = [normalise_column_name(c) for c in frame.columns]
    clashes = sorted({n for n in normalised if normalised.count(n) > 1})
    if clashes:
        raise ManifestError(
            f"manifest {path} has columns that collide after normalising names: {clashes}; "
            "rename one of each"
        )
    frame = frame.set_axis(normalised, axis="columns")

    column = _pick_url_column(frame, url_column, path)
    tidy = tidy_listing_frame(frame, column)
    tidy.attrs = {"n_rows_read": n_rows_read, "n_filtered_out": n_filtered_out, **tidy.attrs}
    if tidy.empty:
        raise ManifestError(
            f"manifest {path} has no usable image URLs: of {n_rows_read} rows, "
            f"{n_filtered_out} were filtered out and {tidy.attrs['n_invalid_urls']} have no "
            f"http(s) URL in column {column!r}; fix the filter or name the URL column"
        )
    return tidy


def _pick_url_column(frame: pd.DataFrame, url_column: str | None, path: Path) -> str:
    if url_column is not None:
        wanted = normalise_column_name(url_column)
        if wanted not in frame.columns:
            raise MissingColumnError(
                f"manifest {path} has no URL column {url_column!r}; columns found: "
                f"{list(frame.columns)}"
            )
        return wanted
    for candidate in DEFAULT_URL_COLUMNS:
        if candidate in frame.columns:
            return candidate
    raise MissingColumnError(
        f"manifest {path} has none of the URL columns {list(DEFAULT_URL_COLUMNS)}; columns "
        f"found: {list(frame.columns)}. Name it with --url-column (url_column=)."
    )


def manifest_summary(df: pd.DataFrame) -> dict[str, Any]:
    """Counts worth logging about a manifest: rows, distinct URLs and hosts, what was dropped."""
    if "url" not in df.columns:
        raise KeyError(f"a manifest needs a 'url' column; columns found: {list(df.columns)}")
    hosts = Counter(host_of(url) for url in df["url"].dropna())
    summary: dict[str, Any] = {
        "rows": len(df),
        "distinct_urls": int(df["url"].nunique()),
        "hosts": len(hosts),
        "top_hosts": dict(hosts.most_common(SUMMARY_TOP_HOSTS)),
    }
    for key in ("n_rows_read", "n_filtered_out", "n_invalid_urls", "n_duplicate_urls"):
        if key in df.attrs:
            summary[key.removeprefix("n_")] = int(df.attrs[key])
    return summary


def write_manifest(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a listing table atomically as Parquet (readable back with :func:`read_manifest`)."""
    import pyarrow as pa

    from carmodels.io import atomic_write_parquet

    if "url" not in df.columns:
        raise ValueError("write_manifest needs a table with a `url` column (from read_manifest)")
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    return atomic_write_parquet(path, table)
