"""Patient context: how each image stands among the other lesions of its patient (the "ugly duckling" signals
the ISIC 2024 solutions fed their gradient-boosted trees), as columns of the probe's frame.

For every row, from the rows of the same patient only:

- ``patient_images``: how many images the patient has;
- ``patient_distance.<set>`` (each feature set): the cosine distance of the image to the mean of the patient's
  *other* images (unit vectors), the outlier signal; NaN for a patient of one image;
- ``patient_rank.<set>``: its rank among the patient's images by that distance, as a fraction (1 = the most
  outlying), NaN for a patient of one image;
- ``patient_z.<column>`` (each numeric metadata column): the per-patient z-score of the column, NaN where the
  patient's values do not vary.

No label enters them and no row of another patient, so they are the same whichever fold a row is in, and at
prediction time they are computed the same way from the new store's rows: computing them once for the whole frame
leaks nothing. Rows without a patient id are patients of one image (:func:`patient_ids`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

# Rows of a feature set converted at a time. Each block holds a few float64 copies of its rows (selection,
# conversion, unit vectors): 4,096 x 1,280 keeps them near 170 MB, where 32,768 rows raised the ISIC 2024 recipe's
# peak at 401,059 rows by 1.3 GB (BENCHMARKS.md).
BLOCK_ROWS = 4_096
SHARED = "patient_images"


def patient_ids(values) -> np.ndarray:
    """Patient ids as text; a missing id becomes an id of its own (``\\0row<i>``): a patient of one image."""
    ids = pd.Series(values, dtype=object)
    missing = ids.isna().to_numpy()
    text = ids.astype(str).to_numpy(dtype=object)
    text[missing] = [f"\0row{i}" for i in np.flatnonzero(missing)]
    return text


def context_columns(sets: list[str], numeric_metadata: list[str]) -> list[str]:
    """The names of the context columns, in the order :func:`patient_context` makes them."""
    return ([SHARED] + [f"patient_{kind}.{name}" for name in sets for kind in ("distance", "rank")]
            + [f"patient_z.{column}" for column in numeric_metadata])


def columns_for(context: list[str], sets: list[str]) -> list[str]:
    """The context columns a head on feature sets ``sets`` reads: the shared ones and its own sets' distances
    and ranks, not those of the run's other feature sets."""
    own = {f"patient_{kind}.{name}" for name in sets for kind in ("distance", "rank")}
    return [c for c in context if c in own or not c.startswith(("patient_distance.", "patient_rank."))]


def patient_context(frame: pd.DataFrame, columns: dict[str, list[str]], patients, metadata: list[str]) -> pd.DataFrame:
    """The context columns (:func:`context_columns`) of every row of ``frame``: ``columns`` names each feature
    set's columns in it, ``patients`` each row's patient id (:func:`patient_ids`), ``metadata`` the metadata
    columns (the numeric ones get z-scores)."""
    code, _ = pd.factorize(pd.Series(patient_ids(patients)))
    count = np.bincount(code)[code].astype(float)
    out = {SHARED: count}
    for name, cols in columns.items():
        distance = _distance_to_the_others(frame, cols, code, count)
        out[f"patient_distance.{name}"] = distance
        out[f"patient_rank.{name}"] = _rank_within(distance, code, count)
    numeric = [c for c in metadata if pd.api.types.is_numeric_dtype(frame[c])]
    for column in numeric:
        values = frame[column].astype(float)
        by = values.groupby(code)
        mean, std = by.transform("mean").to_numpy(), by.transform("std", ddof=0).to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"patient_z.{column}"] = np.where(std > 0, (values.to_numpy() - mean) / std, np.nan)
    return pd.DataFrame(out, index=frame.index)[context_columns(list(columns), numeric)]


def _unit_rows(frame: pd.DataFrame, cols: list[str], start: int) -> np.ndarray:
    block = frame.iloc[start:start + BLOCK_ROWS][cols].to_numpy(np.float64)
    return block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)


def _distance_to_the_others(frame, cols, code, count) -> np.ndarray:
    """Cosine distance of each row's unit vector to the mean of its patient's other rows' unit vectors.

    Sums are kept only for patients of two or more images, and each block adds into the patients it holds, so
    memory is (such patients + one block) x dims, whatever the number of patients."""
    shared = count > 1
    slot = np.full(len(frame), -1)
    slot_of_patient, slot[shared] = np.unique(code[shared], return_inverse=True)[:2]
    sums = np.zeros((len(slot_of_patient), len(cols)))
    for start in range(0, len(frame), BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, len(frame)))
        keep = slot[rows] >= 0
        if keep.any():
            present, local = np.unique(slot[rows][keep], return_inverse=True)
            members = sp.csr_array((np.ones(int(keep.sum())), (local, np.arange(int(keep.sum())))),
                                   shape=(len(present), int(keep.sum())))
            sums[present] += members @ _unit_rows(frame, cols, start)[keep]
    distance = np.full(len(frame), np.nan)
    for start in range(0, len(frame), BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, len(frame)))
        keep = slot[rows] >= 0
        if not keep.any():
            continue
        unit = _unit_rows(frame, cols, start)[keep]
        others = sums[slot[rows][keep]] - unit
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = np.einsum("ij,ij->i", unit, others) / np.linalg.norm(others, axis=1)
        distance[rows[keep]] = 1.0 - cosine
    return distance


def _rank_within(distance: np.ndarray, code: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Each row's rank by ``distance`` among its patient's rows, divided by their number (1: the most distant)."""
    rank = pd.Series(distance).groupby(code).rank(method="average").to_numpy()
    return np.where(count > 1, rank / count, np.nan)
