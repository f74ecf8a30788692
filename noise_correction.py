"""noise_correction.py — inverse noise correction for flow models (arXiv 2510.02692; docs/method.md §5), FID
at matched FLOPs.

    python noise_correction.py                      # FID vs FLOPs/image: base at several N, corrected sampler
    python noise_correction.py --pretrain           # pre-train the base rectified flow (resumable)
    python noise_correction.py --train_corrector    # invert the training set through T, train the corrector
    python noise_correction.py --eval_only          # the base sampler's FID-vs-FLOPs curve only
    python noise_correction.py --N_c 2,4,8          # several corrector step counts, each against its base N'
    python noise_correction.py --preset paper --data celeba_hq/ \
        --inception pt_inception-2015-12-05-6726825d.pth --device cuda --amp  # close to the paper's setting

A pixel-space rectified flow (t = 0 noise, t = 1 data) is sampled by forward Euler with N steps: that map T is
the deployed sampler. Each training image x is pulled back through exactly T (backward Euler, a fixed point
solved with Anderson mixing), which gives the noise T would need to produce x: the *inverse noise*. A small
corrector flow learns to sample those noises from N(0, I); corrector then base is a sampler whose errors the
inversion has accounted for.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from image_features import (FolderImages, feature_network, feature_stats, load_fashion_mnist, plot_fid_flops,
                            plot_side_by_side, reference_stats, to_float, to_uint8)
from pretraining import train_resumable
from unet import UNet

# -- config --------------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_REF = os.path.join(HERE, "checkpoints", "fmnist_flow_cpu.pt")
DEFAULT_CLASSIFIER = os.path.join(HERE, "checkpoints", "fmnist_classifier.pt")

PRESETS = {
    # Fashion-MNIST (28x28 padded to 32x32). Sized for 2 CPU cores [ours, measured]: 0.64M parameters and
    # 1.8e8 FLOPs per forward (3.6 ms per image on one core), so the default evaluation (2,000 samples x 3
    # seeds for the base at N = 2, 4, 8, the FLOPs-matched 11, and the corrected 8 + 8) takes about 15
    # minutes.
    # N = 8 [ours]: few enough steps to leave a discretisation error for the corrector to remove, with h = 1/8
    # for the inversion's h L < 1 (the paper: N = 200 at 256x256). At N = 32, where the base's FID has
    # flattened, the corrector made FID worse (README, "Many steps").
    # n_invert 5,000 [ours, measured]: inverting costs ~0.3 s per image on one core, mostly in the last step
    # (t = 7/8 -> 1), where h v(z) = E[x_1 | z] - z has slow directions: every image there runs to n_b.
    "cpu": dict(image_size=32, ch=16, ch_mult="1,2,4", n_res=1, attn_res="", N=8, N_c=8, base_steps="2,4,8",
                train_steps=20_000, batch_size=128, lr=3e-4, ema_decay=0.9995, n_invert=5_000, n_b=30,
                tol=1e-4, corrector_steps=10_000, n_eval=2000, fid_seeds=3, sample_batch=500),
    # the paper's sizes: a 64.0M-parameter base (DDPM's 256x256 UNet at width 96) and a 16.0M corrector
    # (width 48). Pixel space: 2.8e11 FLOPs per forward, where the paper's 1.374e12 per 200 steps implies a
    # latent-space model.
    "paper": dict(image_size=256, ch=96, ch_mult="1,1,2,2,4,4", n_res=2, attn_res="16", N=200, N_c=200,
                  base_steps="100,200,300,400", train_steps=500_000, batch_size=64, lr=2e-4, ema_decay=0.9999,
                  n_invert=30_000, n_b=10, tol=1e-5, corrector_steps=200_000, n_eval=10_000, fid_seeds=1,
                  sample_batch=100),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="cpu", help="size and budget preset; flags below override it")
    # what to run
    a("--pretrain", action="store_true", help="pre-train the base rectified flow (resumable) and stop")
    a("--train_corrector", action="store_true",
      help="invert the training set and train the corrector, then stop")
    a("--eval_only", action="store_true", help="evaluate the base sampler only (no corrector)")
    a("--ref", default=DEFAULT_REF, help="base checkpoint: a path or hf:org/repo/file")
    a("--corrector", default=None, help="corrector checkpoint (trained here if missing; default: beside the "
      "default base checkpoint, else <out>/corrector_N<N>.pt)")
    a("--out", default=None,
      help="output folder (default runs/noise_correction or runs/noise_pretrain_<preset>)")
    # data
    a("--data", default="fashion-mnist", help="'fashion-mnist' or a folder of images (searched recursively)")
    a("--image_size", type=int, help="training resolution of folder images (Fashion-MNIST is padded to 32)")
    a("--data_root", default=os.path.join(HERE, ".cache", "fashion_mnist"),
      help="torchvision's Fashion-MNIST folder")
    a("--cache_dir", default=os.path.join(HERE, ".cache", "noise_correction"),
      help="FID reference statistics cache")
    a("--download", action="store_true",
      help="let torchvision download Fashion-MNIST into --data_root (internet)")
    a("--workers", type=int, default=0, help="data-loader workers for folder images")
    # model (must match the checkpoint when loading one)
    a("--ch", type=int, help="UNet base width")
    a("--ch_mult", help="UNet width multipliers per resolution, comma-separated")
    a("--n_res", type=int, help="residual blocks per resolution")
    a("--attn_res",
      help="resolutions with self-attention, comma-separated ('' for none; the middle always has one)")
    a("--corrector_width", type=float, default=0.5,
      help="corrector width / base width (0.5 gives ~1/4 parameters)")
    a("--plain_corrector", action="store_true", help="the paper's corrector: plain Euler on the whole "
      "learned field, without our exactly integrated diagonal-Gaussian part (accurate only with many steps)")
    # sampler, inversion (docs/method.md §5)
    a("--N", type=int, help="base Euler steps, h = 1/N; the corrector is trained for this N")
    a("--N_c", help="corrector steps, comma-separated for several corrected samplers (each with its "
      "FLOPs-matched base N')")
    a("--base_steps", help="base step counts for the FID-vs-FLOPs curve (the FLOPs-matched N' is added)")
    a("--n_b", type=int, help="fixed-point iterations per backward-Euler step")
    a("--anderson", type=int, default=5, help="Anderson mixing over this many past iterates in the "
      "backward-Euler solve (0: the paper's plain fixed-point iteration, which stalls in the last step; "
      "README)")
    a("--tol", type=float,
      help="stop iterating when every residual |z + h v(z) - y| (RMS per pixel) is below it")
    a("--sigma", type=float, default=0.0,
      help="Gaussian jitter on the data before inversion (the paper: 1e-3)")
    a("--n_invert", type=int,
      help="training images to invert (a seeded subset when fewer than the training set)")
    a("--drop_residual", type=float, default=1e-2, help="drop inverse noises whose residual stays above this "
      "(a non-converged solve), so they do not train the corrector")
    # training
    a("--batch_size", type=int, help="images per training step (base and corrector)")
    a("--lr", type=float, help="Adam learning rate (base and corrector)")
    a("--ema_decay", type=float, help="EMA decay of the weights used for sampling")
    a("--train_steps", type=int, help="base pre-training steps in total (resumable)")
    a("--corrector_steps", type=int, help="corrector training steps (resumable)")
    a("--max_minutes", type=float, default=None,
      help="stop training / inverting after this many minutes (resume later)")
    # evaluation (docs/method.md §6)
    a("--n_eval", type=int, help="generated images per FID")
    a("--fid_seeds", type=int, help="FIDs per sampler, each from its own noise seed: the spread is reported")
    a("--inception", default=None,
      help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth: use standard FID")
    a("--classifier", default=DEFAULT_CLASSIFIER,
      help="Fashion-MNIST feature network (trained once if missing)")
    a("--classifier_epochs", type=float, default=2.0, help="epochs when the feature network must be trained")
    a("--n_ref", type=int, default=50_000,
      help="at most this many real images for the FID reference statistics")
    # runtime
    a("--seed", type=int, default=0, help="seed: a CPU run is reproducible")
    a("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    a("--amp", action="store_true",
      help="bf16 autocast for training and sampling (GPU); inversion stays float32")
    a("--compile", action="store_true", help="torch.compile the network")
    a("--sample_batch", type=int, help="images per sampler / inversion batch")
    return p


def _ints(p, name, text):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"--{name} must be comma-separated integers, got {text!r}")
    if any(v <= 0 for v in vals):
        p.error(f"--{name} must hold positive integers, got {text!r}")
    return vals


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    unset = {k: v for k, v in PRESETS[args.preset].items() if getattr(args, k) is None}
    vars(args).update(unset)                                   # flags left unset take the preset's values
    if sum([args.pretrain, args.train_corrector, args.eval_only]) > 1:
        p.error("choose at most one of --pretrain, --train_corrector, --eval_only")
    for k in ("ch", "n_res", "N", "n_b", "n_invert", "batch_size", "fid_seeds", "sample_batch", "n_ref",
              "image_size", "max_minutes"):
        if getattr(args, k) is not None and not getattr(args, k) > 0:
            p.error(f"--{k} must be positive, got {getattr(args, k)}")
    for k in ("train_steps", "corrector_steps", "workers", "anderson", "tol", "sigma", "drop_residual", "lr"):
        if not getattr(args, k) >= 0:
            p.error(f"--{k} must be >= 0, got {getattr(args, k)}")
    for k, lo, hi in (("ema_decay", 0, 0.999999), ("corrector_width", 1e-6, 1), ("n_eval", 2, float("inf"))):
        if not lo <= getattr(args, k) <= hi:
            p.error(f"--{k} must be in [{lo}, {hi}], got {getattr(args, k)}")
    args.ch_mult = tuple(_ints(p, "ch_mult", args.ch_mult))
    args.attn_res = tuple(_ints(p, "attn_res", args.attn_res))
    args.base_steps = sorted(set(_ints(p, "base_steps", args.base_steps)))
    args.N_c = sorted(set(_ints(p, "N_c", str(args.N_c))))
    if not args.N_c:
        p.error("--N_c needs at least one step count")
    if not args.ch_mult:
        p.error("--ch_mult needs at least one level")
    args.fmnist = args.data == "fashion-mnist"
    if args.fmnist and args.image_size != 32:
        p.error("Fashion-MNIST is trained at 32x32 (28x28 padded): use --preset cpu without --image_size, or "
                "--data DIR")
    if not args.fmnist and not os.path.isdir(args.data):
        p.error(f"--data {args.data!r} is neither 'fashion-mnist' nor a folder")
    if args.image_size % 2 ** (len(args.ch_mult) - 1):
        p.error(f"--image_size {args.image_size} must be divisible by 2^{len(args.ch_mult) - 1} (the UNet's "
                f"levels)")
    if args.inception is not None and not os.path.isfile(args.inception):
        p.error(f"--inception {args.inception!r} does not exist")
    if not args.fmnist and args.inception is None and not (args.pretrain or args.train_corrector):
        p.error("FID on a folder of images needs --inception PATH (pytorch-fid's Inception weights)")
    args.h = 1 / args.N
    return args


def model_config(args, in_ch):
    """What a base checkpoint must record to be rebuilt."""
    return dict(in_ch=in_ch, image_size=args.image_size, ch=args.ch, ch_mult=list(args.ch_mult),
                n_res=args.n_res, attn_res=list(args.attn_res), gauss_skip=False)


def corrector_config(base_cfg, width, plain):
    """The corrector: the base UNet at `width` times the channels (parameters scale as width^2: 0.5 gives
    ~1/4)."""
    return dict(base_cfg, ch=max(4, round(base_cfg["ch"] * width)), gauss_skip=not plain)


# -- data ----------------------------------------------------------------------------------------------------

def load_data(args):
    """{'train': Dataset of (uint8 (C, H, W),), 'ref': the FID reference set, 'ref_name', 'labels',
    'channels'}: Fashion-MNIST's splits or a folder of images (image_features.py reads both)."""
    if args.fmnist:
        d = load_fashion_mnist(args.data_root, args.download)
        return {"train": torch.utils.data.TensorDataset(d["train"][0]),
                "ref": torch.utils.data.TensorDataset(d["test"][0]),
                "ref_name": "Fashion-MNIST test split, 10,000 images", "labels": d, "channels": 1}
    ds = FolderImages(args.data, args.image_size)
    return {"train": ds, "ref": ds, "ref_name": f"{args.data} ({min(len(ds), args.n_ref):,} images)",
            "labels": None, "channels": 3}


