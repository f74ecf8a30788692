"""docs/layout_frontier.py — the reward-realism frontier of docs/layout.md: every method over a range of tilt
strengths on PubLayNet, Alignment and Overlap against layout FID, one graft_layout.py run per point.

    python docs/layout_frontier.py                 # the whole sweep, 2 runs at a time (one thread each)
    python docs/layout_frontier.py --only pgraft   # one method's points
    python docs/layout_frontier.py --plot          # table and plot from the finished points only

A point is `python graft_layout.py <flags> --n_eval 5000 --out runs/layout_frontier/<name>`. A finished point
(its results.json exists) is not run again, so an interrupted sweep resumes. Tilt strengths: K/M in
{0.05, 0.1, 0.25, 0.5, 0.8} of M = 1,000 for GRAFT, P-GRAFT (n_i 0.25 / 0.5 / 0.75) and RP-GRAFT (n_i 0.25); DDPO
over learning rate x epochs. Two points are repeated with seeds 1 and 2, for the FID's seed spread. Writes
runs/layout_frontier/frontier.json, assets/layout_frontier.png and a markdown table on stdout.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "layout_frontier")
K_OVER_M = (0.05, 0.1, 0.25, 0.5, 0.8)
DDPO = ((1e-5, 2), (3e-5, 2), (1e-4, 2), (1e-4, 6), (3e-4, 6))             # (ddpo_lr, epochs)


def points():
    """{name: (method, tilt label, flags)} in the order they run."""
    pts = {}
    for method, flags in (("graft", ["--n_i", "0"]), ("pgraft_0.25", ["--n_i", "0.25"]),
                          ("pgraft_0.5", ["--n_i", "0.5"]), ("pgraft_0.75", ["--n_i", "0.75"]),
                          ("rpgraft_0.25", ["--n_i", "0.25", "--rp"])):
        for f in K_OVER_M:
            pts[f"{method}_K{int(f * 1000)}"] = (method, f"K/M {f}", flags + ["--K", str(int(f * 1000))])
    for lr, epochs in DDPO:
        pts[f"ddpo_lr{lr:g}_e{epochs}"] = ("ddpo", f"lr {lr:g}, {epochs} epochs",
                                           ["--algo", "ddpo", "--ddpo_lr", f"{lr:g}", "--rounds", str(epochs)])
    for seed in (1, 2):                                                       # the FID's seed spread
        for name in ("pgraft_0.25_K250", "graft_K250"):
            method, tilt, flags = pts[name]
            pts[f"{name}_seed{seed}"] = (method, tilt, flags + ["--seed", str(seed)])
    return pts


def run(name, flags):
    out = os.path.join(OUT, name)
    if os.path.exists(os.path.join(out, "results.json")):
        return name, "cached", 0.0
    t0 = time.time()
    cmd = [sys.executable, os.path.join(ROOT, "graft_layout.py"), *flags, "--n_eval", "5000", "--out", out]
    with open(os.path.join(OUT, f"{name}.log"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"))
    return name, "ok" if rc == 0 else f"failed (rc {rc}, see {name}.log)", time.time() - t0


def collect(pts):
    rows, ref = [], None
    for name, (method, tilt, flags) in pts.items():
        path = os.path.join(OUT, name, "results.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            r = json.load(f)
        m = {k: r["finetuned"]["metrics"][k]["mean"] for k in ("alignment_x100", "overlap", "fid")}
        ref = ref or {k: r["reference"]["metrics"][k]["mean"] for k in m}
        rows.append(dict(name=name, method=method, tilt=tilt, command="python graft_layout.py " + " ".join(
            flags + ["--n_eval", "5000"]), wall_s=r.get("wall_s"), grad_calls=r["compute"]["grad_calls"], **m))
    return rows, ref


def plot(rows, ref, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, metric, label in ((axes[0], "alignment_x100", "Alignment x100 (lower is better)"),
                              (axes[1], "overlap", "Overlap (lower is better)")):
        for i, m in enumerate(methods):
            main = [r for r in rows if r["method"] == m and "seed" not in r["name"]]
            seeds = [r for r in rows if r["method"] == m and "seed" in r["name"]]
            ax.plot([r[metric] for r in main], [r["fid"] for r in main], "o-", color=f"C{i}", label=m)
            ax.plot([r[metric] for r in seeds], [r["fid"] for r in seeds], "o", color=f"C{i}", alpha=0.35)
        ax.plot([ref[metric]], [ref["fid"]], "k*", ms=12, label="reference")
        for f in (1.25, 1.5, 2.0):
            ax.axhline(f * ref["fid"], color="grey", lw=0.6, ls=":")
        ax.set_xlabel(label), ax.set_ylabel("layout FID (5,000 samples)"), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("PubLayNet: reward against realism, one point per tilt strength (faint: seeds 1, 2)")
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="run only the points whose name starts with this")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--plot", action="store_true", help="only the table and plot of the finished points")
    args = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    pts = points()
    todo = {k: v for k, v in pts.items() if not args.only or k.startswith(args.only)}
    if not args.plot:
        t0 = time.time()
        print(run("reference", ["--eval_only"]))          # the 5,000-sample reference evaluation, cached once
        with ThreadPoolExecutor(args.jobs) as pool:
            for name, status, wall in pool.map(lambda kv: run(kv[0], kv[1][2]), todo.items()):
                print(f"{name}: {status}, {wall:.0f} s (sweep {time.time() - t0:.0f} s)", flush=True)
    rows, ref = collect(pts)
    if not rows:
        raise SystemExit("layout_frontier: no finished point yet")
    with open(os.path.join(OUT, "frontier.json"), "w") as f:
        json.dump({"reference": ref, "points": rows}, f, indent=1)
    plot(rows, ref, os.path.join(ROOT, "assets", "layout_frontier.png"))
    print("| point | Alignment x100 | Overlap | FID | FID / reference's | command |\n" + "| --- " * 6 + "|")
    print(f"| reference | {ref['alignment_x100']:.4f} | {ref['overlap']:.4f} | {ref['fid']:.3f} | 1.00 | |")
    for r in rows:
        seed = f" ({r['name'].split('_')[-1]})" if "seed" in r["name"] else ""
        print(f"| {r['method']}, {r['tilt']}{seed} | {r['alignment_x100']:.4f} | {r['overlap']:.4f} | "
              f"{r['fid']:.3f} | {r['fid'] / ref['fid']:.2f} | `{r['command']}` |")


if __name__ == "__main__":
    main()
