"""Peak memory of building a probe's input frame (``embedstore.probe.data.feature_frame``), alone, in this process.

    python benchmarks/bench_frame_memory.py --store stores/isic2024_like.zarr --features mobilenet_v2-128px
    python benchmarks/bench_frame_memory.py --store stores/isic2024_like.zarr --features mobilenet_v2-128px \\
        --patient patient_id

Prints the resident memory before and after, and the process's peak (``ru_maxrss``), in MiB. Run each variant in a
new process: the peak is the process's. The metadata columns are the first seven of the ISIC 2024 recipe's.
"""

from __future__ import annotations

import argparse
import resource
import time

from embedstore.probe.data import common_ids, feature_frame
from embedstore.store import FeatureStore

METADATA = ["age_approx", "sex", "anatom_site_general", "clin_size_long_diam_mm", "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B"]


def resident_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--features", required=True)
    parser.add_argument("--patient", default=None, help="patient id column: build the patient context too")
    args = parser.parse_args()
    store = FeatureStore.open(args.store)
    keys = {args.features: store.resolve(args.features)}
    ids = common_ids(store, keys.values())
    before = resident_mib()
    t0 = time.perf_counter()
    _, _, _, context = feature_frame(store, keys, METADATA, ids, args.patient)
    print(f"before {before:.0f} MiB, after {resident_mib():.0f} MiB, peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, {time.perf_counter() - t0:.1f} s, "
          f"{len(context)} context columns")


if __name__ == "__main__":
    main()