# -- model: the UNet (unet.py: DDPM's architecture) ----------------------------------------------------------

def build_model(cfg):
    return UNet(**cfg)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def load_flow(ref, device, what):
    """(EMA net, cfg, meta) of a checkpoint written by this script; any problem exits with one line."""
    try:
        ckpt = common.load_checkpoint(ref)
        cfg = ckpt["config"].get("model")
        if not isinstance(cfg, dict):
            raise common.CheckpointError(f"{ref!r} has no model config; is it a {what} checkpoint of this "
                                         f"script?")
        try:
            net = build_model(cfg)
        except TypeError as e:
            raise common.CheckpointError(f"{ref!r} has a model config this script cannot build "
                                         f"({e})") from None
        sd = ckpt["state_dicts"].get("ema") or ckpt["state_dicts"].get("model")
        if not isinstance(sd, dict):
            raise common.CheckpointError(f"{ref!r} has no 'ema' or 'model' weights")
        common.load_state(net, sd, f"{what} checkpoint {ref!r}")
    except common.CheckpointError as e:
        hint = ("; pre-train it (python noise_correction.py --pretrain, then copy "
                "runs/noise_pretrain_cpu/ref_ema.pt there) or pass --ref" if ref == DEFAULT_REF else "")
        raise SystemExit(f"noise_correction: {e}{hint}")
    return net.to(device).eval().requires_grad_(False), cfg, ckpt


