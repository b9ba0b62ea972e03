"""Clusters of duplicates: connected components of exact and near pairs, and their kept image.

Each cluster keeps its best member (most pixels, then the largest file, then the smallest URL,
so that ties are deterministic), and clusters are numbered largest first. Apart from the stage
because it is the one graph step: it needs only the image table and the verified pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def _cluster(images: pd.DataFrame, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Cluster label per image (exact sha256 groups joined by near ``pairs``) and whether kept.

    ``images`` has one row per URL with ``sha256, url, pixels, n_bytes``; ``pairs`` indexes the
    distinct sha256 values in order of first appearance in ``images``.
    """
    n = len(images)
    sha_codes, _ = pd.factorize(images["sha256"])
    # Graph over URLs: every URL is linked to the first URL with its sha256 (exact duplicates),
    # and the representatives of two distinct sha256 values are linked by a near pair.
    first_of_sha = pd.Series(np.arange(n)).groupby(sha_codes).transform("first").to_numpy()
    representative = np.asarray(pd.Series(np.arange(n)).groupby(sha_codes).first())
    rows = np.concatenate([np.arange(n), representative[pairs["i"].to_numpy()]])
    cols = np.concatenate([first_of_sha, representative[pairs["j"].to_numpy()]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Best member first: most pixels, then the largest file, then the smallest URL.
    ranking = images.assign(label=labels).sort_values(
        ["label", "pixels", "n_bytes", "url"], ascending=[True, False, False, True], kind="stable"
    )
    kept = np.zeros(n, dtype=bool)
    kept[ranking.drop_duplicates("label").index.to_numpy()] = True
    return labels, kept


def _relabel_by_size(labels: np.ndarray, kept_urls: pd.Series) -> np.ndarray:
    """Cluster ids 0.. ordered by size (largest first), ties by the kept image's URL."""
    frame = pd.DataFrame({"label": labels, "kept_url": kept_urls})
    summary = frame.groupby("label").agg(size=("label", "size"), url=("kept_url", "first"))
    summary = summary.sort_values(["size", "url"], ascending=[False, True], kind="stable")
    new_id = pd.Series(np.arange(len(summary)), index=summary.index)
    return new_id.loc[labels].to_numpy()
