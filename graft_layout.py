"""graft_layout.py — GRAFT / P-GRAFT on PubLayNet layouts (arXiv 2510.02692, with an alignment reward).

    python graft_layout.py --n_i 0.25            # P-GRAFT from the shipped reference model
    python graft_layout.py --n_i 0               # GRAFT
    python graft_layout.py --n_i 0.25 --rp       # RP-GRAFT (reverse stitching, the paper's ablation)
    python graft_layout.py --algo ddpo           # the policy-gradient baseline
    python graft_layout.py --eval_only           # metrics of the reference model and of the real test set
    python graft_layout.py --measure_variance    # E[Var(r(X_0) | X_t)] over t (docs/method.md §3)
    python graft_layout.py --pretrain --preset paper --device cuda   # pre-train a reference model
    python graft_layout.py --data path/to/publaynet                  # the official COCO train.json / val.json

A DDPM over sets of layout elements: per element the box (xc, yc, w, h) and the class one-hot, both scaled to
[-1, 1] and noised jointly (as EDM does for atom types), with a padding mask; a transformer without positional
encodings predicts the noise, so it is permutation-equivariant over elements. GRAFT keeps the Top-K of M
samples by reward (by default the negative LayoutGAN++ alignment) and fine-tunes on them; P-GRAFT keeps the
intermediate states x_s of the accepted samples and fine-tunes only the steps above s.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import acceptance
import common
import pretraining
from layouts import (CLASSES, MAX_N, Denoiser, LayoutFID, alignment, evaluate, fid_network, layout_keys,
                     load_data, overlap, real_floor, save_grid, to_centre, to_features, to_ltrb)

# -- config: presets, flags, the derived quantities printed at start -----------------------------------------

PAGE_ASPECT = {"publaynet": 1.3, "rico": 1.78}     # height / width, for drawing only (the 128 grid drops it)
HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    # 1.26M parameters: 1,000 layouts with N = 100 sample in ~35 s on one CPU thread; pre-training runs ~16
    # steps/s there. Rounds, ft_steps, K and ft_ema [ours, measured on the step-40,150 reference,
    # docs/layout.md]: 6 rounds x 200 steps cut alignment by 79% but stacked text boxes (overlap +57%,
    # FID x7.5); Top-100 of 1,000 drops titles (overlap +25%); the EMA of each round's iterates cuts the FID
    # damage of self-training (K 250: x2.7 -> x2.1)
    "cpu": dict(d_model=128, n_layers=4, n_heads=4, N=100, n_eval=1000, M=1000, K=250, rounds=2, ft_steps=100,
                ft_ema=0.98, batch_size=64, lr=5e-4, ema_decay=0.999, train_steps=150_000),
    # a larger denoiser (d 512, 8 layers) and budgets for a GPU; K/M as in "cpu", ft_ema for 20x the steps
    # [untested]
    "paper": dict(d_model=512, n_layers=8, n_heads=8, N=1000, n_eval=10_000, M=10_000, K=2_500, rounds=4,
                  ft_steps=2_000, ft_ema=0.995, batch_size=256, lr=2e-4, ema_decay=0.9999,
                  train_steps=500_000),
}
# the settings a fine-tuning run's state.pt must share with the command that resumes it
RESUME_KEYS = ("algo", "n_i", "rp", "M", "K", "accept", "tau", "dedup", "stratify", "sample_from", "ft_steps",
               "ft_lr", "ft_ema", "reward", "N", "T", "seed", "batch_size", "ddpo_lr", "ddpo_batch",
               "ddpo_steps_frac", "ddpo_clip", "dataset", "data", "grid")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="cpu", help="size and budget preset; flags below override it")
    # what to run
    a("--pretrain", action="store_true", help="pre-train a reference model (resumable) "
      "instead of fine-tuning")
    a("--eval_only", action="store_true", help="only evaluate the reference model (and the real test set)")
    a("--measure_variance", action="store_true", help="measure E[Var(r(X_0)|X_t)] on a grid of n_i")
    a("--var_R", type=int, default=8, help="continuations per intermediate state for --measure_variance")
    a("--var_P", type=int, default=64, help="intermediate states per n_i for --measure_variance")
    a("--algo", choices=["graft", "ddpo"], default="graft", help="rejection-sampling fine-tuning or DDPO")
    # DDPO's settings, with --algo ddpo (docs/method.md §4)
    a("--ddpo_lr", type=float, default=1e-5, help="DDPO learning rate "
      "(full fine-tuning, lower than LoRA's 3e-4)")
    a("--ddpo_batch", type=int, default=50, help="trajectories per DDPO gradient step")
    a("--ddpo_steps_frac", type=float, default=0.1, help="fraction of sampler steps trained per trajectory")
    a("--ddpo_clip", type=float, default=1e-4, help="PPO clip range "
      "(tiny, for per-dimension-averaged log-probs)")
    a("--ref", help="reference checkpoint, a path or hf:org/repo/file (default "
      "checkpoints/layout_<dataset>_cpu.pt)")
    a("--out", help="output folder (default runs/layout_<method>)")
    # data
    a("--dataset", choices=CLASSES, default="publaynet", help="shipped layouts: train on 'valid', "
      "evaluate on 'test'")
    a("--data", help="folder with PubLayNet's official train.json / val.json (LayoutDM's preprocessing)")
    a("--grid", type=int, help="round decoded corners to this many bins per axis, as the data are "
      "(default 128 for the shipped files, 0 = continuous with --data)")
    a("--cache_dir", default=os.path.join(HERE, ".cache", "layout"), help="cached reference evaluations")
    a("--fid_net", help="layout-FID feature network, trained once and cached if missing "
      "(default checkpoints/layout_fidnet_<dataset>.pt)")
    a("--fid_steps", type=int, default=1500, help="training steps of the FID feature network (once, ~1 min)")
    # model (must match the checkpoint)
    a("--d_model", type=int, help="transformer width")
    a("--n_layers", type=int, help="transformer blocks")
    a("--n_heads", type=int, help="attention heads")
    # diffusion
    a("--T", type=int, default=1000, help="diffusion time steps of the training schedule")
    a("--schedule", default="cosine", choices=["cosine", "linear", "polynomial_2"], help="noise schedule "
      "(linear leaves the boxes nearly pure noise for t > 0.75 T, wasting P-GRAFT's n_i range)")
    a("--N", type=int, help="sampler steps (an evenly spaced sub-grid of 0..T; NFE per sample = N + 1)")
    # reward and GRAFT's acceptance (paper Alg. 1, docs/method.md §2)
    a("--reward", default="alignment", help="reward: alignment | overlap | alignment_overlap "
      "(or one added to REWARDS)")
    a("--M", type=int, help="layouts drawn per round")
    a("--K", type=int, help="layouts accepted per round (Top-K of M)")
    a("--accept", choices=["top_k", "best_of_n", "threshold"], default="top_k", help="acceptance rule")
    a("--tau", type=float, help="reward threshold for --accept threshold")
    a("--no_dedup", action="store_true", help="keep duplicate layouts before ranking "
      "(de-duplication is default)")
    a("--stratify", action="store_true", help="Top-K within each element count, K split in proportion: the "
      "accepted layouts keep the element-count histogram instead of favouring counts that score well")
    # P-GRAFT's switch and RP-GRAFT (paper Alg. 2)
    a("--n_i", type=float, default=0.0, help="P-GRAFT switch: N_I = round(n_i N); 0 is plain GRAFT")
    a("--rp", action="store_true", help="RP-GRAFT: reference above s, fine-tuned model below (ablation)")
    a("--rounds", type=int, help="GRAFT rounds (or DDPO epochs of M samples)")
    a("--sample_from", choices=["current", "reference"], default="current", help="GRAFT: draw each round "
      "from the current fine-tuned model (tilts compound) or always from the reference (one tilt)")
    a("--ft_steps", type=int, help="fine-tuning gradient steps per round")
    a("--ft_lr", type=float, default=1e-4, help="fine-tuning learning rate (Adam)")
    a("--ft_ema", type=float, help="GRAFT: each round keeps the EMA of its fine-tuning iterates "
      "with this decay (0 keeps the last iterate; it cuts the FID cost of self-training, docs/layout.md)")
    # pre-training
    a("--batch_size", type=int, help="layouts per pre-training / fine-tuning step")
    a("--lr", type=float, help="pre-training learning rate (AdamW after a linear warm-up)")
    a("--warmup", type=int, default=1000, help="pre-training warm-up steps")
    a("--ema_decay", type=float, help="EMA decay of pre-training weights")
    a("--train_steps", type=int, help="pre-training steps in total (resumable)")
    a("--max_minutes", type=float, help="stop pre-training after this many minutes (resume later)")
    # evaluation
    a("--n_eval", type=int, help="samples for the evaluation of each model")
    a("--sample_batch", type=int, default=200, help="layouts per sampler batch")
    # runtime
    a("--seed", type=int, default=0, help="seed: a CPU run is reproducible")
    a("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    a("--amp", action="store_true", help="bf16 autocast (GPU)")
    a("--compile", action="store_true", help="torch.compile the network")
    return p


def parse_args(argv=None):
    """Flags, the preset's values for those left unset, one-line errors (exit 2), and the derived N_I, dedup,
    grid, ref and fid_net."""
    p = build_parser()
    args = p.parse_args(argv)
    unset = {k: v for k, v in PRESETS[args.preset].items() if getattr(args, k) is None}
    vars(args).update(unset)                                   # flags left unset take the preset's values
    bad = [k for k in ("M", "K", "N", "T", "rounds", "n_eval", "batch_size", "sample_batch", "var_R", "var_P",
                       "d_model", "n_layers", "n_heads") if getattr(args, k) <= 0]
    if bad:
        p.error(f"--{bad[0]} must be positive, got {getattr(args, bad[0])}")
    if not 0 <= args.n_i < 1 or (args.rp and args.n_i == 0):
        p.error(f"--n_i must be in [0, 1), and > 0 with --rp "
                f"(with n_i = 0 the reference would do every step); got {args.n_i}")
    if min(args.ft_steps, args.train_steps, args.fid_steps, args.warmup) < 0:
        p.error("--ft_steps, --train_steps, --fid_steps and --warmup must be >= 0")
    if not 0 <= args.ft_ema < 1:
        p.error(f"--ft_ema must be in [0, 1), got {args.ft_ema}")
    if args.K > args.M or args.N > args.T:
        p.error(f"need --K <= --M and --N <= --T, got K {args.K}, M {args.M}, N {args.N}, T {args.T}")
    if args.reward not in REWARDS:
        p.error(f"unknown --reward {args.reward!r}; choose from {', '.join(REWARDS)}")
    if (args.stratify and args.accept != "top_k") or (args.accept == "threshold" and args.tau is None):
        p.error("--stratify works with --accept top_k only, and --accept threshold needs --tau")
    if not 0 < args.ddpo_steps_frac <= 1:
        p.error("--ddpo_steps_frac must be in (0, 1]")
    if args.d_model % args.n_heads:
        p.error(f"--d_model ({args.d_model}) must be a multiple of --n_heads ({args.n_heads})")
    if args.data is not None and args.dataset != "publaynet":
        p.error("--data reads PubLayNet's COCO files; it needs --dataset publaynet")
    args.grid = (0 if args.data else 128) if args.grid is None else args.grid
    if args.grid == 1 or args.grid < 0:
        p.error(f"--grid must be 0 (continuous) or >= 2, got {args.grid}")
    args.N_I, args.dedup = round(args.n_i * args.N), not args.no_dedup
    args.ref = args.ref or os.path.join(HERE, "checkpoints", f"layout_{args.dataset}_cpu.pt")
    tag = args.dataset + ("_full" if args.data else "")
    args.fid_net = args.fid_net or os.path.join(HERE, "checkpoints", f"layout_fidnet_{tag}.pt")
    return args


def plan(args, T):
    """The derived quantities of a fine-tuning run, printed at its start."""
    per_round = (f"gradient calls {args.M * max(1, round(args.ddpo_steps_frac * (args.N - 1))):,} (PPO, lr "
                 f"{args.ddpo_lr})" if args.algo == "ddpo" else
                 f"{args.accept} K {args.K} of M {args.M} (K/M {args.K / args.M:.2f}), dedup {args.dedup}, "
                 f"gradient calls {args.ft_steps * args.batch_size:,}, "
                 f"EMA of the round's iterates {args.ft_ema}")
    return (f"{method_name(args)}: rounds {args.rounds}, N {args.N}, N_I {args.N_I}, s = "
            f"{int(common.time_grid(T, args.N)[args.N_I])}/{T}, reward {args.reward}; per round: NFE "
            f"{args.M * (args.N + 1):,}, {per_round}")


def model_config(args):
    """What a checkpoint must record to be rebuilt."""
    return dict(n_classes=len(CLASSES[args.dataset]), d_model=args.d_model, n_layers=args.n_layers,
                n_heads=args.n_heads, T=args.T, schedule=args.schedule, dataset=args.dataset)


# -- data: PubLayNet / RICO, LayoutGAN++'s measures, the layout-FID network (layouts.py) ---------------------

def by_element_count(n_elem, batch, desc):
    """Batches of layouts with similar element counts (little compute spent on padding) in count order:
    yields (indices into n_elem, mask (B, n))."""
    order = np.argsort(n_elem, kind="stable")
    for b in tqdm(range(0, len(order), batch), desc=desc, leave=False):
        idx = order[b:b + batch]
        n = int(n_elem[idx].max())
        yield idx, torch.arange(n)[None] < torch.as_tensor(n_elem[idx])[:, None]


# -- model: a transformer over the set of elements, no positional encodings (layouts.Denoiser) ---------------

def build_model(cfg):
    return Denoiser(**cfg)


def load_reference(ref, device, dataset):
    """(model, cfg) from a path or hf:org/repo/file;
    anything missing, corrupt or mismatched exits with one line."""
    try:
        ckpt = common.load_checkpoint(ref)
        cfg = ckpt["config"].get("model")
        if not isinstance(cfg, dict) or set(cfg) != {"n_classes", "d_model", "n_layers", "n_heads", "T",
                                                     "schedule", "dataset"}:
            raise common.CheckpointError(f"{ref!r} has no layout model config (not made by graft_layout.py)")
        if cfg["n_classes"] != len(CLASSES[dataset]):
            raise common.CheckpointError(f"{ref!r} has {cfg['n_classes']} classes, --dataset {dataset} has "
                                         f"{len(CLASSES[dataset])}")
        model, sd = build_model(cfg), ckpt["state_dicts"].get("ema") or ckpt["state_dicts"].get("model")
        if not isinstance(sd, dict):
            raise common.CheckpointError(f"{ref!r} has no 'ema' or 'model' weights")
        common.load_state(model, sd, f"checkpoint {ref!r}")
    except common.CheckpointError as e:
        raise SystemExit(f"graft_layout: {e}; pass --ref, or pre-train one with "
                         f"python graft_layout.py --pretrain "
                         f"(it writes runs/layout_pretrain_<preset>/ref.pt)")
    return model.to(device).eval(), cfg


# -- diffusion: schedule, shaped loss, sampler with P-GRAFT's stitching --------------------------------------

def make_abar(cfg):
    return torch.tensor(common.noise_schedule(cfg["schedule"], cfg["T"]), dtype=torch.float32)  # (T+1,)


def shaped_loss(net, z_s, mask, abar, t_lo, t_hi, abar_s=1.0, gen=None):
    """P-GRAFT's loss (docs/method.md §3) on layouts z_s (B, n, 4 + C) that live at time s, t in [t_lo, t_hi]:
    x_t = sqrt(abar_t/abar_s) x_s + sqrt(1 - abar_t/abar_s) eps',  |eps_theta(x_t, t) / c_t - eps'|^2 with
    c_t = sqrt((1 - abar_t) / (1 - abar_t/abar_s)); abar_s = 1 is the DDPM loss (pre-training, GRAFT)."""
    B, abar = len(z_s), abar.to(z_s.device)
    t = torch.randint(t_lo, t_hi + 1, (B,), generator=gen).to(z_s.device)
    ratio = (abar[t] / abar_s).view(B, 1, 1)                                    # abar_t / abar_s
    eps = torch.randn(z_s.shape, generator=gen).to(mask.device) * mask[..., None]   # eps' on real elements
    z_t = ratio.sqrt() * z_s + (1 - ratio).sqrt() * eps
    c_t = ((1 - abar[t].view(B, 1, 1)) / (1 - ratio)).sqrt()
    err = ((net(z_t, t.float() / (len(abar) - 1), mask) / c_t - eps) ** 2) * mask[..., None]
    return (err.sum((1, 2)) / (mask.sum(1) * z_s.shape[-1])).mean()


def step_mean_std(eps, z_t, abar, t, s):
    """Gaussian p(z_s | z_t) of the ancestral sampler for any s < t: DDPM's posterior q(z_s | z_t, x_0) at the
    predicted x_0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to the data range [-1, 1] as DDPM's
    clip_denoised does (without it, an eps error near t = T is amplified by 1 / sqrt(abar_T))."""
    a_t, a_s = abar[t], abar[s]
    x0 = ((z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    mean = (a_s.sqrt() * (1 - a_t / a_s) * x0 + (a_t / a_s).sqrt() * (1 - a_s) * z_t) / (1 - a_t)
    return mean, ((1 - a_t / a_s) * (1 - a_s) / (1 - a_t)).sqrt()


def step_logp(z, mean, std, mask):
    """log N(z; mean, std^2 I) averaged over the real dimensions (DDPO's convention, docs/method.md §4)
    -> (B,). The last step has std 0 (abar_0 = 1 for the cosine schedule): no density, zeros
    (never trained)."""
    if not std > 0:
        return torch.zeros(len(z))
    lp = -((z - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)   # (B, n, D)
    return (lp * mask[..., None]).sum((1, 2)) / (mask.sum(1) * z.shape[-1])


def denoise_steps(net, z, mask, abar, tau, k_from, k_to, amp=False, traj=None):
    """Ancestral steps of `net` from z_{tau_k_from} down to z_{tau_k_to} (one NFE each); with a list `traj`,
    every step's (z_new, log-prob) is appended to it (DDPO)."""
    T, dev = len(abar) - 1, next(net.parameters()).device
    for k in range(k_from, k_to, -1):
        with common.autocast(dev, amp):
            eps = net(z.to(dev), torch.full((len(z),), tau[k] / T, device=dev), mask.to(dev)).float().cpu()
        mean, std = step_mean_std(eps, z, abar, tau[k], tau[k - 1])
        z_new = mean + std * torch.randn(z.shape) * mask[..., None]             # z_{tau_{k-1}} (B, n, D)
        if traj is not None:
            traj.append((z_new, step_logp(z_new, mean, std, mask)))
        z = z_new
    return z


def finish(net, z, mask, abar, grid, amp=False):
    """The last NFE, the x_0-prediction from z_{tau_0}, decoded to layouts."""
    dev = next(net.parameters()).device
    with common.autocast(dev, amp):
        eps = net(z.to(dev), torch.zeros(len(z), device=dev), mask.to(dev)).float().cpu()
    return decode((z - (1 - abar[0]).sqrt() * eps) / abar[0].sqrt(), mask, grid)


def decode(z0, mask, grid=0):
    """Clean state -> numpy layouts: boxes (B, 25, 4) centre format, clipped to the page and, with `grid`,
    corners rounded to the data's bins (v = round(v (grid - 1)) / (grid - 1));
    labels (B, 25) int8 argmax, -1 padding."""
    B, n, _ = z0.shape
    ltrb = to_ltrb(((z0[..., :4] + 1) / 2).clamp(0, 1)).clamp(0, 1)           # (B, n, 4)
    if grid:
        ltrb = torch.round(ltrb * (grid - 1)) / (grid - 1)
    boxes, labels = np.zeros((B, MAX_N, 4), np.float32), np.full((B, MAX_N), -1, np.int8)
    boxes[:, :n] = (to_centre(ltrb) * mask[..., None]).numpy()
    labels[:, :n] = torch.where(mask, z0[..., 4:].argmax(-1), -1).numpy()
    return boxes, labels


@torch.no_grad()
def sample(net_hi, net_lo, n_elem, abar, N, N_I=0, batch=200, grid=0, amp=False, desc="sampling"):
    """Layouts with n_elem (M,) elements from paper Alg. 2's stitched sampler (NFE = N + 1): net_hi takes the
    steps from z_T down to s = tau_{N_I}, net_lo the rest and the final x_0-prediction. Reference: (ref, ref);
    P-GRAFT: (fine-tuned, ref); RP-GRAFT: (ref, fine-tuned); GRAFT: N_I = 0.
    Returns {'boxes' (M, 25, 4), 'labels' (M, 25), 'x_s' (M, 25, D): the state at s, P-GRAFT's data}."""
    tau, M = common.time_grid(len(abar) - 1, N), len(n_elem)
    res = {"boxes": np.zeros((M, MAX_N, 4), np.float32), "labels": np.full((M, MAX_N), -1, np.int8),
           "x_s": torch.zeros(M, MAX_N, net_lo.D)}
    for idx, mask in by_element_count(n_elem, batch, desc):
        z = torch.randn(len(idx), mask.shape[1], net_lo.D) * mask[..., None]    # z_T (B, n, D)
        z = denoise_steps(net_hi, z, mask, abar, tau, N, N_I, amp)              # T -> s: net_hi
        res["x_s"][idx, :mask.shape[1]] = z
        z = denoise_steps(net_lo, z, mask, abar, tau, N_I, 0, amp)              # s -> 0: net_lo
        res["boxes"][idx], res["labels"][idx] = finish(net_lo, z, mask, abar, grid, amp)
    return res


@torch.no_grad()
def sample_trajectories(net, n_elem, abar, N, batch=200, grid=0, amp=False, desc="sampling"):
    """DDPO's rollouts: layouts, their trajectories 'traj' (M, N+1, 25, D)
    and step log-probs 'logp' (M, N)."""
    tau, M = common.time_grid(len(abar) - 1, N), len(n_elem)
    res = {"boxes": np.zeros((M, MAX_N, 4), np.float32), "labels": np.full((M, MAX_N), -1, np.int8),
           "traj": torch.zeros(M, N + 1, MAX_N, net.D), "logp": torch.zeros(M, N)}
    for idx, mask in by_element_count(n_elem, batch, desc):
        steps = [(torch.randn(len(idx), mask.shape[1], net.D) * mask[..., None], None)]  # z_T
        z = denoise_steps(net, steps[0][0], mask, abar, tau, N, 0, amp, traj=steps)
        res["boxes"][idx], res["labels"][idx] = finish(net, z, mask, abar, grid, amp)
        res["traj"][idx, :, :mask.shape[1]] = torch.stack([s for s, _ in steps], 1)
        res["logp"][idx] = torch.stack([lp for _, lp in steps[1:]], 1)
    return res


@torch.no_grad()
def continue_from(net, x_s, n_elem, abar, N, N_I, batch=200, grid=0, desc="continuing"):
    """Layouts finished by `net` from the states x_s (M, 25, D) at step N_I (for the variance curve, §3)."""
    tau, M = common.time_grid(len(abar) - 1, N), len(n_elem)
    res = {"boxes": np.zeros((M, MAX_N, 4), np.float32), "labels": np.full((M, MAX_N), -1, np.int8)}
    for idx, mask in by_element_count(n_elem, batch, desc):
        z = denoise_steps(net, x_s[idx, :mask.shape[1]].clone(), mask, abar, tau, N_I, 0)
        res["boxes"][idx], res["labels"][idx] = finish(net, z, mask, abar, grid)
    return res


# -- reward: (boxes (B, 25, 4) centre format in [0, 1], labels (B, 25), -1 padding) -> (B,) ----------------

def reward_alignment(boxes, labels):
    """The negative LayoutGAN++ alignment x100 of each layout: higher is better aligned."""
    return torch.as_tensor(-100 * alignment(boxes, labels))


def reward_overlap(boxes, labels):
    return torch.as_tensor(-overlap(boxes, labels))


def reward_alignment_overlap(boxes, labels):
    """Both, so that alignment cannot be bought by stacking elements: -(alignment x100 + overlap)."""
    return reward_alignment(boxes, labels) + reward_overlap(boxes, labels)


REWARDS = {"alignment": reward_alignment, "overlap": reward_overlap,
           "alignment_overlap": reward_alignment_overlap}


def score(res, reward_fn):
    """Rewards of sampled layouts; a reward that is NaN or of the wrong shape stops the run."""
    r = torch.as_tensor(reward_fn(res["boxes"], res["labels"]), dtype=torch.float32)
    if r.shape != (len(res["boxes"]),):
        raise SystemExit(f"graft_layout: the reward returned shape {tuple(r.shape)}, expected "
                         f"({len(res['boxes'])},)")
    if not torch.isfinite(r).all():
        raise SystemExit(f"graft_layout: the reward returned {int((~torch.isfinite(r)).sum())} "
                         "NaN/inf values")
    return r


# -- fine-tuning: GRAFT / P-GRAFT / RP-GRAFT (paper Alg. 1-2) and DDPO (docs/method.md §4) -------------------

def method_name(args):
    return "ddpo" if args.algo == "ddpo" else "rpgraft" if args.rp else "pgraft" if args.N_I > 0 else "graft"


def samplers(args, ref, ft):
    """(net_hi, net_lo, N_I): who denoises above s and who below in the fine-tuned sampler
    (docs/method.md §3). GRAFT, DDPO: ft everywhere; P-GRAFT: ft above s, ref below; RP-GRAFT: ref above s,
    ft below."""
    if args.algo == "ddpo" or args.N_I == 0:
        return ft, ft, 0
    return (ref, ft, args.N_I) if args.rp else (ft, ref, args.N_I)


def training_window(args, abar):
    """(t_lo, t_hi, abar_s): GRAFT trains x_0 on t in [1, T]; P-GRAFT x_s on t in (s, T] with the shaped loss;
    RP-GRAFT x_0 on t in [1, s]."""
    T = len(abar) - 1
    s = int(common.time_grid(T, args.N)[args.N_I])
    if args.N_I > 0 and not args.rp:
        return s + 1, T, float(abar[s])
    return 1, (s if args.rp else T), 1.0


def train_on_accepted(ft, opt, x_acc, n_acc, abar, args):
    """ft_steps Adam steps of the shaped loss on the accepted states x_acc (K, 25, D) with n_acc (K,)
    elements, in the round's training window. With --ft_ema d the round ends on the EMA of its iterates
    (Polyak averaging, started from the round's first weights): a round takes many epochs over a few hundred
    layouts, so its last raw iterate is noisy (docs/layout.md: K 250, FID x2.7 -> x2.1).
    Returns the gradient calls."""
    t_lo, t_hi, abar_s = training_window(args, abar)
    dev, params = next(ft.parameters()).device, list(ft.parameters())
    real = torch.arange(MAX_N)[None] < torch.as_tensor(n_acc)[:, None]           # (K, 25)
    avg = [p.detach().clone() for p in params] if args.ft_ema > 0 else None
    ft.train()
    for _ in tqdm(range(args.ft_steps), desc="fine-tuning", leave=False):
        idx = torch.randint(len(x_acc), (args.batch_size,))
        n = int(n_acc[idx.numpy()].max())                                         # widest layout of the batch
        with common.autocast(dev, args.amp):
            loss = shaped_loss(ft, x_acc[idx, :n].to(dev), real[idx, :n].to(dev), abar, t_lo, t_hi, abar_s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if avg is not None:
            torch._foreach_lerp_(avg, [p.detach() for p in params], 1 - args.ft_ema)
    with torch.no_grad():
        for p, a in zip(params, avg or []):
            p.copy_(a)
    ft.eval()
    return args.ft_steps * args.batch_size


def graft_round(args, ref, ft, opt, abar, n_elem, desc):
    """One round of paper Alg. 1 / Alg. 2: M layouts -> rewards -> Top-K (duplicates removed first) -> the
    shaped loss on the accepted x_s (P-GRAFT) or x_0 (GRAFT, RP-GRAFT)."""
    hi, lo, N_I = (ref, ref, args.N_I) if args.sample_from == "reference" else samplers(args, ref, ft)
    res = sample(hi, lo, n_elem, abar, args.N, N_I, args.sample_batch, args.grid, args.amp, desc)
    r, keys = score(res, REWARDS[args.reward]), layout_keys(res["boxes"], res["labels"])
    acc = acceptance.accept(r, args.accept, K=args.K, tau=args.tau, keys=keys if args.dedup else None,
                            groups=n_elem if args.stratify else None)
    if len(acc) == 0:
        raise SystemExit(f"graft_layout: {desc} accepted no sample; lower --tau or raise --M")
    # P-GRAFT trains on x_s, the others on the clean layout
    x = (res["x_s"] if args.N_I > 0 and not args.rp
         else to_features(res["boxes"], res["labels"], ft.D - 4)[0])
    return res, r, keys, acc, train_on_accepted(ft, opt, x[acc], n_elem[acc.numpy()], abar, args)


def ddpo_update(ft, opt, res, rewards, n_elem, abar, args):
    """One inner epoch of PPO (docs/method.md §4) over the M trajectories in minibatches of ddpo_batch: a
    random ddpo_steps_frac of the N - 1 trainable steps per minibatch (the last, std 0, has no density),
    advantages standardised over the batch and clipped to +-5, the clipped surrogate,
    gradient norm clipped to 1."""
    dev, T, tau = next(ft.parameters()).device, len(abar) - 1, common.time_grid(len(abar) - 1, args.N)
    adv = ((rewards - rewards.mean()) / (rewards.std() + 1e-8)).clamp(-5, 5)
    n_steps = max(1, round(args.ddpo_steps_frac * (args.N - 1)))
    real = torch.arange(MAX_N)[None] < torch.as_tensor(n_elem)[:, None]          # (M, 25)
    perm, grad_calls = torch.randperm(len(rewards)), 0
    ft.train()
    for b in tqdm(range(0, len(perm), args.ddpo_batch), desc="DDPO", leave=False):
        idx = perm[b:b + args.ddpo_batch]
        n = int(n_elem[idx.numpy()].max())
        traj, old_logp, mask = (res["traj"][idx, :, :n].to(dev), res["logp"][idx].to(dev),
                                real[idx, :n].to(dev))
        opt.zero_grad(set_to_none=True)
        # from tau_{N-j} to tau_{N-j-1}
        for j in torch.randperm(args.N - 1)[:n_steps].tolist():
            t = torch.full((len(idx),), float(tau[args.N - j]) / T, device=dev)
            with common.autocast(dev, args.amp):
                eps = ft(traj[:, j], t, mask).float()
            mean, std = step_mean_std(eps, traj[:, j], abar.to(dev), tau[args.N - j], tau[args.N - j - 1])
            ratio = torch.exp(step_logp(traj[:, j + 1], mean, std, mask) - old_logp[:, j])
            clipped = ratio.clamp(1 - args.ddpo_clip, 1 + args.ddpo_clip)
            (torch.maximum(-adv[idx].to(dev) * ratio, -adv[idx].to(dev) * clipped).mean()
             / n_steps).backward()
            grad_calls += len(idx)
        torch.nn.utils.clip_grad_norm_(ft.parameters(), 1.0)
        opt.step()
    ft.eval()
    return grad_calls


def ddpo_round(args, ft, opt, abar, n_elem, desc):
    """One DDPO epoch: M on-policy rollouts of the current model, their rewards, one PPO epoch (returns as
    graft_round, with every sample 'accepted')."""
    res = sample_trajectories(ft, n_elem, abar, args.N, args.sample_batch, args.grid, args.amp, desc)
    r = score(res, REWARDS[args.reward])
    grad = ddpo_update(ft, opt, res, r, n_elem, abar, args)
    return res, r, layout_keys(res["boxes"], res["labels"]), torch.arange(args.M), grad


def round_record(args, rnd, r, acc, res, keys, grad, wall):
    """One line of metrics.jsonl."""
    return {"round": rnd + 1, "mean_reward": float(r.mean()), "accept_rate": len(acc) / args.M,
            "accepted_mean_reward": float(r[acc].mean()) if args.algo != "ddpo" else None,
            "alignment_x100": float(100 * alignment(res["boxes"], res["labels"]).mean()),
            "overlap": float(overlap(res["boxes"], res["labels"]).mean()), "unique": len(set(keys)) / args.M,
            "samples_per_s": args.M / wall, "round_wall_s": wall}


def finetune(args, ref, ref_cfg, abar, hist, device):
    """GRAFT rounds (or DDPO epochs) with element counts drawn from the training histogram; state.pt after
    every round, so an interrupted run resumes from the last finished one and repeats it exactly
    (per-round seeds)."""
    ft = common.maybe_compile(build_model(ref_cfg).to(device), args.compile)
    ft.load_state_dict(ref.state_dict())
    opt = torch.optim.Adam(ft.parameters(), lr=args.ddpo_lr if args.algo == "ddpo" else args.ft_lr)
    path, key = (os.path.join(args.out, "state.pt"),
                 {k: getattr(args, k) for k in RESUME_KEYS} | {"ref": args.ref})
    st = common.load_checkpoint(path) if os.path.exists(path) else None
    if st is not None and st["config"].get("resume_key") != key:
        raise SystemExit(f"graft_layout: {args.out} holds a run with other settings; use another --out")
    if st is not None:
        common.load_state(ft, st["state_dicts"]["model"], path)
        opt.load_state_dict(st["state_dicts"]["opt"])
        print(f"resuming after round {len(st['extra']['rounds'])}")
    rounds, compute = (st["extra"]["rounds"], st["extra"]["compute"]) if st else ([], dict.fromkeys(
        ("samples", "nfe_sampling", "grad_calls", "wall_s"), 0))
    for rnd in range(len(rounds), args.rounds):
        t0 = time.time()
        torch.manual_seed(args.seed * 1_000_003 + rnd)  # per-round seeding: a resumed run repeats exactly
        n_elem = np.random.RandomState(args.seed * 1_000_003 + rnd).choice(len(hist), args.M, p=hist)
        desc = f"round {rnd + 1}"
        res, r, keys, acc, grad = (ddpo_round(args, ft, opt, abar, n_elem, desc) if args.algo == "ddpo"
                                   else graft_round(args, ref, ft, opt, abar, n_elem, desc))
        wall = time.time() - t0
        for k, v in (("samples", args.M), ("nfe_sampling", args.M * (args.N + 1)), ("grad_calls", grad),
                     ("wall_s", wall)):
            compute[k] += v
        rounds.append(round_record(args, rnd, r, acc, res, keys, grad, wall) | compute)
        common.save_checkpoint(path, {"model": ft.state_dict(), "opt": opt.state_dict()},
                               {"resume_key": key, "model": ref_cfg}, {"rounds": rounds, "compute": compute})
        common.write_json(os.path.join(args.out, "metrics.jsonl"), rounds, lines=True)
        print(f"round {rnd + 1}/{args.rounds}: mean reward {r.mean():.4f}, accepted {len(acc)}/{args.M}, "
              f"alignment x100 {rounds[-1]['alignment_x100']:.3f}, overlap {rounds[-1]['overlap']:.4f}, "
              f"{args.M / wall:.1f} samples/s")
    return ft, rounds, compute


# -- pre-training the reference model (resumable, pretraining.py) --------------------------------------------

def pretrain(args, device):
    """eps loss at uniform t, AdamW after a linear warm-up, EMA weights for sampling; resumable from
    <out>/ref.pt."""
    data, cfg = load_data(args.dataset, args.data)["train"], model_config(args)
    path, model, ema = (os.path.join(args.out, "ref.pt"), build_model(cfg).to(device),
                        build_model(cfg).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    abar = make_abar(cfg).to(device)
    print(f"pre-training {sum(p.numel() for p in model.parameters()):,} parameters on {len(data['n']):,} "
          f"{args.dataset} layouts, batch {args.batch_size}, lr {args.lr}, to step {args.train_steps}")

    warmup = lambda step: args.lr * min(1.0, (step + 1) / max(args.warmup, 1))    # linear, then constant
    step = pretraining.train_resumable(
        path, {"model": cfg, "command": " ".join(sys.argv)}, model, ema, opt,
        pretraining.set_batches(data["n"], args.batch_size, lambda idx: to_features(
            data["boxes"][idx], data["labels"][idx], cfg["n_classes"]), device),
        lambda net, b, gen: shaped_loss(net, *b, abar, 1, cfg["T"]), args.train_steps, args, device,
        "pre-training", pretraining.same_model(cfg, path, "graft_layout"), lr_at=warmup)
    print(f"saved {path} at step {step}")


# -- evaluation (LayoutGAN++'s alignment and overlap, layout FID: layouts.py) --------------------------------

def evaluate_sampler(hi, lo, N_I, args, abar, hist, fid, desc):
    """n_eval layouts, the same element counts and noise for every model (common random numbers)."""
    torch.manual_seed(args.seed + 12_345)
    n_elem = np.random.RandomState(args.seed + 12_345).choice(len(hist), args.n_eval, p=hist)
    t0 = time.time()
    res = sample(hi, lo, n_elem, abar, args.N, N_I, args.sample_batch, args.grid, args.amp, desc)
    wall = time.time() - t0
    metrics = (evaluate(res["boxes"], res["labels"], fid)
               | {"reward": common.mean_ci95(score(res, REWARDS[args.reward]))})
    return {"n_samples": args.n_eval, "nfe": args.n_eval * (args.N + 1), "wall_s": wall,
            "samples_per_s": args.n_eval / wall, "metrics": metrics}, res


def reference_eval(args, ref, abar, hist, fid):
    """The reference model's evaluation, cached by (checkpoint, FID net, this script, N, n_eval, seed, reward,
    grid): every run of a sweep compares against the same numbers without paying for them again."""
    tag = (f"{args.dataset}_{common.sha1_file(common.resolve_ref(args.ref))}_{fid.info['sha1']}_"
           f"{common.sha1_file(__file__)}_N{args.N}_n{args.n_eval}_s{args.seed}_{args.reward}_g{args.grid}")
    # (this file's hash in the tag: a changed sampler re-runs the reference)
    def compute():
        ev, res = evaluate_sampler(ref, ref, 0, args, abar, hist, fid, "reference eval")
        return ev, {"boxes": res["boxes"], "labels": res["labels"]}
    return common.cached(os.path.join(args.cache_dir, "reference_evals", tag), compute)


def measure_variance(args, ref, abar, hist):
    """docs/method.md §3: E[Var(r(X_0) | X_t)] at t = tau_{N_I} for a grid of n_i. P base trajectories of the
    reference, R stochastic continuations from each state they pass at tau_{N_I}, the within-group variance
    averaged over the P groups."""
    grid, tau = (sorted({round(f * args.N) for f in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)}),
                 common.time_grid(args.T, args.N))
    torch.manual_seed(args.seed)
    n_elem = np.random.RandomState(args.seed).choice(len(hist), args.var_P, p=hist)
    base = {k: torch.zeros(args.var_P, MAX_N, ref.D) for k in grid}
    for idx, mask in by_element_count(n_elem, args.sample_batch, "base trajectories"):
        z, k_prev = torch.randn(len(idx), mask.shape[1], ref.D) * mask[..., None], args.N
        # stop at each N_I, from N down
        for k in grid[::-1]:
            z, k_prev = denoise_steps(ref, z, mask, abar, tau, k_prev, k), k
            base[k][idx, :mask.shape[1]] = z
    curve = []
    for N_I in grid:
        res = continue_from(ref, base[N_I].repeat_interleave(args.var_R, 0), np.repeat(n_elem, args.var_R),
                            abar, args.N, N_I, args.sample_batch, args.grid, f"continuations from N_I={N_I}")
        r = score(res, REWARDS[args.reward]).view(args.var_P, args.var_R)       # (P, R)
        within = r.var(1, unbiased=True)                                         # (P,)
        curve.append({"n_i": N_I / args.N, "N_I": N_I, "t": int(tau[N_I]),
                      "cond_var": common.mean_ci95(within.numpy()), "total_var": float(r.flatten().var())})
        print(f"n_i {N_I / args.N:.2f}: E[Var(r|x_t)] = {within.mean():.5f} (total Var(r) {r.var():.5f})")
    common.write_json(os.path.join(args.out, "variance.json"),
                      {"reward": args.reward, "P": args.var_P, "R": args.var_R, "N": args.N, "curve": curve})
    plt = common.pyplot()                                                        # the curve, 95% intervals
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([c["n_i"] for c in curve], [c["cond_var"]["mean"] for c in curve], fmt="o-", capsize=3,
                yerr=[c["cond_var"]["mean"] - c["cond_var"]["ci95"][0] for c in curve])
    (ax.set_xlabel("n_i  (switch step N_I / N)"), ax.set_ylabel(f"E[Var({args.reward} | x_t)]"),
     ax.grid(alpha=0.3))
    fig.tight_layout(), fig.savefig(os.path.join(args.out, "variance_curve.png"), dpi=120), plt.close(fig)
    return curve


# -- main ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    common.seed_everything(args.seed)
    device = common.get_device(args.device)
    prefix = ("layout" + ("" if args.dataset == "publaynet" else f"_{args.dataset}")
              + ("_full" if args.data else ""))
    if args.pretrain:
        args.out = args.out or os.path.join("runs", f"{prefix}_pretrain_{args.preset}")
        return pretrain(args, device)
    method = "reference" if args.eval_only else "variance" if args.measure_variance else method_name(args)
    args.out = args.out or os.path.join("runs", f"{prefix}_{method}" + (f"_ni{args.n_i}" if args.N_I else ""))
    os.makedirs(args.out, exist_ok=True)
    ref, ref_cfg = load_reference(args.ref, device, args.dataset)
    data = load_data(args.dataset, args.data)
    hist = np.bincount(data["train"]["n"], minlength=MAX_N + 1) / len(data["train"]["n"])  # p(n elements)
    abar, ref = make_abar(ref_cfg), common.maybe_compile(ref, args.compile)
    print(f"reference: {args.ref} ({sum(p.numel() for p in ref.parameters()):,} parameters, {ref_cfg}); "
          f"{len(data['train']['n']):,} train / {len(data['test']['n']):,} test layouts, grid {args.grid}")
    if args.measure_variance:
        return measure_variance(args, ref, abar, hist)
    if not args.eval_only:
        print(plan(args, ref_cfg["T"]))
    t0, classes, aspect = time.time(), CLASSES[args.dataset], PAGE_ASPECT[args.dataset]
    fid = LayoutFID(fid_network(args.fid_net, data["train"], len(classes), args.fid_steps, args.seed),
                    len(classes), data["test"], args.fid_net)
    reference, ref_samples = reference_eval(args, ref, abar, hist, fid)
    save_grid(ref_samples["boxes"], ref_samples["labels"], classes, aspect,
              os.path.join(args.out, "layouts_reference.png"),
              f"reference model ({os.path.basename(args.ref)})")
    results = {"task": "layout", "method": method, "n_i": args.n_i,
               "command": "python graft_layout.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "config": dict(vars(args)) | {"model": ref_cfg}, "fid_net": fid.info,
               "real_test": real_floor(data, fid, args.n_eval, args.seed), "reference": reference}
    if not args.eval_only:
        ft, rounds, compute = finetune(args, ref, ref_cfg, abar, hist, device)          # Alg. 1 / 2 rounds
        finetuned, ft_samples = evaluate_sampler(*samplers(args, ref, ft), args, abar, hist, fid,
                                                 "fine-tuned eval")                     # stitched at N_I
        save_grid(ft_samples["boxes"], ft_samples["labels"], classes, aspect,
                  os.path.join(args.out, "layouts_finetuned.png"),
                  f"{method} (n_i {args.n_i}), {args.reward} reward")
        results |= {"finetuned": finetuned, "compute": compute, "rounds": rounds}
    results["wall_s"] = time.time() - t0
    common.write_json(os.path.join(args.out, "results.json"), results)
    for name in ("real_test", "reference", "finetuned"):
        if name in results:
            m = results[name]["metrics"]
            print(f"{name:>10}: "
                  + ", ".join(f"{k} {m[k]['mean']:.4f}" for k in ("alignment_x100", "overlap", "fid"))
                  + ", class mix " + " ".join(f"{c} {f:.3f}" for c, f in zip(classes, m["class_freq"])))
    print(f"wrote {os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