# -- flow: rectified-flow loss, forward Euler (the sampler T), backward-Euler inversion (docs/method.md §5) --

def gauss_sigma(net, t):
    """sigma_t = sqrt(t^2 s^2 + (1-t)^2) per pixel: the std of x_t - t mu on the rectified flow from N(0, I)
    to the corrector's diagonal-Gaussian fit N(mu, diag s^2) of the inverse noises [ours]."""
    t = t.view(-1, 1, 1, 1) if torch.is_tensor(t) else t
    return (t * t * net.g_var + (1 - t) ** 2).sqrt()


def velocity(net, x, t):
    """v(x, t). A gauss_skip net (the corrector [ours]) adds the closed-form velocity of the rectified flow
    between N(0, I) and N(mu, diag s^2), mu + a(t) (x - t mu) with a(t) = (t s^2 - (1 - t)) / sigma_t^2, to
    its output."""
    v = net(x, t)
    if not net.gauss_skip:
        return v
    t4 = t.view(-1, 1, 1, 1)
    return v + net.g_mu + (t4 * net.g_var - (1 - t4)) / gauss_sigma(net, t) ** 2 * (x - t4 * net.g_mu)


def rf_loss(net, x1, gen=None):
    """docs/method.md §5: x_t = t x_1 + (1 - t) x_0 with x_0 ~ N(0, I), target velocity x_1 - x_0,
    t ~ U(0, 1)."""
    B = x1.shape[0]
    x0 = torch.randn(x1.shape, generator=gen).to(x1.device)
    t = torch.rand(B, generator=gen).to(x1.device)
    xt = t.view(B, 1, 1, 1) * x1 + (1 - t.view(B, 1, 1, 1)) * x0                          # (B, C, H, W)
    return F.mse_loss(velocity(net, xt, t), x1 - x0)


