"""`embedstore audit` on real HAM10000 images with planted duplicates: what it finds, the folds it checks, and how
probe and match use it (the leak line, --merge-near-duplicates)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embedstore.audit.find import MIN_SAME_GROUP_PAIRS, calibrate
from embedstore.audit.use import flagged_pairs, merge_groups
from embedstore.errors import ConfigError
from embedstore.layout import audit_folder

N_EXACT, N_REENCODED = 3, 3


@pytest.fixture(scope="module")
def planted(ham_root, ham_subset, tmp_path_factory):
    """A store of 200 real HAM10000 images plus planted missed duplicates: 3 byte-for-byte copies and 3 copies
    resized to 95% and re-encoded as JPEG (quality 80), each under a new image id and a new lesion id."""
    from embedstore import extract, open_source

    root = tmp_path_factory.mktemp("planted")
    images = root / "images"
    images.mkdir()
    rows = ham_subset.head(200).copy()
    for image_id in rows["image_id"]:
        shutil.copyfile(ham_root / "images" / f"{image_id}.jpg", images / f"{image_id}.jpg")
    singles = rows[rows["lesion_id"].map(rows["lesion_id"].value_counts()) == 1].iloc[:N_EXACT + N_REENCODED]
    planted_rows, originals = [], {}
    for k, (_, row) in enumerate(singles.iterrows()):
        exact = k < N_EXACT
        new_id = f"PLANT_{'X' if exact else 'N'}{k}"
        source = images / f"{row['image_id']}.jpg"
        if exact:
            shutil.copyfile(source, images / f"{new_id}.jpg")
        else:
            image = Image.open(source)
            image.resize((round(image.width * 0.95), round(image.height * 0.95))).save(images / f"{new_id}.jpg", quality=80)
        planted_rows.append(row.to_dict() | {"image_id": new_id, "lesion_id": f"PLANT_L{k}"})
        originals[new_id] = row["image_id"]
    table = pd.concat([rows, pd.DataFrame(planted_rows)], ignore_index=True)
    table.to_csv(root / "table.csv", index=False)
    store = root / "planted.zarr"
    assert extract(open_source(root / "table.csv", images=images, id_col="image_id"), "mobilenet_v2", store,
                   progress=False).n_failed == 0
    return store, originals


@pytest.fixture(scope="module")
def audited(planted, tmp_path_factory):
    """The audit of the planted store into its default folder (beside the store), through the CLI."""
    from typer.testing import CliRunner

    from embedstore.cli.app import app

    store, _ = planted
    result = CliRunner().invoke(app, ["audit", str(store), "-f", "mobilenet_v2", "-g", "lesion_id", "-t", "dx",
                                      "--folds", "3", "-q"])
    assert result.exit_code == 0, result.output
    return audit_folder(store) / "mobilenet_v2", result.output


def _pairs(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "pairs.csv", dtype={"id_a": str, "id_b": str})


def test_planted_duplicates_are_flagged_across_lesions(planted, audited):
    _, originals = planted
    folder, printed = audited
    pairs = _pairs(folder)
    by_ids = {frozenset(ids): pair for ids, (_, pair) in zip(zip(pairs["id_a"], pairs["id_b"]), pairs.iterrows())}
    run = json.loads((folder / "run.json").read_text())
    assert run["kind"] == "audit" and run["threshold_from"].startswith("calibrated")
    for new_id, original in originals.items():
        pair = by_ids[frozenset((new_id, original))]
        assert pair["cross_group"], new_id
        assert pair["exact"] == new_id.startswith("PLANT_X"), new_id
        assert pair["similarity"] >= run["threshold"] or pair["exact"]
    metrics = {k: v["value"] for k, v in json.loads((folder / "metrics.json").read_text())["metrics"].items()}
    assert metrics["n_flagged_pairs"] == len(pairs)
    assert metrics["n_exact_duplicate_pairs"] == int(pairs["exact"].sum()) >= N_EXACT
    assert metrics["n_cross_group_pairs"] == int(pairs["cross_group"].sum()) >= N_EXACT + N_REENCODED
    assert metrics["n_cross_fold_pairs"] == int(pairs["cross_fold"].sum())
    assert f"{metrics['n_cross_group_pairs']} across lesion_id" in printed
    clusters = pd.read_csv(folder / "clusters.csv", dtype={"id": str})
    cluster_of = clusters.set_index("id")["cluster"]
    for new_id, original in originals.items():
        assert cluster_of[new_id] == cluster_of[original]
    assert metrics["n_duplicate_clusters"] == clusters["cluster"].nunique()


def test_calibrated_threshold_is_the_lowest_at_the_stated_precision():
    rng = np.random.default_rng(0)
    sim = rng.uniform(0.5, 1.0, 4000)
    same = rng.uniform(size=4000) < (sim - 0.5) * 2  # more similar, more often one group
    exact = np.zeros(4000, bool)
    t = calibrate(sim, same, exact, 0.95)
    above = sim >= t.value
    assert same[above].mean() >= 0.95 and t.above == above.sum() and t.same_group == same[above].sum()
    lower = sim >= np.max(sim[sim < t.value])  # one more pair: the share falls below the precision
    assert same[lower].mean() < 0.95
    # Missed duplicates at the top (identical bytes, or more alike than any pair of one group) leave it as it was.
    copies = np.r_[sim, 1.0, 1.0, 0.9999], np.r_[same, False, False, False], np.r_[exact, True, True, False]
    assert calibrate(*copies, 0.95) == t
    # A cut inside a run of equal similarities would flag the whole run: the threshold ends one.
    tied = np.r_[np.ones(40), np.full(4, 0.99)], np.r_[np.ones(41, bool), np.zeros(3, bool)], np.zeros(44, bool)
    t = calibrate(*tied, 0.95)  # 41 of the first 41 pairs are of one group, but 41 of the 44 at or above 0.99
    assert t.value == 1.0 and t.above == 40 and tied[1][tied[0] >= t.value].mean() >= 0.95
    with pytest.raises(ConfigError, match="too few"):
        calibrate(sim[:30], np.r_[np.ones(MIN_SAME_GROUP_PAIRS - 1, bool), np.zeros(11, bool)], exact[:30], 0.99)


def test_audit_folds_are_the_folds_the_probe_makes(planted, audited, cli, tmp_path):
    store, _ = planted
    folder, _ = audited
    code, out, err = cli("probe", store, "-f", "mobilenet_v2", "-t", "dx", "-g", "lesion_id", "--folds", "3",
                         "--n-boot", "0", "--no-report", "-o", tmp_path / "probe")
    assert code == 0, err
    fold = pd.read_parquet(tmp_path / "probe" / "predictions.parquet").set_index("id")["fold"]
    near = pd.read_csv(folder / "nearest_pairs.csv", dtype={"id_a": str, "id_b": str})
    assert len(near) > 0
    assert (near["fold_a"].to_numpy() == fold[near["id_a"]].to_numpy()).all()
    assert (near["fold_b"].to_numpy() == fold[near["id_b"]].to_numpy()).all()
    pairs = _pairs(folder)
    straddling = int((fold[pairs["id_a"]].to_numpy() != fold[pairs["id_b"]].to_numpy()).sum())
    assert straddling == int(pairs["cross_fold"].sum()) > 0
    record = json.loads((tmp_path / "probe" / "run.json").read_text())
    assert record["leakage"]["straddling"] == straddling and record["leakage"]["flagged"] == len(pairs)
    assert f"of its {len(pairs)} flagged near-duplicate pairs in this run, {straddling} straddle its folds" in out
    assert f"--merge-near-duplicates {folder}" in out


def test_merge_keeps_every_flagged_pair_in_one_fold(planted, audited, cli, tmp_path):
    store, _ = planted
    folder, _ = audited
    code, out, err = cli("probe", store, "-f", "mobilenet_v2", "-t", "dx", "-g", "lesion_id", "--folds", "3",
                         "--n-boot", "0", "--merge-near-duplicates", folder, "-o", tmp_path / "merged")
    assert code == 0, err
    fold = pd.read_parquet(tmp_path / "merged" / "predictions.parquet").set_index("id")["fold"]
    pairs = _pairs(folder)
    assert (fold[pairs["id_a"]].to_numpy() == fold[pairs["id_b"]].to_numpy()).all()
    record = json.loads((tmp_path / "merged" / "run.json").read_text())
    merged = record["merged_groups"]
    assert merged["pairs"] == len(pairs) and merged["groups_after"] == merged["groups_before"] - (
        merged["groups_merged"] - merged["groups_formed"])
    assert record["leakage"]["straddling"] == 0 and "none of its" in out and "merged near-duplicates" in out
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "merged near-duplicates" in report and "none of its" in report


def test_a_threshold_merges_the_runs_own_near_duplicates(planted, cli, tmp_path):
    store, originals = planted
    code, out, err = cli("probe", store, "-f", "mobilenet_v2", "-t", "dx", "-g", "lesion_id", "--folds", "3",
                         "--n-boot", "0", "--no-report", "--merge-near-duplicates", "0.97", "-o", tmp_path / "t")
    assert code == 0, err
    record = json.loads((tmp_path / "t" / "run.json").read_text())
    assert record["merged_groups"]["audit"] == "cosine >= 0.97" and "cosine >= 0.97" in out
    fold = pd.read_parquet(tmp_path / "t" / "predictions.parquet").set_index("id")["fold"]
    for new_id, original in originals.items():  # the copies and re-encodings are far above 0.97
        assert fold[new_id] == fold[original]
    code, _, err = cli("probe", store, "-f", "mobilenet_v2", "-t", "dx", "--merge-near-duplicates", "1.5",
                       "-o", tmp_path / "u")
    assert code == 2 and "(-1, 1]" in err


def test_match_merges_only_for_its_folds(planted, audited, cli, tmp_path):
    store, _ = planted
    folder, _ = audited
    code, out, err = cli("match", store, "-f", "mobilenet_v2", "-g", "lesion_id", "--folds", "3", "--n-boot", "0",
                         "--min-group-size", "1", "--merge-near-duplicates", folder, "--no-report", "-o", tmp_path / "m")
    assert code == 0, err
    clusters = pd.read_csv(tmp_path / "m" / "clusters.csv", dtype={"id": str}).set_index("id")
    pairs = _pairs(folder)
    assert (clusters.loc[pairs["id_a"], "fold"].to_numpy() == clusters.loc[pairs["id_b"], "fold"].to_numpy()).all()
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())["metrics"]
    assert metrics["n_groups_true"]["value"] == clusters["group"].nunique()  # the truth keeps its lesion ids
    assert "none of its" in out


def test_merge_groups_joins_groups_through_chains_of_pairs(planted, audited):
    store, _ = planted
    folder, _ = audited
    pairs = _pairs(folder)
    ids = np.array(sorted(set(pairs["id_a"]) | set(pairs["id_b"]) | {"lonely"}))
    groups = np.array([f"g{i}" for i in range(len(ids))])
    merged, summary = merge_groups(flagged_pairs(folder, store), str(folder), ids, groups)
    assert merged[list(ids).index("lonely")] == groups[list(ids).index("lonely")]
    position = {i: k for k, i in enumerate(ids)}
    for a, b in zip(pairs["id_a"], pairs["id_b"]):
        assert merged[position[a]] == merged[position[b]]
    assert summary.groups_after == len(set(merged)) and summary.groups_before == len(ids)
    # Pairs across a fixed split (a split column's train and test rows) are left as they are, and counted.
    fixed = (ids == pairs["id_a"].iloc[0]).astype(int)
    _, split_summary = merge_groups(flagged_pairs(folder, store), str(folder), ids, groups, fixed)
    assert split_summary.pairs_across_split >= 1 and split_summary.pairs == summary.pairs - split_summary.pairs_across_split
    with pytest.raises(ConfigError, match="audits the store"):
        flagged_pairs(folder, store.with_name("elsewhere.zarr"))


def test_ids_that_look_like_numbers_stay_text(planted, audited, tmp_path):
    store, _ = planted
    folder, _ = audited
    copy = tmp_path / "audit"
    shutil.copytree(folder, copy)
    pairs = _pairs(copy)
    renamed = {i: f"{k:04d}" for k, i in enumerate(sorted(set(pairs["id_a"]) | set(pairs["id_b"])))}
    pairs.assign(id_a=pairs["id_a"].map(renamed), id_b=pairs["id_b"].map(renamed)).to_csv(copy / "pairs.csv", index=False)
    ids = np.array(sorted(renamed.values()))
    merged, summary = merge_groups(flagged_pairs(copy, store), str(copy), ids, None)
    assert summary.pairs == len(pairs) and len(set(merged)) < len(ids)


def test_report_shows_the_counts_the_histogram_and_the_pair_sheets(audited):
    folder, _ = audited
    text = (folder / "report.md").read_text()
    for heading in ("Headline metrics", "Similarity of same-group and different-group pairs",
                    "Most similar pairs of two lesion_id groups", "Most similar pairs in two folds",
                    "Suspected duplicate clusters"):
        assert heading in text
    for figure in ("similarity", "pairs_cross_group", "pairs_cross_fold"):
        assert (folder / "figures" / f"{figure}.png").stat().st_size > 10_000
    assert "PLANT_" in text  # the clusters table lists the planted copies


def test_mistakes_end_in_one_line(planted, audited, cli, tmp_path):
    store, _ = planted
    folder, _ = audited
    code, _, err = cli("audit", store, "-f", "mobilenet_v2", "-o", tmp_path / "a")
    assert code == 2 and "--groups" in err and "--threshold" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    code, _, err = cli("audit", store, "-f", "mobilenet_v2", "--threshold", "1.5", "-o", tmp_path / "a")
    assert code == 2 and "(-1, 1]" in err
    code, _, err = cli("probe", store, "-f", "mobilenet_v2", "-t", "dx", "--merge-near-duplicates", tmp_path,
                       "-o", tmp_path / "p")
    assert code == 2 and "not a run folder" in err
    recipe = tmp_path / "audit.yaml"
    recipe.write_text(f"merge_near_duplicates: {folder}\n")
    code, _, err = cli("audit", store, "-c", recipe, "-f", "mobilenet_v2", "-g", "lesion_id", "-o", tmp_path / "a")
    assert code == 2 and "not to an audit" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()
