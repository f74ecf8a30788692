"""docs/noise_ceiling.py — how much an inverse-noise corrector could give on the shipped base flow, for the
tables of docs/noise_correction.md, "The ceiling".

    python docs/noise_ceiling.py --N 8             # the default sampler
    python docs/noise_ceiling.py --N 32            # where extra base steps have stopped paying

A perfect corrector samples exactly the noises that the base's N-step sampler T maps to data. Three FIDs (all
against the test split, with noise_correction.py's feature network) measure that:
  - base from N(0, I): what the sampler gives now (`--seeds` noise seeds; their spread is printed);
  - base from the inverse noises of held-out *test* images: T(T^-1(x)), a reconstruction of images that are
    part of the reference set itself, near the real-data floor if the round trip is exact;
  - base from the inverse noises of *training* images: a corrector that had learnt the training set's inverse
    noises perfectly. Its gap to the base from N(0, I) is what a corrector is chasing.
and the floor: `n` real training images against the test split. Alongside, a sliced Wasserstein distance
(`--projections` random unit directions, W2 of the sorted 1-D projections) between the held-out inverse
noises and (a) the training inverse noises (two samples of the same law: the statistic's floor), (b) N(0, I),
(c) the shipped corrector's samples for this N, if there is one. Inverse noises are cached in --out.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import noise_correction as nc  # noqa: E402
from image_features import feature_network, feature_stats, reference_stats, to_float, to_uint8  # noqa: E402


def sliced_w2(a, b, projections=256, seed=0):
    """Sliced Wasserstein-2 between two equal-size samples (n, D): sqrt of the mean over random unit
    directions of the 1-D W2^2 between the sorted projections."""
    d = torch.randn(a[0].numel(), projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)                                       # (D, P) unit directions
    pa, pb = (x.double().flatten(1) @ d for x in (a, b))                      # (n, P)
    return float(((pa.sort(0).values - pb.sort(0).values) ** 2).mean().sqrt())


def inverse_noises(args, base, images, name, device):
    """T^-1 of uint8 images (n, C, H, W) through the N-step sampler (noise_correction.invert, the same
    solver settings and jitter as its corrector data), cached in <out>/<name>_N<N>.pt; with round trip RMS."""
    path = os.path.join(args.out, f"{name}_N{args.N}_n{len(images)}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    gen, z, rt, t0 = torch.Generator().manual_seed(args.seed), [], [], time.time()
    for b in range(0, len(images), args.batch):
        x = to_float(images[b:b + args.batch])
        x = (x + args.nc.sigma * torch.randn(x.shape, generator=gen)).to(device)
        zb = nc.invert(base, x, args.N, args.nc.n_b, args.nc.tol, args.nc.anderson)[0]
        z.append(zb.cpu()), rt.append(nc.rms(nc.flow_sample(base, zb, args.N) - x).cpu())
        print(f"  {name}: {b + len(x)}/{len(images)} inverted, {time.time() - t0:.0f} s", flush=True)
    out = {"z": torch.cat(z), "roundtrip_rms": torch.cat(rt)}
    torch.save(out, path)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=8, help="the base sampler's steps")
    p.add_argument("--n", type=int, default=2000, help="images per FID (and per inverted set)")
    p.add_argument("--seeds", type=int, default=3, help="noise seeds of the base-from-N(0, I) FID")
    p.add_argument("--projections", type=int, default=256, help="directions of the sliced Wasserstein distance")
    p.add_argument("--batch", type=int, default=250, help="images per inversion batch")
    p.add_argument("--seed", type=int, default=0, help="which images, and the inversion's jitter")
    p.add_argument("--out", default="runs/noise_ceiling", help="cache of the inverse noises and results")
    args = p.parse_args()
    args.nc = nc.parse_args(["--N", str(args.N)])                # the solver and data settings of the script
    device, t0 = torch.device("cpu"), time.time()
    os.makedirs(args.out, exist_ok=True)
    base, cfg, _ = nc.load_flow(args.nc.ref, device, "base")
    data = nc.load_data(args.nc)
    feat, feat_name, feat_tag = feature_network(args.nc, data, device)
    ref = reference_stats(args.nc, data, feat, feat_tag)

    def fid(images_uint8):
        return common.frechet_distance(*feature_stats(feat, images_uint8, 500), *ref)

    def pick(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:args.n]
        return torch.stack([ds[int(i)][0] for i in idx])                       # (n, C, H, W) uint8

    test, train = pick(data["ref"]), pick(data["train"])
    shape = (cfg["in_ch"], cfg["image_size"], cfg["image_size"])
    rows = {"real training images (the floor)": [fid(train)]}
    noise = []
    for s in range(args.seeds):
        xi = torch.randn((args.n, *shape), generator=torch.Generator().manual_seed(1000 + s))
        noise.append(xi)
        rows.setdefault("base from N(0, I)", []).append(fid(to_uint8(nc.flow_sample(base, xi, args.N))))
    inv = {k: inverse_noises(args, base, v, k, device) for k, v in (("test", test), ("train", train))}
    for k, what in (("test", "base from held-out test images' inverse noises (reconstruction)"),
                    ("train", "base from training images' inverse noises (a perfect corrector)")):
        rows[what] = [fid(to_uint8(nc.flow_sample(base, inv[k]["z"], args.N)))]
    swd = {"training inverse noises (floor)": sliced_w2(inv["train"]["z"], inv["test"]["z"], args.projections),
           "N(0, I)": sliced_w2(noise[0], inv["test"]["z"], args.projections)}
    corrector = os.path.join(nc.HERE, "checkpoints", f"fmnist_flow_cpu_corrector_N{args.N}.pt")
    if os.path.exists(corrector):
        net = nc.load_flow(corrector, device, "corrector")[0]
        N_c = args.nc.N_c[-1]
        swd[f"the shipped corrector, N_c {N_c}"] = sliced_w2(nc.flow_sample(net, noise[0], N_c),
                                                             inv["test"]["z"], args.projections)
    print(f"\nN {args.N}, {args.n:,} images per FID, {feat_name}, {time.time() - t0:.0f} s")
    for k, v in rows.items():
        sd = f" ± {np.std(v, ddof=1):.2f} (std over {len(v)} seeds: {', '.join(f'{x:.2f}' for x in v)})" \
            if len(v) > 1 else ""
        print(f"  FID {np.mean(v):6.2f}{sd}  {k}")
    for k in inv:
        r = inv[k]["roundtrip_rms"]
        print(f"  round trip RMS |T(T^-1(x)) - x|, {k}: mean {r.mean():.4f}, max {r.max():.4f}")
    for k, v in swd.items():
        print(f"  sliced W2 to the held-out inverse noises: {v:.4f}  {k}")
    common.write_json(os.path.join(args.out, f"ceiling_N{args.N}.json"),
                      {"N": args.N, "n": args.n, "fid": rows, "sliced_w2": swd,
                       "roundtrip_rms": {k: [float(inv[k]["roundtrip_rms"].mean()),
                                             float(inv[k]["roundtrip_rms"].max())] for k in inv},
                       "command": "python docs/noise_ceiling.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