@torch.no_grad()
def flow_sample(net, x, N, amp=False):
    """Forward Euler, N steps from t = 0: x_{(j+1)h} = x_{jh} + h v(x_{jh}, jh) (T, the deployed sampler).
    A gauss_skip net integrates its Gaussian part exactly, x_t - t mu scaling as sigma_t, and its learned
    residual by Euler (an exponential integrator [ours]): a corrector whose target is Gaussian is then exact
    at any N_c, where plain Euler distorts it (N(0, I) -> N(0, I) shrinks by 0.72 in scale at 4 steps)."""
    h = 1.0 / N
    for j in range(N):
        t = torch.full((x.shape[0],), j * h, device=x.device, dtype=x.dtype)
        with common.autocast(x.device, amp):
            v = net(x, t).to(x.dtype)
        if net.gauss_skip:
            mu, scale = net.g_mu, gauss_sigma(net, (j + 1) * h) / gauss_sigma(net, j * h)
            x = (j + 1) * h * mu + (x - j * h * mu) * scale + h * v
        else:
            x = x + h * v
    return x


def rms(x):
    return x.flatten(1).pow(2).mean(1).sqrt()                                          # (B,) RMS per pixel


def anderson_mix(Zh, Gh, idx, k, z, g):
    """Anderson mixing (type II; Walker & Ni 2011) for the fixed point z = g(z) [ours]: store iterate k's
    (z, g(z)) in a ring of the last m, return sum_i a_i g_i with the weights (sum a_i = 1) that minimise
    |sum_i a_i (g_i - z_i)|, per sample. It converges where plain iteration stalls because h L is close to or
    above 1 (slow directions)."""
    m, n = Zh.shape[1], min(k + 1, Zh.shape[1])
    Zh[idx, k % m], Gh[idx, k % m] = z.flatten(1), g.flatten(1)
    Fr = Gh[idx, :n] - Zh[idx, :n]                                                     # (b, n, D) residuals
    H = (Fr @ Fr.transpose(1, 2)).double()                                             # (b, n, n) Gram matrix
    eye = torch.eye(n, dtype=H.dtype, device=H.device)  # made on the device: this runs every iteration
    H = H + (1e-8 * H.diagonal(dim1=1, dim2=2).mean(1) + 1e-30).view(-1, 1, 1) * eye  # Tikhonov, relative
    a = torch.linalg.solve(H, torch.ones(len(idx), n, 1, dtype=H.dtype, device=H.device))
    a = (a / a.sum(1, keepdim=True)).to(g.dtype)                                       # (b, n, 1)
    return (a.transpose(1, 2) @ Gh[idx, :n]).view_as(g)


@torch.no_grad()
def invert(net, x, N, n_b, tol, anderson=5, keep_states=False):
    """The exact preimage of x under T (docs/method.md §5, the paper's indexing): y = x; for j = N-1 .. 0
    solve z + h v(z, jh) = y, the fixed point of g(z) = y - h v(z, jh), by at most n_b updates or until
    RMS(z + h v(z, jh) - y) <= tol; y = z.
    Plain iteration z <- g(z) (anderson = 0, the paper's) needs h L < 1; Anderson mixing [ours] also solves
    the last step, where h v(z) = E[x_1 | z] - z has slow directions that stall it (README). Always float32.
    Warm start [ours]: z = y - h v(y, (j+1)h), as close as the first update from z = y and one forward
    cheaper.
    Only the samples still above tol are iterated [ours]: one slow solve no longer costs the whole batch.
    Returns z (B, C, H, W), the worst residual over steps per sample (B,), the mean iterations per step (N,),
    and the states x_{jh}, j = N-1 .. 0, when keep_states (for the hL estimate)."""
    assert not net.gauss_skip, "the inversion runs through the base sampler"
    h, y, hv, B = 1.0 / N, x, None, len(x)
    worst, iters, states = torch.zeros(B, device=x.device, dtype=x.dtype), torch.zeros(N), []
    for j in reversed(range(N)):
        t = torch.full((B,), j * h, device=x.device, dtype=x.dtype)
        z = y.clone() if hv is None else y - hv                                   # hv = h v(y, (j+1)h)
        hv, r = torch.empty_like(y), torch.empty(B, device=x.device, dtype=x.dtype)
        if anderson:
            Zh, Gh = (x.new_zeros(B, anderson, x[0].numel()) for _ in range(2))   # (B, m, D) ring buffers
        todo = torch.arange(B, device=x.device)                                   # samples still iterating
        for k in range(n_b + 1):
            hv[todo] = h * net(z[todo], t[todo]).to(x.dtype)
            r[todo] = rms(z[todo] + hv[todo] - y[todo])                           # residual of this z
            todo = todo[r[todo] > tol]                                            # NaN counts as done
            if k == n_b or len(todo) == 0:
                break
            iters[j] += len(todo) / B                                             # mean updates per sample
            g = y[todo] - hv[todo]                                                # g(z)
            z[todo] = anderson_mix(Zh, Gh, todo, k, z[todo], g) if anderson else g
        worst = torch.maximum(worst, torch.nan_to_num(r, nan=float("inf")))
        y = z
        if keep_states:
            states.append((j, z))
    return y, worst, iters, states


