"""Time the Chinchilla grid fit and bootstrap of jdistill.scaling.

  python benchmarks/bench_scaling.py [--all_starts] [--n_boot=1000] [--repeats=3]

Prints one JSON line per measurement (best and median of --repeats wall times).
--all_starts also times L-BFGS-B from every one of the 4500 grid starts (slow).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdistill.data import io as data_lib  # noqa: E402
from jdistill import scaling as sc

DATA = data_lib.data_root() / "scaling"


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times), statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--all_starts", action="store_true")
    ap.add_argument("--n_boot", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    x, y = sc.load_chinchilla_epoch(DATA / "chinchilla_epoch_svg_extracted.csv")
    law = sc.LAWS["chinchilla"]
    starts = sc.grid_starts(law)

    def report(name, out, best, med, **extra):
        print(json.dumps({"bench": name, "best_s": round(best, 3), "median_s": round(med, 3),
                          "loadavg_1m": os.getloadavg()[0], **extra}), flush=True)

    _, b, m = timed(lambda: sc.grid_objectives(law, x, y, starts), args.repeats)
    report("grid_objective_4500_starts", None, b, m)
    for refine in (16, 64):
        res, b, m = timed(lambda: sc.fit(law, x, y, refine=refine), args.repeats)
        report(f"fit_grid4500_refine{refine}", res, b, m, params=res.params,
               objective=res.objective)
    if args.all_starts:
        res, b, m = timed(lambda: sc.fit(law, x, y, refine=None), 1)
        report("fit_grid4500_lbfgs_from_all", res, b, m, params=res.params,
               objective=res.objective)
    res = sc.fit(law, x, y)
    boot, b, m = timed(lambda: sc.bootstrap(res, x, y, n_boot=args.n_boot, seed=0),
                       max(1, args.repeats - 2))
    report(f"bootstrap_{args.n_boot}", boot, b, m, intervals=boot.intervals())


if __name__ == "__main__":
    main()