@torch.no_grad()
def step_lipschitz(net, z, t, iters=10, eps=1e-3):
    """Power iteration with finite-difference Jacobian-vector products: |J u| / |u| -> the spectral radius of
    dv/dx at (z, t) per sample (B,), what decides whether the fixed point z <- y - h v(z) contracts."""
    u = torch.randn_like(z)
    u = u / rms(u).view(-1, 1, 1, 1)
    v0 = net(z, t)
    for _ in range(iters):
        ju = (net(z + eps * u, t) - v0) / eps
        lam = rms(ju)                                                                  # |J u| / |u|, |u| = 1
        u = ju / lam.clamp_min(1e-12).view(-1, 1, 1, 1)
    return lam


def inversion_report(net, x, N, n_b, tol, anderson=5, n_power=8):
    """Residual, round trip |T(inverse(x)) - x| and h L per step on one batch (docs/method.md §5's
    diagnostics)."""
    z, worst, iters, states = invert(net, x, N, n_b, tol, anderson, keep_states=True)
    back = flow_sample(net, z, N)
    err = rms(back - x)
    hL = [float(step_lipschitz(net, s[:n_power], torch.full((len(s[:n_power]),), j / N, device=s.device))
                .max()) / N for j, s in states]
    return {"n": len(x), "residual_rms_max": float(worst.max()), "residual_rms_mean": float(worst.mean()),
            "iterations_per_step": iters.tolist(), "roundtrip_rms_mean": float(err.mean()),
            "roundtrip_rms_max": float(err.max()), "roundtrip_abs_max": float((back - x).abs().max()),
            "hL_per_step": hL[::-1], "hL_max": max(hL)}


def flops_per_forward(net, in_ch, size, device):
    """FLOPs of one forward pass on one image, counted by torch.utils.flop_counter (convolutions, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, in_ch, size, size, device=device), torch.zeros(1, device=device))
    return fc.get_total_flops()


# -- pre-training the base flow (resumable) ------------------------------------------------------------------

def train_flow(net, ema, path, cfg_json, draw, total_steps, args, device, what, desc):
    """Adam on the rectified-flow loss with an EMA copy for sampling, resumable from <path>
    (pretraining.train_resumable). `draw(step)` yields x_1 batches from `step` on."""
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    def refuse(saved):
        if saved.get("model") == cfg_json["model"] and saved.get("base") == cfg_json.get("base"):
            return None
        return (f"noise_correction: {path} holds a {what} with other settings; use another --out or "
                f"--corrector, or the same flags")
    batches = lambda step, gen: (x.to(device) for x in draw(step))
    return train_resumable(path, cfg_json, net, ema, opt, batches, rf_loss, total_steps, args, device, desc,
                           refuse)


def pretrain(args, device):
    data = load_data(args)
    cfg = model_config(args, data["channels"])
    path, ema_path, png = (os.path.join(args.out, f) for f in ("ref.pt", "ref_ema.pt", "samples.png"))
    net, ema = build_model(cfg).to(device), build_model(cfg).to(device)
    cfg_json = {"model": cfg, "data": args.data, "command": " ".join(sys.argv)}
    print(f"pre-training the base flow: {n_params(net):,} parameters, {cfg}, batch {args.batch_size}, "
          f"lr {args.lr}, to step {args.train_steps} on {len(data['train']):,} images")

    def draw(start):
        while True:                                    # one reshuffle per epoch, seeded by where we stand
            gen = torch.Generator().manual_seed(args.seed * 100_003 + start)
            for x in torch.utils.data.DataLoader(data["train"], args.batch_size, shuffle=True, drop_last=True,
                                                 num_workers=args.workers, generator=gen):
                yield to_float(x[0])
            start += 1
    step = train_flow(net, ema, path, cfg_json, draw, args.train_steps, args, device, "base flow",
                      "pre-training")
    torch.manual_seed(args.seed)
    xi = torch.randn(64, cfg["in_ch"], args.image_size, args.image_size, device=device)
    x = flow_sample(ema.eval(), xi, args.N)
    plot_side_by_side([(f"base, {step} steps of training, N={args.N}", to_uint8(x))], png)
    if step >= args.train_steps:  # the EMA weights alone, a quarter of ref.pt: the file for checkpoints/
        common.save_checkpoint(ema_path, {"ema": ema.state_dict()}, cfg_json, {"step": step})
    print(f"saved {path} at step {step}" + (f" and {ema_path}" if step >= args.train_steps else "")
          + f"; samples in {png}")


# -- corrector: invert the training set, a small flow from N(0, I) to the inverse noises (docs/method.md §5) -

def invert_training_set(args, base, data, base_sha, device):
    """Inverse noises of n_invert training images (a seeded subset), resumable from <out>/inverse_N<N>.pt.
    Stored as float16 (the corrector learns their distribution; 1e-3 relative precision is ample)."""
    path = os.path.join(args.out, f"inverse_N{args.N}.pt")
    key = {"base": base_sha, "N": args.N, "n_b": args.n_b, "tol": args.tol, "anderson": args.anderson,
           "sigma": args.sigma, "n_invert": args.n_invert, "seed": args.seed}
    n = min(args.n_invert, len(data["train"]))
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(args.seed))[:n]
    z, worst, report = [], [], None
    if os.path.exists(path):
        st = common.load_checkpoint(path)
        if st["config"] != key:
            raise SystemExit(f"noise_correction: {path} holds inverse noises with other settings; use "
                             f"another --out")
        z, worst, report = [st["state_dicts"]["z"]["z"]], [st["state_dicts"]["z"]["residual"]], st["extra"]
    done = sum(len(a) for a in z)

    def save():
        common.save_checkpoint(path, {"z": {"z": torch.cat(z), "residual": torch.cat(worst)}}, key, report)
    t0, last = time.time(), time.time()
    bar = tqdm(total=n, initial=done, desc=f"inverting through the {args.N}-step sampler")
    gen = torch.Generator().manual_seed(args.seed + done)
    for b in range(done, n, args.sample_batch):
        x = to_float(torch.stack([data["train"][int(i)][0] for i in order[b:b + args.sample_batch]]))
        x = (x + args.sigma * torch.randn(x.shape, generator=gen)).to(device)  # docs/method.md §5's jitter
        if report is None:
            report = inversion_report(base, x[:64], args.N, args.n_b, args.tol, args.anderson)
            print(f"inversion on {report['n']} images: residual max {report['residual_rms_max']:.2e}, round "
                  f"trip RMS max {report['roundtrip_rms_max']:.2e} (abs max "
                  f"{report['roundtrip_abs_max']:.2e}), hL max {report['hL_max']:.3g}, iterations per step "
                  f"{report['iterations_per_step']}")
        zb, wb, _, _ = invert(base, x, args.N, args.n_b, args.tol, args.anderson)
        z.append(zb.half().cpu()), worst.append(wb.cpu())
        bar.update(len(x))
        if time.time() - last > 300:
            save()
            last = time.time()
        if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
            break
    bar.close()
    save()
    z, worst = torch.cat(z), torch.cat(worst)
    return z, worst, report, len(z) >= n


def train_corrector(args, base, base_cfg, data, device):
    """Invert, drop non-converged solves, train the corrector with the same rectified-flow loss (resumable);
    its checkpoint records the base it belongs to and N."""
    base_sha = common.sha1_file(common.resolve_ref(args.ref))
    z, worst, report, complete = invert_training_set(args, base, data, base_sha, device)
    if not complete:
        print(f"inverted {len(z):,}/{args.n_invert:,} images; run the same command again to continue")
        return False
    keep = (worst <= args.drop_residual) & torch.isfinite(z.float()).flatten(1).all(1)
    report |= {"n_inverted": len(z), "n_dropped": int((~keep).sum()),
               "residual_rms_median": float(worst.median()), "drop_residual": args.drop_residual,
               "n_b": args.n_b, "tol": args.tol, "anderson": args.anderson}
    z = z[keep]
    print(f"inverse noises: {len(z):,} kept, {report['n_dropped']:,} dropped (residual > "
          f"{args.drop_residual}); RMS {float(rms(z.float()).mean()):.3f} (N(0, I) has 1)")
    if len(z) == 0:
        raise SystemExit("noise_correction: every inversion failed to converge; raise --N or --n_b, or "
                         "--sigma")
    cfg = corrector_config(base_cfg, args.corrector_width, args.plain_corrector)
    net, ema = build_model(cfg).to(device), build_model(cfg).to(device)
    if net.gauss_skip:  # N(mu, diag s^2) fitted to the inverse noises: what a fresh corrector samples exactly
        mu = sum(c.float().sum(0) for c in z.split(1024)) / len(z)
        var = sum(((c.float() - mu) ** 2).sum(0) for c in z.split(1024)) / (len(z) - 1)
        net.g_mu.copy_(mu), net.g_var.copy_(var)
    cfg_json = {"model": cfg, "base": {"sha1": base_sha, "N": args.N}, "inversion": report,
                "command": " ".join(sys.argv)}
    print(f"training the corrector: {n_params(net):,} parameters ({n_params(net) / n_params(base):.3f} of "
          f"the base), {cfg}, {args.corrector_steps} steps")

    def draw(start):
        gen = torch.Generator().manual_seed(args.seed + 7 + start)
        while True:
            yield z[torch.randint(len(z), (args.batch_size,), generator=gen)].float()
    steps = train_flow(net, ema, args.corrector, cfg_json, draw, args.corrector_steps, args, device,
                       "corrector", f"corrector for N={args.N}")
    return steps >= args.corrector_steps


def load_corrector(args, device):
    """(corrector, the report of its inversion); it must belong to --ref at this N."""
    net, _, ckpt = load_flow(args.corrector, device, "corrector")
    base = ckpt["config"].get("base") or {}
    if base.get("sha1") != common.sha1_file(common.resolve_ref(args.ref)) or base.get("N") != args.N:
        raise SystemExit(f"noise_correction: {args.corrector} belongs to base {base.get('sha1')} at "
                         f"N={base.get('N')}, not to {args.ref} at N={args.N}; train one with "
                         f"--train_corrector (one per N)")
    return common.maybe_compile(net, args.compile), ckpt["config"].get("inversion")


def corrector_ready(path, steps):
    if not os.path.exists(path):
        return False
    try:
        extra = common.load_checkpoint(path)["extra"] or {}
    except common.CheckpointError as e:
        raise SystemExit(f"noise_correction: {e}")
    return extra.get("step", steps) >= steps


# -- evaluation: FID against FLOPs per image (docs/method.md §6) ---------------------------------------------

def sampler_flops(flops, N, N_c=0):
    """FLOPs per image: N F_base for the base, N_c F_corrector + N F_base for corrector then base (any
    per-forward cost works, e.g. seconds)."""
    return N * flops["base"] + N_c * flops.get("corrector", 0)


def matched_steps(args, flops, N_c):
    """N': the fewest base steps costing at least the corrected sampler's FLOPs."""
    return math.ceil(sampler_flops(flops, args.N, N_c) / flops["base"] - 1e-9)


def base_step_counts(args, N_match=()):
    """The base sampler's step counts on the FID-vs-FLOPs curve: --base_steps, N, and each N' of a corrected
    sampler."""
    return sorted(set(args.base_steps) | {args.N} | set(N_match))


def evaluate_point(args, base, corrector, N, N_c, flops, feat, ref_stats, shape, device):
    """FID of one sampler, corrector (N_c steps) then base (N steps), or the base alone (corrector None,
    N_c = 0), over fid_seeds noise seeds, with FLOPs and NFE per image. Seed s gives every sampler the same
    xi ~ N(0, I) (common random numbers: differences are less noisy)."""
    fids, t0, first, B = [], time.time(), None, args.sample_batch
    desc = f"N={N}" + (f", N_c={N_c}" if corrector else "")
    for s in range(args.fid_seeds):
        gen, imgs = torch.Generator().manual_seed(args.seed * 1000 + s), []
        for b in tqdm(range(0, args.n_eval, B), desc=desc, leave=False):
            x = torch.randn((min(B, args.n_eval - b), *shape), generator=gen).to(device)  # xi (B, C, H, W)
            if corrector is not None:
                x = flow_sample(corrector, x, N_c, args.amp)
            imgs.append(to_uint8(flow_sample(base, x, N, args.amp)).cpu())
        imgs = torch.cat(imgs)
        fids.append(common.frechet_distance(*feature_stats(feat, imgs, B), *ref_stats))
        first = imgs[:64] if first is None else first
    fid = dict(common.mean_ci95(fids), per_seed=fids,
               std=float(np.std(fids, ddof=1)) if len(fids) > 1 else None)
    point = {"sampler": "corrected" if corrector is not None else "base", "N": N, "N_c": N_c, "nfe": N + N_c,
             "flops_per_image": sampler_flops(flops, N, N_c), "n_samples": args.n_eval,
             "wall_s": time.time() - t0, "metrics": {"fid": fid}}
    sd = f" ± {fid['std']:.2f} (std over {len(fids)} seeds)" if len(fids) > 1 else ""
    print(f"{point['sampler']:>9}  N {N:>4}  N_c {N_c:>4}  FLOPs/image {point['flops_per_image']:.3e}  "
          f"FID {fid['mean']:.2f}{sd}  [{point['wall_s']:.0f} s]")
    return point, first


def fid_vs_flops(args, base, corrector, data, flops, N_match, shape, device):
    """The base at every step count of the curve (and at each FLOPs-matched N'), then the corrected sampler at
    each N_c: FID over fid_seeds seeds each, from the same noises; PNGs of base, corrected and matched base
    side by side."""
    N_match = N_match if corrector is not None else {}                 # {N_c: N'}, empty for the base alone
    feat, feat_name, feat_tag = feature_network(args, data, device)
    ref_stats = reference_stats(args, data, feat, feat_tag)
    print(f"FID: {feat_name}; reference: {data['ref_name']}; {args.n_eval:,} samples x {args.fid_seeds} "
          f"seeds per point")
    curve, grids = [], {}
    for N in base_step_counts(args, N_match.values()):
        pt, grids[N] = evaluate_point(args, base, None, N, 0, flops, feat, ref_stats, shape, device)
        curve.append(pt)
    fid = {c["N"]: c["metrics"]["fid"]["mean"] for c in curve}
    panels = [(f"base N={args.N}, FID {fid[args.N]:.1f}", grids[args.N])]
    for N_c in N_match:
        pt, imgs = evaluate_point(args, base, corrector, args.N, N_c, flops, feat, ref_stats, shape, device)
        curve.append(pt)
        panels.append((f"corrected N_c={N_c} + N={args.N}, FID {pt['metrics']['fid']['mean']:.1f}", imgs))
    if N_match:  # the matched base of the largest N_c
        N_c, N1 = args.N_c[-1], N_match[args.N_c[-1]]
        panels.append((f"base N'={N1} (FLOPs of {N_c} + {args.N}), FID {fid[N1]:.1f}", grids[N1]))
    plot_side_by_side(panels, os.path.join(args.out, "samples_base_vs_corrected.png"))
    plot_fid_flops(curve, os.path.join(args.out, "fid_vs_flops.png"), feat_name)
    return curve, feat_name


# -- main ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    common.seed_everything(args.seed)
    device = common.get_device(args.device)
    args.out = args.out or os.path.join("runs", f"noise_pretrain_{args.preset}" if args.pretrain
                                        else "noise_correction")
    os.makedirs(args.out, exist_ok=True)
    if args.pretrain:
        return pretrain(args, device)
    default_corrector = (os.path.join(HERE, "checkpoints", f"fmnist_flow_cpu_corrector_N{args.N}.pt")
                         if args.ref == DEFAULT_REF else os.path.join(args.out, f"corrector_N{args.N}.pt"))
    args.corrector = args.corrector or default_corrector
    base, base_cfg, _ = load_flow(args.ref, device, "base")
    data = load_data(args)
    shape = (base_cfg["in_ch"], base_cfg["image_size"], base_cfg["image_size"])
    if base_cfg["gauss_skip"] or shape[0] != data["channels"] or shape[1] != args.image_size:
        raise SystemExit(f"noise_correction: {args.ref} is not a base flow for {data['channels']}-channel "
                         f"{args.image_size}px images; pass the matching --ref, --data or --image_size")
    # FLOPs per forward of each network; N' is the cheapest base with at least a corrected sampler's FLOPs
    c_cfg = corrector_config(base_cfg, args.corrector_width, args.plain_corrector)
    probe = build_model(c_cfg).to(device)
    flops = {"base": flops_per_forward(base, *shape[:2], device),
             "corrector": flops_per_forward(probe, *shape[:2], device)}
    N_match = {N_c: matched_steps(args, flops, N_c) for N_c in args.N_c}
    corrected = ", ".join(f"N_c {N_c}: {sampler_flops(flops, args.N, N_c):.3e} FLOPs/image, base at "
                          f"N' = {N_match[N_c]} {N_match[N_c] * flops['base']:.3e}" for N_c in args.N_c)
    print(f"base: {args.ref}, {n_params(base):,} parameters, {flops['base']:.3e} FLOPs/forward, N {args.N} "
          f"(h = {args.h:.4g}); corrector: {n_params(probe):,} parameters "
          f"({n_params(probe) / n_params(base):.3f} of the base), {flops['corrector']:.3e} FLOPs/forward; "
          f"corrected samplers {corrected}; inverting {args.n_invert:,} images takes "
          f"<= {args.n_invert * args.N * (args.n_b + 1):,} forwards")
    base = common.maybe_compile(base, args.compile)
    corrector, inversion = None, None
    if not args.eval_only:  # docs/method.md §5: invert, train the corrector (once per base and N)
        if args.train_corrector or not corrector_ready(args.corrector, args.corrector_steps):
            if not train_corrector(args, base, base_cfg, data, device) or args.train_corrector:
                return None
        corrector, inversion = load_corrector(args, device)
    t0 = time.time()
    curve, feat_name = fid_vs_flops(args, base, corrector, data, flops, N_match, shape, device)
    method = "base" if corrector is None else "inverse_noise_correction"
    results = {"task": "noise_correction", "method": method,
               "command": "python noise_correction.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "config": vars(args) | {"model": base_cfg, "corrector_model": c_cfg},
               "fid_network": feat_name, "fid_reference": data["ref_name"], "flops_per_forward": flops,
               "params": {"base": n_params(base), "corrector": n_params(probe)},
               "reference": next(c for c in curve if c["sampler"] == "base" and c["N"] == args.N)}
    if corrector is not None:  # each corrected sampler against the cheapest base with at least its FLOPs
        matched = []
        for pt in (c for c in curve if c["sampler"] == "corrected"):
            m = next(c for c in curve if c["sampler"] == "base" and c["N"] == N_match[pt["N_c"]])
            f_c, f_b = pt["metrics"]["fid"]["mean"], m["metrics"]["fid"]["mean"]
            matched.append({"corrected": pt, "base": m, "corrected_fid_lower": f_c < f_b,
                            "flops_ratio": pt["flops_per_image"] / m["flops_per_image"]})
            print(f"at matched FLOPs: corrected {pt['N_c']} + {args.N} FID {f_c:.2f} "
                  f"({pt['flops_per_image']:.3e} FLOPs/image) vs base N'={m['N']} FID {f_b:.2f} "
                  f"({m['flops_per_image']:.3e})")
        # "finetuned" is the largest N_c: the corrector integrated most accurately
        results |= {"finetuned": matched[-1]["corrected"], "inversion": inversion, "matched": matched}
    results["curve"] = curve
    results["compute"] = {"samples": sum(c["n_samples"] * args.fid_seeds for c in curve),
                          "nfe_sampling": sum(c["n_samples"] * args.fid_seeds * c["nfe"] for c in curve),
                          "wall_s": time.time() - t0}
    common.write_json(os.path.join(args.out, "results.json"), results)
    print(f"wrote {os.path.join(args.out, 'results.json')}, fid_vs_flops.png, samples_base_vs_corrected.png")
    return results


if __name__ == "__main__":
    main()
