"""graft_layout.py — GRAFT / P-GRAFT on PubLayNet layouts (arXiv 2510.02692, with an alignment reward).

    python graft_layout.py --n_i 0.25            # P-GRAFT from the shipped reference model
    python graft_layout.py --n_i 0               # GRAFT
    python graft_layout.py --n_i 0.25 --rp       # RP-GRAFT (reverse stitching, the paper's ablation)
    python graft_layout.py --algo ddpo           # the policy-gradient baseline
    python graft_layout.py --eval_only           # metrics of the reference model and of the real test set
    python graft_layout.py --measure_variance    # E[Var(r(X_0) | X_t)] over t (SPEC 3)
    python graft_layout.py --pretrain --preset paper --device cuda   # pre-train a reference model
    python graft_layout.py --data path/to/publaynet                  # the official COCO train.json / val.json

A DDPM over sets of layout elements: per element the box (xc, yc, w, h) and the class one-hot, both scaled to
[-1, 1] and noised jointly (as EDM does for atom types), with a padding mask; a transformer without positional
encodings predicts the noise, so it is permutation-equivariant over elements. GRAFT keeps the Top-K of M samples
by reward (by default the negative LayoutGAN++ alignment) and fine-tunes on them; P-GRAFT keeps the intermediate
states x_s of the accepted samples and fine-tunes only the steps above s.
"""
import argparse
import functools
import json
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# -- config ---------------------------------------------------------------------------------------------------

CLASSES = {"publaynet": ["text", "title", "list", "table", "figure"],
           "rico": ["Text", "Image", "Icon", "List_Item", "Text_Button", "Toolbar", "Web_View", "Input", "Card",
                    "Advertisement", "Background_Image", "Drawer", "Radio_Button", "Checkbox", "Multi_Tab",
                    "Pager_Indicator", "Modal", "On_Off_Switch", "Slider", "Map_View", "Button_Bar", "Video",
                    "Bottom_Navigation", "Number_Stepper", "Date_Picker"]}
PAGE_ASPECT = {"publaynet": 1.3, "rico": 1.78}     # height / width, for drawing only (the 128 grid drops it)
MAX_N = 25                                          # LayoutDM's max_seq_length; the shipped files have <= 20
HERE = os.path.dirname(os.path.abspath(__file__))
FID_NET_NAME = "graft-layoutnet-v1"

PRESETS = {
    # 1.26M parameters: 1,000 layouts with N = 100 sample in ~35 s on one CPU thread; pre-training runs ~16 steps/s
    # there. Rounds, ft_steps, K and ft_ema [ours, measured on the step-40,150 reference, README]: 6 rounds x 200
    # steps cut alignment by 79% but stacked text boxes (overlap +57%, FID x7.5); Top-100 of 1,000 drops titles
    # (overlap +25%); the EMA of each round's iterates cuts the FID damage of self-training (K 250: x2.7 -> x2.1)
    "cpu": dict(d_model=128, n_layers=4, n_heads=4, N=100, n_eval=1000, M=1000, K=250, rounds=2, ft_steps=100,
                ft_ema=0.98, batch_size=64, lr=5e-4, ema_decay=0.999, train_steps=150_000),
    # a larger denoiser (d 512, 8 layers) and budgets for a GPU; K/M as in "cpu", ft_ema for 20x the steps [untested]
    "paper": dict(d_model=512, n_layers=8, n_heads=8, N=1000, n_eval=10_000, M=10_000, K=2_500, rounds=4,
                  ft_steps=2_000, ft_ema=0.995, batch_size=256, lr=2e-4, ema_decay=0.9999, train_steps=500_000),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="cpu", help="size and budget preset; flags below override it")
    # what to run
    a("--pretrain", action="store_true", help="pre-train a reference model (resumable) instead of fine-tuning")
    a("--eval_only", action="store_true", help="only evaluate the reference model (and the real test set)")
    a("--measure_variance", action="store_true", help="measure E[Var(r(X_0)|X_t)] on a grid of n_i (SPEC 3)")
    a("--algo", choices=["graft", "ddpo"], default="graft", help="rejection-sampling fine-tuning or DDPO")
    a("--ref", help="reference checkpoint, a path or hf:org/repo/file (default checkpoints/layout_<dataset>_cpu.pt)")
    a("--out", help="output folder (default runs/layout_<method>)")
    # data
    a("--dataset", choices=CLASSES, default="publaynet", help="shipped layouts: train on 'valid', evaluate on 'test'")
    a("--data", help="folder with PubLayNet's official train.json / val.json (LayoutDM's preprocessing)")
    a("--grid", type=int, help="round decoded corners to this many bins per axis, as the data are (default 128 "
      "for the shipped files, 0 = continuous with --data)")
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
    a("--schedule", default="cosine", choices=["cosine", "linear", "polynomial_2"], help="noise schedule (linear "
      "leaves the boxes nearly pure noise for t > 0.75 T, wasting P-GRAFT's n_i range)")
    a("--N", type=int, help="sampler steps (an evenly spaced sub-grid of 0..T; NFE per sample = N + 1)")
    # reward and fine-tuning: GRAFT / P-GRAFT / RP-GRAFT / DDPO (the same flags in every script, common.py)
    a("--reward", default="alignment", help="reward: alignment | overlap | alignment_overlap")
    common.add_finetuning_args(a, "layouts")
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
    return p


def parse_args(argv=None):
    p = build_parser()
    args = common.parse_with_presets(p, argv, PRESETS)
    common.check_finetuning_args(p, args, REWARDS, positive=("d_model", "n_layers", "n_heads"))
    if min(args.fid_steps, args.warmup) < 0:
        p.error("--fid_steps and --warmup must be >= 0")
    if args.d_model % args.n_heads:
        p.error(f"--d_model ({args.d_model}) must be a multiple of --n_heads ({args.n_heads})")
    if args.data is not None and args.dataset != "publaynet":
        p.error("--data reads PubLayNet's COCO files; it needs --dataset publaynet")
    args.grid = (0 if args.data else 128) if args.grid is None else args.grid
    if args.grid == 1 or args.grid < 0:
        p.error(f"--grid must be 0 (continuous) or >= 2, got {args.grid}")
    args.ref = args.ref or os.path.join(HERE, "checkpoints", f"layout_{args.dataset}_cpu.pt")
    tag = args.dataset + ("_full" if args.data else "")
    args.fid_net = args.fid_net or os.path.join(HERE, "checkpoints", f"layout_fidnet_{tag}.pt")
    return args


def model_config(args):
    """What a checkpoint must record to be rebuilt."""
    return dict(n_classes=len(CLASSES[args.dataset]), d_model=args.d_model, n_layers=args.n_layers,
                n_heads=args.n_heads, T=args.T, schedule=args.schedule, dataset=args.dataset)


# -- data -------------------------------------------------------------------------------------------------------

def to_ltrb(b):
    """(..., 4) centre format (xc, yc, w, h) -> (left, top, right, bottom); numpy or torch."""
    lib = torch if isinstance(b, torch.Tensor) else np
    return lib.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2, b[..., 0] + b[..., 2] / 2,
                      b[..., 1] + b[..., 3] / 2], -1)


def to_centre(b):
    """(left, top, right, bottom) -> centre format (xc, yc, w, h); numpy or torch."""
    lib = torch if isinstance(b, torch.Tensor) else np
    return lib.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2, b[..., 2] - b[..., 0],
                      b[..., 3] - b[..., 1]], -1)


def pack(layouts):
    """[[(class, left, top, right, bottom), ...] per layout] -> {'boxes': (L, 25, 4) float32 centre format in
    [0, 1], 'labels': (L, 25) int8 with -1 for padding (real elements first), 'n': (L,) element counts}."""
    n = np.array([len(els) for els in layouts], np.int64)
    flat = np.asarray([e for els in layouts for e in els], np.float64).reshape(-1, 5)
    rows, cols = np.repeat(np.arange(len(n)), n), np.arange(len(flat)) - np.repeat(np.cumsum(n) - n, n)
    boxes, labels = np.zeros((len(n), MAX_N, 4), np.float32), np.full((len(n), MAX_N), -1, np.int8)
    boxes[rows, cols], labels[rows, cols] = to_centre(flat[:, 1:]), flat[:, 0]
    return {"boxes": boxes, "labels": labels, "n": n}


def read_layout_text(path, classes):
    """LayoutFormer++'s text format: `label x1 y1 x2 y2 | ...`, corners floor(v * 127) (data/*/README.md)."""
    if not os.path.isfile(path):
        raise SystemExit(f"graft_layout: {path} not found; the data/ folder is incomplete (git checkout data)")
    layouts = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            tokens = [part.split() for part in line.split("|")] if line.strip() else []
            if any(len(t) != 5 or t[0] not in classes or not all(v.isdigit() for v in t[1:]) for t in tokens):
                raise SystemExit(f"graft_layout: {path}:{line_no} is not 'label x1 y1 x2 y2 | ...' with integer "
                                 f"corners and labels from {classes}")
            if tokens:
                layouts.append([(classes.index(t[0]), *(int(v) / 127 for v in t[1:])) for t in tokens][:MAX_N])
    return pack(layouts)


def load_coco(json_path, max_elements=MAX_N):
    """LayoutDM's PubLayNet preprocessing of an official COCO file: images in id order, landscape pages (H < W)
    dropped, boxes outside the page or of zero size dropped, pages left with 0 or > 25 elements dropped, boxes as
    (xc, yc, w, h) divided by the page size."""
    try:
        with open(json_path) as f:
            coco = json.load(f)
        names, anns, layouts = {c["id"]: c["name"] for c in coco["categories"]}, defaultdict(list), []
        for a in coco["annotations"]:
            anns[a["image_id"]].append(a)
        for im in sorted(coco["images"], key=lambda im: im["id"]):
            W, H = float(im["width"]), float(im["height"])
            els = [(CLASSES["publaynet"].index(names[a["category_id"]]), x / W, y / H, (x + w) / W, (y + h) / H)
                   for a in anns[im["id"]] for x, y, w, h in [a["bbox"]]
                   if x >= 0 and y >= 0 and x + w <= W and y + h <= H and w > 0 and h > 0]
            if H >= W and 0 < len(els) <= max_elements:
                layouts.append(els)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"graft_layout: {json_path} is not a readable PubLayNet COCO file ({type(e).__name__}: "
                         f"{str(e)[:120]}); pass the folder holding train.json and val.json")
    return pack(layouts)


def load_data(dataset, data=None):
    """{'train', 'test'}. Shipped files: 'valid' trains, 'test' evaluates. --data: LayoutDM's split of the official
    files (train.json shuffled with torch seed 0, its first 95% train; val.json is the test set)."""
    if data is not None:
        train = load_coco(os.path.join(data, "train.json"))
        perm = torch.randperm(len(train["n"]), generator=torch.Generator().manual_seed(0)).numpy()
        return {"train": {k: v[perm[:int(len(perm) * 0.95)]] for k, v in train.items()},
                "test": load_coco(os.path.join(data, "val.json"))}
    return {s: read_layout_text(os.path.join(HERE, "data", dataset, f"src1_{f}.txt"), CLASSES[dataset])
            for s, f in (("train", "valid"), ("test", "test"))}


def to_features(boxes, labels, n_classes):
    """Numpy layouts -> (z (B, n, 4 + C), mask (B, n)): box * 2 - 1 and class one-hot * 2 - 1, zero on padding."""
    n = max(int((labels >= 0).sum(1).max()), 1)
    lab = torch.as_tensor(labels[:, :n], dtype=torch.long)
    mask = lab >= 0                                                              # (B, n)
    z = torch.cat([torch.as_tensor(boxes[:, :n], dtype=torch.float) * 2 - 1,
                   F.one_hot(lab.clamp(min=0), n_classes).float() * 2 - 1], -1)  # (B, n, 4 + C)
    return z * mask[..., None], mask


# -- model: a transformer over the set of elements, no positional encodings ------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the time embedding (DiT's adaLN-zero)."""

    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, elementwise_affine=False), nn.LayerNorm(d, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ada = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.ada.weight), nn.init.zeros_(self.ada.bias)        # every block starts as the identity

    def forward(self, h, c, pad):
        s1, b1, g1, s2, b2, g2 = self.ada(c)[:, None].chunk(6, -1)              # each (B, 1, d)
        x = self.norm1(h) * (1 + s1) + b1
        h = h + g1 * self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return h + g2 * self.mlp(self.norm2(h) * (1 + s2) + b2)


class Denoiser(nn.Module):
    """eps_theta(z_t, t, mask): (B, n, 4 + C) -> (B, n, 4 + C). Attention sees a set: permuting the elements
    permutes the output the same way; padded elements are masked out of attention and of the output."""

    def __init__(self, n_classes, d_model, n_layers, n_heads, **_):
        super().__init__()
        self.D, self.d_model = 4 + n_classes, d_model
        self.inp = nn.Linear(self.D, d_model)
        self.time_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model), nn.SiLU())
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm, self.final_ada = nn.LayerNorm(d_model, elementwise_affine=False), nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, self.D)
        for lin in (self.final_ada, self.out):
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)

    def forward(self, z, t, mask):
        """z (B, n, D), t (B,) in [0, 1], mask (B, n) bool -> eps (B, n, D)."""
        freqs = torch.exp(-math.log(10_000) * torch.arange(self.d_model // 2, device=z.device) / (self.d_model // 2))
        a = 1000 * t.float()[:, None] * freqs                                    # DDPM's sinusoidal embedding
        c = self.time_mlp(torch.cat([a.cos(), a.sin()], -1).to(z.dtype))        # (B, d)
        h = self.inp(z)                                                          # (B, n, d)
        for blk in self.blocks:
            h = blk(h, c, ~mask)
        s, b = self.final_ada(c)[:, None].chunk(2, -1)
        return self.out(self.norm(h) * (1 + s) + b) * mask[..., None]


def build_model(cfg):
    return Denoiser(**cfg)


def load_reference(ref, device, dataset):
    """(model, cfg) from a path or hf:org/repo/file; anything missing, corrupt or mismatched exits with one line."""
    try:
        ckpt = common.load_checkpoint(ref)
        cfg = ckpt["config"].get("model")
        if not isinstance(cfg, dict) or set(cfg) != {"n_classes", "d_model", "n_layers", "n_heads", "T", "schedule",
                                                     "dataset"}:
            raise common.CheckpointError(f"{ref!r} has no layout model config (not made by graft_layout.py)")
        if cfg["n_classes"] != len(CLASSES[dataset]):
            raise common.CheckpointError(f"{ref!r} has {cfg['n_classes']} classes, --dataset {dataset} has "
                                         f"{len(CLASSES[dataset])}")
        model, sd = build_model(cfg), ckpt["state_dicts"].get("ema") or ckpt["state_dicts"].get("model")
        if not isinstance(sd, dict):
            raise common.CheckpointError(f"{ref!r} has no 'ema' or 'model' weights")
        common.load_state(model, sd, f"checkpoint {ref!r}")
    except common.CheckpointError as e:
        raise SystemExit(f"graft_layout: {e}; pass --ref, or pre-train one with python graft_layout.py --pretrain "
                         f"(it writes runs/layout_pretrain_<preset>/ref.pt)")
    return model.to(device).eval(), cfg


# -- diffusion: schedule, training loss, sampler (P-GRAFT stitching lives in the sampler) ---------------------

def make_abar(cfg):
    return torch.tensor(common.noise_schedule(cfg["schedule"], cfg["T"]), dtype=torch.float32)  # (T+1,)


def step_mean_std(eps, z_t, abar, t, s):
    """Gaussian p(z_s | z_t) of the ancestral sampler for any s < t: DDPM's posterior q(z_s | z_t, x_0) at the
    predicted x_0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to the data range [-1, 1] as DDPM's
    clip_denoised does (without it, an eps error near t = T is amplified by 1 / sqrt(abar_T))."""
    a_t, a_s = abar[t], abar[s]
    x0 = ((z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    mean = (a_s.sqrt() * (1 - a_t / a_s) * x0 + (a_t / a_s).sqrt() * (1 - a_s) * z_t) / (1 - a_t)
    return mean, ((1 - a_t / a_s) * (1 - a_s) / (1 - a_t)).sqrt()


def decode(z0, mask, grid=0):
    """Clean state -> numpy layouts: boxes (B, 25, 4) centre format, clipped to the page and, with `grid`, corners
    rounded to the data's bins (v = round(v (grid - 1)) / (grid - 1)); labels (B, 25) int8 argmax, -1 padding."""
    B, n, _ = z0.shape
    ltrb = to_ltrb(((z0[..., :4] + 1) / 2).clamp(0, 1)).clamp(0, 1)           # (B, n, 4)
    if grid:
        ltrb = torch.round(ltrb * (grid - 1)) / (grid - 1)
    boxes, labels = np.zeros((B, MAX_N, 4), np.float32), np.full((B, MAX_N), -1, np.int8)
    boxes[:, :n] = (to_centre(ltrb) * mask[..., None]).numpy()
    labels[:, :n] = torch.where(mask, z0[..., 4:].argmax(-1), -1).numpy()
    return boxes, labels


@torch.no_grad()
def sample(net_hi, net_lo, n_elem, abar, N, N_I=0, batch=200, save_at=(), keep_traj=False, x_start=None,
           grid=0, amp=False, desc="sampling"):
    """Ancestral sampling over the grid tau_N > ... > tau_0 = 0, then one x_0-prediction (NFE = N + 1).
    Stitching (SPEC 3): net_hi takes the steps from tau_k for k > N_I (down to s = tau_{N_I}), net_lo the rest
    and the final x_0-prediction. Reference: (ref, ref). P-GRAFT: (fine-tuned, ref). RP-GRAFT: (ref, fine-tuned).
    save_at: steps k whose state z_{tau_k} comes back in res["x_s"][k] (padded to 25 elements; k = 0: the decoded
    layout as features, GRAFT's data). x_start: (M, 25, D) states at step N_I to continue from (variance curve).
    keep_traj: trajectory (M, N+1, 25, D) and log-probs (M, N), for DDPO. Layouts are batched by element count
    so little compute goes to padding; results come back in input order."""
    T, tau = len(abar) - 1, common.time_grid(len(abar) - 1, N)
    dev, D = next(net_lo.parameters()).device, net_lo.D
    order = np.argsort(n_elem, kind="stable")
    out, x_s = {k: [] for k in ("boxes", "labels", "traj", "logp")}, {k: [] for k in save_at}
    pad = lambda a: F.pad(a, (0, 0, 0, MAX_N - a.shape[-2]))
    for b in tqdm(range(0, len(order), batch), desc=desc, leave=False):
        nb = n_elem[order[b:b + batch]]
        B, n = len(nb), int(nb.max())
        mask = torch.arange(n)[None] < torch.as_tensor(nb)[:, None]             # (B, n)
        if x_start is None:
            z, k0 = torch.randn(B, n, D) * mask[..., None], N                   # z_T (B, n, D)
        else:
            z, k0 = x_start[order[b:b + batch]][:, :n].clone(), N_I
        traj, logps = [z], []
        for k in range(k0, 0, -1):
            if k in x_s:
                x_s[k].append(pad(z))
            t, s = tau[k], tau[k - 1]
            with common.autocast(dev, amp):
                eps = (net_hi if k > N_I else net_lo)(z.to(dev), torch.full((B,), t / T, device=dev),
                                                       mask.to(dev)).float().cpu()
            mean, std = step_mean_std(eps, z, abar, t, s)
            z_new = mean + std * torch.randn(z.shape) * mask[..., None]         # (B, n, D)
            if keep_traj:  # the last step has std 0 (abar_0 = 1): no log-prob, never trained
                logps.append(common.gaussian_logp(z_new, mean, std, mask) if std > 0 else torch.zeros(B))
                traj.append(z_new)
            z = z_new
        with common.autocast(dev, amp):
            eps = net_lo(z.to(dev), torch.zeros(B, device=dev), mask.to(dev)).float().cpu()
        boxes, labels = decode((z - (1 - abar[0]).sqrt() * eps) / abar[0].sqrt(), mask, grid)
        out["boxes"].append(boxes), out["labels"].append(labels)
        if 0 in x_s:
            x_s[0].append(pad(to_features(boxes, labels, D - 4)[0]))
        if keep_traj:
            out["traj"].append(pad(torch.stack(traj, 1))), out["logp"].append(torch.stack(logps, 1))
    inv = torch.as_tensor(np.argsort(order, kind="stable"))
    res = {"boxes": np.concatenate(out["boxes"])[inv], "labels": np.concatenate(out["labels"])[inv],
           "x_s": {k: torch.cat(v)[inv] for k, v in x_s.items()}}
    if keep_traj:
        res["traj"], res["logp"] = torch.cat(out["traj"])[inv], torch.cat(out["logp"])[inv]  # (M, N+1, 25, D), (M, N)
    return res


# -- metrics (SPEC 6, LayoutGAN++'s definitions) ---------------------------------------------------------------

def alignment(boxes, labels):
    """Per-layout LayoutGAN++ alignment (report the mean x100): for each real element i the six coordinates
    (xl, xc, xr, yt, yc, yb), d_i = min over real j != i and the 6 kinds of |c_ik - c_jk|, g_i = -log(1 - d_i),
    mean of g_i over the real elements. Padding takes no part, as i or as j (LayoutGAN++'s code masks only i).
    An element with no partner (a one-element layout) gets d_i = 1 there, which LayoutGAN++ maps to g_i = 0: so here."""
    keep = (labels >= 0).any(0)                                                  # drop all-padding columns
    mask, b = labels[:, keep] >= 0, boxes[:, keep].astype(np.float64)           # (B, n), (B, n, 4)
    ltrb = to_ltrb(b)
    coords = (ltrb[..., 0], b[..., 0], ltrb[..., 2], ltrb[..., 1], b[..., 1], ltrb[..., 3])
    d = functools.reduce(np.minimum, (np.abs(c[:, :, None] - c[:, None]) for c in coords))  # (B, n_i, n_j)
    partner = mask[:, :, None] & mask[:, None] & ~np.eye(mask.shape[1], dtype=bool)
    d = np.where(partner, d, 1.0).min(-1, initial=1.0)                          # (B, n)
    g = np.where(d < 1, -np.log1p(-np.clip(d, 0, 1 - 1e-12)), 0.0)
    return (g * mask).sum(-1) / np.maximum(mask.sum(-1), 1)


def overlap(boxes, labels):
    """Per-layout LayoutGAN++ overlap: sum over ordered pairs of real elements i != j of intersection / area(i),
    divided by the number of real elements (a zero-area element adds 0, as LayoutGAN++'s nan_to_num does)."""
    keep = (labels >= 0).any(0)
    mask = labels[:, keep] >= 0
    l, t, r, b = np.moveaxis(to_ltrb(boxes[:, keep].astype(np.float64)), -1, 0)  # each (B, n)
    iw = np.clip(np.minimum(r[:, :, None], r[:, None]) - np.maximum(l[:, :, None], l[:, None]), 0, None)
    ih = np.clip(np.minimum(b[:, :, None], b[:, None]) - np.maximum(t[:, :, None], t[:, None]), 0, None)
    area = ((r - l) * (b - t))[:, :, None]                                       # (B, n, 1): area of i
    pair = mask[:, :, None] & mask[:, None] & ~np.eye(mask.shape[1], dtype=bool) & (area > 0)
    return np.where(pair, iw * ih / np.where(area > 0, area, 1), 0).sum((1, 2)) / np.maximum(mask.sum(-1), 1)


def layout_keys(boxes, labels):
    """A layout's identity for de-duplication: its elements, sorted, on a 1/1000 grid."""
    return [str(sorted((int(c), *np.round(b * 1000).astype(int).tolist()) for b, c in zip(bx, lb) if c >= 0))
            for bx, lb in zip(boxes, labels)]


class LayoutNet(nn.Module):
    """graft's layout-FID feature network: a transformer over the element set with a summary token, trained once
    to tell real training layouts from perturbed ones (LayoutGAN++'s LayoutNet is a real/fake discriminator too).
    The summary token (128-d) is the feature. Not LayoutDM's FIDNetV3 weights: its FIDs are not comparable."""

    def __init__(self, n_classes, d=128, layers=2, heads=4):
        super().__init__()
        self.inp, self.token = nn.Linear(4 + n_classes, d), nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, 1)

    def features(self, z, mask):
        h = torch.cat([self.token.expand(len(z), -1, -1), self.inp(z)], 1)      # (B, 1 + n, d)
        return self.enc(h, src_key_padding_mask=torch.cat([torch.zeros_like(mask[:, :1]), ~mask], 1))[:, 0]


def perturb(z, mask, gen):
    """Fake layouts for the FID net. Half of them: every box jittered (log-uniform scale 0.25%..5% of the page),
    which is what misalignment looks like; a quarter: random classes for about half the elements; a quarter:
    uniformly redrawn boxes for about half the elements."""
    B, n, D = z.shape
    kind = torch.tensor([0, 0, 1, 2])[torch.randint(4, (B, 1, 1), generator=gen)]
    some = torch.rand(B, n, 1, generator=gen) < 0.5
    sigma = torch.exp(torch.rand(B, 1, 1, generator=gen) * math.log(20)) * 0.005
    boxes = z[..., :4] + (kind == 0) * sigma * torch.randn(B, n, 4, generator=gen)
    boxes = torch.where((kind == 2) & some, torch.rand(B, n, 4, generator=gen) * 2 - 1, boxes)
    cls = F.one_hot(torch.randint(D - 4, (B, n), generator=gen), D - 4).float() * 2 - 1
    return torch.cat([boxes.clamp(-1, 1), torch.where((kind == 1) & some, cls, z[..., 4:])], -1) * mask[..., None]


def fid_network(path, train, n_classes, steps, seed=0):
    """The cached FID feature net, or train it once on the training layouts (batches of 64 real + 64 fake, Adam
    1e-3, logistic loss) and cache it."""
    torch.manual_seed(seed)                                                      # the same initial weights always
    net = LayoutNet(n_classes)
    if not os.path.exists(path):
        print(f"training the layout-FID feature network {FID_NET_NAME} once ({steps} steps) -> {path}")
        gen = torch.Generator().manual_seed(seed)
        opt, step = torch.optim.Adam(net.parameters(), lr=1e-3), 0
        while step < steps:
            for idx in common.size_bucketed_batches(train["n"], 64, gen)[:steps - step]:
                z, mask = to_features(train["boxes"][idx], train["labels"][idx], n_classes)
                logits = net.head(net.features(torch.cat([z, perturb(z, mask, gen)]), torch.cat([mask, mask])))
                loss = F.binary_cross_entropy_with_logits(logits.squeeze(-1), (torch.arange(2 * len(idx)) < len(idx)).float())
                opt.zero_grad(set_to_none=True), loss.backward(), opt.step()
                step += 1
        common.save_checkpoint(path, {"model": net.state_dict()}, {"name": FID_NET_NAME, "steps": steps},
                               {"final_loss": loss.item()})
    try:
        common.load_state(net, common.load_checkpoint(path)["state_dicts"]["model"], f"FID net {path!r}")
    except (common.CheckpointError, KeyError) as e:
        raise SystemExit(f"graft_layout: {e}; delete {path} to retrain it")
    return net.eval()


class LayoutFID:
    """FID against the real test set's features (computed once) with the named feature network."""

    def __init__(self, net, n_classes, test, path):
        self.net, self.n_classes, self.real = net, n_classes, None
        self.info = {"name": FID_NET_NAME, "path": os.path.relpath(path, HERE) if path.startswith(HERE) else path,
                     "sha1": common.sha1_file(path), "note": "layout FID with graft's own feature network; not comparable with "
                     "LayoutDM's FIDNetV3 or LayoutGAN++'s LayoutNet numbers"}
        self.real = self.stats(test["boxes"], test["labels"])

    @torch.no_grad()
    def stats(self, boxes, labels):
        f = np.concatenate([self.net.features(*to_features(boxes[i:i + 1000], labels[i:i + 1000], self.n_classes))
                            .double().numpy() for i in range(0, len(boxes), 1000)])
        return f.mean(0), np.cov(f, rowvar=False)

    def __call__(self, boxes, labels):
        return common.frechet_distance(*self.stats(boxes, labels), *self.real)


def class_freq(labels, n_classes):
    """Fraction of the elements in each class."""
    return (np.bincount(labels[labels >= 0], minlength=n_classes) / max((labels >= 0).sum(), 1)).round(4).tolist()


def evaluate(boxes, labels, fid):
    """SPEC 6: alignment x100 and overlap with 95% CIs, layout FID against the test set; distinct layouts; the
    class mix (the FID net reacts strongly to it)."""
    keys = layout_keys(boxes, labels)
    return {"alignment_x100": common.mean_ci95(100 * alignment(boxes, labels)),
            "overlap": common.mean_ci95(overlap(boxes, labels)), "fid": {"mean": fid(boxes, labels), "ci95": None},
            "unique": len(set(keys)) / len(keys), "n_elements": float((labels >= 0).sum(1).mean()),
            "class_freq": class_freq(labels, fid.n_classes)}


# -- reward: a plain function (boxes (B, 25, 4) centre format in [0, 1], labels (B, 25), -1 padding) -> (B,) --

def reward_alignment(boxes, labels):
    """The negative LayoutGAN++ alignment x100 of each layout: higher is better aligned."""
    return torch.as_tensor(-100 * alignment(boxes, labels))


def reward_overlap(boxes, labels):
    return torch.as_tensor(-overlap(boxes, labels))


def reward_alignment_overlap(boxes, labels):
    """Both, so that alignment cannot be bought by stacking elements: -(alignment x100 + overlap)."""
    return reward_alignment(boxes, labels) + reward_overlap(boxes, labels)


REWARDS = {"alignment": reward_alignment, "overlap": reward_overlap, "alignment_overlap": reward_alignment_overlap}


# -- pre-training the reference model (resumable) ---------------------------------------------------------------

def pretrain(args, device):
    """eps loss at uniform t, AdamW after a linear warm-up, EMA weights for sampling; resumable from <out>/ref.pt
    (common.train_resumable)."""
    data, cfg, path = load_data(args.dataset, args.data)["train"], model_config(args), os.path.join(args.out, "ref.pt")
    model, ema = build_model(cfg).to(device), build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    abar = make_abar(cfg).to(device)
    print(f"pre-training {sum(p.numel() for p in model.parameters()):,} parameters on {len(data['n']):,} "
          f"{args.dataset} layouts, batch {args.batch_size}, lr {args.lr}, to step {args.train_steps}")

    def batches(step, gen):
        while True:
            for idx in common.size_bucketed_batches(data["n"], args.batch_size, gen):
                z, mask = to_features(data["boxes"][idx], data["labels"][idx], cfg["n_classes"])
                yield z.to(device), mask.to(device)

    def loss_fn(net, batch, gen):
        return common.shaped_loss(net, *batch, abar, 1, cfg["T"])

    refuse = lambda saved: None if saved.get("model") == cfg else (
        f"graft_layout: {path} was trained with {saved.get('model')}, not {cfg}; use another --out or the same size flags")
    step = common.train_resumable(path, {"model": cfg, "command": " ".join(sys.argv)}, model, ema, opt, batches,
                                  loss_fn, args.train_steps, args, device, "pre-training", refuse,
                                  lr_at=lambda step: args.lr * min(1.0, (step + 1) / max(args.warmup, 1)))
    print(f"saved {path} at step {step}")


# -- fine-tuning: GRAFT / P-GRAFT / RP-GRAFT (paper Alg. 1-2) and DDPO (SPEC 4) ---------------------------------

def score(res, reward_fn):
    """Rewards of sampled layouts; a reward that is NaN or of the wrong shape stops the run."""
    r = torch.as_tensor(reward_fn(res["boxes"], res["labels"]), dtype=torch.float32)
    if r.shape != (len(res["boxes"]),):
        raise SystemExit(f"graft_layout: the reward returned shape {tuple(r.shape)}, expected ({len(res['boxes'])},)")
    if not torch.isfinite(r).all():
        raise SystemExit(f"graft_layout: the reward returned {int((~torch.isfinite(r)).sum())} NaN/inf values")
    return r


RESUME_KEYS = common.RESUME_KEYS + ("dataset", "data", "grid")


def finetune(args, ref, ref_cfg, abar, hist, device):
    """GRAFT rounds (or DDPO epochs): draw M, score, accept, train; a checkpoint after every round."""
    ft = common.maybe_compile(build_model(ref_cfg).to(device), args.compile)
    ft.load_state_dict(ref.state_dict())
    opt = torch.optim.Adam(ft.parameters(), lr=args.ddpo_lr if args.algo == "ddpo" else args.ft_lr)
    state_path = os.path.join(args.out, "state.pt")
    key = {k: getattr(args, k) for k in RESUME_KEYS} | {"ref": args.ref}
    rounds, compute = [], {"samples": 0, "nfe_sampling": 0, "grad_calls": 0, "wall_s": 0.0}
    if os.path.exists(state_path):
        st = common.load_checkpoint(state_path)
        if st["config"].get("resume_key") != key:
            raise SystemExit(f"graft_layout: {args.out} holds a run with other settings; use another --out")
        common.load_state(ft, st["state_dicts"]["model"], state_path)
        opt.load_state_dict(st["state_dicts"]["opt"])
        rounds, compute = st["extra"]["rounds"], st["extra"]["compute"]
        print(f"resuming after round {len(rounds)}")
    save_k, t_lo, t_hi, abar_s = common.training_window(args, abar, common.time_grid(len(abar) - 1, args.N))
    for rnd in range(len(rounds), args.rounds):
        t0 = time.time()
        torch.manual_seed(args.seed * 1_000_003 + rnd)  # per-round seeding: a resumed run repeats exactly
        n_elem = np.random.RandomState(args.seed * 1_000_003 + rnd).choice(len(hist), args.M, p=hist)
        on_ref = args.sample_from == "reference" and args.algo != "ddpo"  # DDPO stays on-policy
        hi, lo, N_I = (ref, ref, args.N_I) if on_ref else common.samplers(args, ref, ft)
        res = sample(hi, lo, n_elem, abar, args.N, N_I, args.sample_batch, save_at=() if args.algo == "ddpo"
                     else (save_k,), keep_traj=args.algo == "ddpo", grid=args.grid, amp=args.amp,
                     desc=f"round {rnd + 1} sampling")
        r, keys = score(res, REWARDS[args.reward]), layout_keys(res["boxes"], res["labels"])
        if args.algo == "ddpo":
            grad, acc = common.ddpo_update(ft, opt, res, r, n_elem, abar, args.N, args, step_mean_std), torch.arange(args.M)
        else:
            acc = common.accept(r, args.accept, K=args.K, tau=args.tau, keys=keys if args.dedup else None,
                                groups=n_elem if args.stratify else None)
            if len(acc) == 0:
                raise SystemExit(f"graft_layout: round {rnd + 1} accepted no sample; lower --tau or raise --M")
            grad = common.train_on_accepted(ft, opt, res["x_s"][save_k][acc], n_elem[acc.numpy()], abar, t_lo, t_hi,
                                            abar_s, args.ft_steps, args.batch_size, args.amp, ema_decay=args.ft_ema)
        wall = time.time() - t0
        compute = {"samples": compute["samples"] + args.M, "nfe_sampling": compute["nfe_sampling"] + args.M * (args.N + 1),
                   "grad_calls": compute["grad_calls"] + grad, "wall_s": compute["wall_s"] + wall}
        rounds.append({"round": rnd + 1, "mean_reward": float(r.mean()), "accept_rate": len(acc) / args.M,
                       "accepted_mean_reward": float(r[acc].mean()) if args.algo != "ddpo" else None,
                       "alignment_x100": float(100 * alignment(res["boxes"], res["labels"]).mean()),
                       "overlap": float(overlap(res["boxes"], res["labels"]).mean()),
                       "unique": len(set(keys)) / args.M, "samples_per_s": args.M / wall, "round_wall_s": wall,
                       **compute})
        common.save_checkpoint(state_path, {"model": ft.state_dict(), "opt": opt.state_dict()},
                               {"resume_key": key, "model": ref_cfg}, {"rounds": rounds, "compute": compute})
        common.write_jsonl(os.path.join(args.out, "metrics.jsonl"), rounds)
        print(f"round {rnd + 1}/{args.rounds}: mean reward {r.mean():.4f}, accepted {len(acc)}/{args.M}, alignment "
              f"x100 {rounds[-1]['alignment_x100']:.3f}, overlap {rounds[-1]['overlap']:.4f}, {args.M / wall:.1f} samples/s")
    return ft, rounds, compute


# -- evaluation -------------------------------------------------------------------------------------------------

def evaluate_sampler(hi, lo, N_I, args, abar, hist, fid, desc):
    """n_eval layouts from the same seed for every model (common random numbers), SPEC 6 metrics."""
    torch.manual_seed(args.seed + 12_345)
    n_elem = np.random.RandomState(args.seed + 12_345).choice(len(hist), args.n_eval, p=hist)
    t0 = time.time()
    res = sample(hi, lo, n_elem, abar, args.N, N_I, args.sample_batch, grid=args.grid, amp=args.amp, desc=desc)
    wall = time.time() - t0
    metrics = evaluate(res["boxes"], res["labels"], fid) | {"reward": common.mean_ci95(score(res, REWARDS[args.reward]))}
    return {"n_samples": args.n_eval, "nfe": args.n_eval * (args.N + 1), "wall_s": wall,
            "samples_per_s": args.n_eval / wall, "metrics": metrics}, res


def real_floor(args, data, fid):
    """The real data's own scores, the floor a model can reach: alignment and overlap of the whole test set, and
    the FID of n_eval training layouts against it (a model's FID uses the same sample size)."""
    te, tr = data["test"], data["train"]
    idx = np.random.RandomState(args.seed).choice(len(tr["n"]), min(args.n_eval, len(tr["n"])), replace=False)
    return {"n_samples": len(te["n"]), "metrics": {
        "alignment_x100": common.mean_ci95(100 * alignment(te["boxes"], te["labels"])),
        "overlap": common.mean_ci95(overlap(te["boxes"], te["labels"])), "n_elements": float(te["n"].mean()),
        "class_freq": class_freq(te["labels"], fid.n_classes),
        "fid": {"mean": fid(tr["boxes"][idx], tr["labels"][idx]), "ci95": None, "n_train_layouts": len(idx)}}}


def reference_eval(args, ref, abar, hist, fid):
    """The reference model's evaluation, cached by (checkpoint, FID net, this script, N, n_eval, seed, reward, grid):
    every run of a sweep compares against the same numbers without paying for them again."""
    tag = (f"{args.dataset}_{common.sha1_file(common.resolve_ref(args.ref))}_{fid.info['sha1']}_{common.sha1_file(__file__)}_N{args.N}"
           f"_n{args.n_eval}_s{args.seed}_{args.reward}_g{args.grid}")  # this file's hash: a changed sampler re-runs
    cache = os.path.join(args.cache_dir, "reference_evals", tag)
    if os.path.exists(cache + ".json"):
        with open(cache + ".json") as f, np.load(cache + ".npz") as z:
            return json.load(f), {"boxes": z["boxes"], "labels": z["labels"]}
    ev, res = evaluate_sampler(ref, ref, 0, args, abar, hist, fid, "reference eval")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez_compressed(cache + ".tmp.npz", boxes=res["boxes"], labels=res["labels"])
    os.replace(cache + ".tmp.npz", cache + ".npz")
    common.write_json(cache + ".json", ev)
    return ev, res


def save_grid(boxes, labels, classes, aspect, path, title, rows=4, cols=6):
    """PNG grid of the first rows x cols layouts, each element a box coloured by its class."""
    plt, C = common.pyplot(), len(classes)
    colors = plt.get_cmap("tab10")(np.arange(C)) if C <= 10 else plt.get_cmap("turbo")(np.linspace(0.05, 0.95, C))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.6 * aspect + 0.6))
    for ax, bx, lb in zip(axes.flat, boxes, labels):
        for (l, t, r, b), c in zip(to_ltrb(bx[lb >= 0]), lb[lb >= 0]):
            ax.add_patch(plt.Rectangle((l, t), r - l, b - t, facecolor=(*colors[c][:3], 0.35), edgecolor=colors[c]))
    for ax in axes.flat:
        ax.set_xlim(0, 1), ax.set_ylim(1, 0), ax.set_aspect(aspect), ax.set_xticks([]), ax.set_yticks([])
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in range(C)], classes, loc="lower center",
               ncol=min(C, 7), fontsize=7)
    fig.suptitle(title, fontsize=9), fig.tight_layout(rect=(0, 0.07, 1, 0.97)), fig.savefig(path, dpi=110), plt.close(fig)


def measure_variance(args, ref, abar, hist):
    """SPEC 3: E[Var(r(X_0) | X_t)] at t = tau_{N_I} for a grid of n_i. P base trajectories of the reference,
    R stochastic continuations from each saved x_t, the within-group variance averaged over groups."""
    grid = sorted({round(f * args.N) for f in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)})
    torch.manual_seed(args.seed)
    n_elem = np.random.RandomState(args.seed).choice(len(hist), args.var_P, p=hist)
    base = sample(ref, ref, n_elem, abar, args.N, 0, args.sample_batch, save_at=grid, grid=args.grid,
                  desc="base trajectories")
    curve = []
    for N_I in grid:
        x = base["x_s"][N_I].repeat_interleave(args.var_R, 0)                     # (P R, 25, D)
        res = sample(ref, ref, np.repeat(n_elem, args.var_R), abar, args.N, N_I, args.sample_batch, x_start=x,
                     grid=args.grid, desc=f"continuations from N_I={N_I}")
        r = score(res, REWARDS[args.reward]).view(args.var_P, args.var_R)
        within = r.var(1, unbiased=True)                                         # (P,)
        curve.append({"n_i": N_I / args.N, "N_I": N_I, "t": int(common.time_grid(args.T, args.N)[N_I]),
                      "cond_var": common.mean_ci95(within.numpy()), "total_var": float(r.flatten().var())})
        print(f"n_i {N_I / args.N:.2f}: E[Var(r|x_t)] = {within.mean():.5f} (total Var(r) {r.var():.5f})")
    common.write_json(os.path.join(args.out, "variance.json"), {"reward": args.reward, "P": args.var_P,
                                                                  "R": args.var_R, "N": args.N, "curve": curve})
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([c["n_i"] for c in curve], [c["cond_var"]["mean"] for c in curve], fmt="o-", capsize=3,
                yerr=[c["cond_var"]["mean"] - c["cond_var"]["ci95"][0] for c in curve])
    ax.set_xlabel("n_i  (switch step N_I / N)"), ax.set_ylabel(f"E[Var({args.reward} | x_t)]"), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(os.path.join(args.out, "variance_curve.png"), dpi=120), plt.close(fig)
    return curve


# -- main -------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    common.seed_everything(args.seed)
    device = common.get_device(args.device)
    prefix = "layout" + ("" if args.dataset == "publaynet" else f"_{args.dataset}") + ("_full" if args.data else "")
    if args.pretrain:
        args.out = args.out or os.path.join("runs", f"{prefix}_pretrain_{args.preset}")
        return pretrain(args, device)
    method = "reference" if args.eval_only else "variance" if args.measure_variance else common.method_name(args)
    args.out = args.out or os.path.join("runs", f"{prefix}_{method}" + (f"_ni{args.n_i}" if args.N_I else ""))
    os.makedirs(args.out, exist_ok=True)
    ref, ref_cfg = load_reference(args.ref, device, args.dataset)
    data = load_data(args.dataset, args.data)
    hist = np.bincount(data["train"]["n"], minlength=MAX_N + 1) / len(data["train"]["n"])  # p(n elements)
    abar, ref, tau = make_abar(ref_cfg), common.maybe_compile(ref, args.compile), common.time_grid(ref_cfg["T"], args.N)
    print(f"reference: {args.ref} ({sum(p.numel() for p in ref.parameters()):,} parameters, {ref_cfg}); "
          f"{len(data['train']['n']):,} train / {len(data['test']['n']):,} test layouts, grid {args.grid}")
    if args.measure_variance:
        return measure_variance(args, ref, abar, hist)
    if not args.eval_only:
        print(common.plan(method, args, tau, ref_cfg["T"]))
    t0, classes, aspect = time.time(), CLASSES[args.dataset], PAGE_ASPECT[args.dataset]
    fid = LayoutFID(fid_network(args.fid_net, data["train"], len(classes), args.fid_steps, args.seed), len(classes),
                    data["test"], args.fid_net)
    reference, ref_samples = reference_eval(args, ref, abar, hist, fid)
    save_grid(ref_samples["boxes"], ref_samples["labels"], classes, aspect,
              os.path.join(args.out, "layouts_reference.png"), f"reference model ({os.path.basename(args.ref)})")
    results = {"task": "layout", "method": method, "n_i": args.n_i,
               "command": "python graft_layout.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "config": dict(vars(args)) | {"model": ref_cfg}, "fid_net": fid.info,
               "real_test": real_floor(args, data, fid), "reference": reference}
    if not args.eval_only:
        ft, rounds, compute = finetune(args, ref, ref_cfg, abar, hist, device)
        hi, lo, N_I = common.samplers(args, ref, ft)
        finetuned, ft_samples = evaluate_sampler(hi, lo, N_I, args, abar, hist, fid, "fine-tuned eval")
        save_grid(ft_samples["boxes"], ft_samples["labels"], classes, aspect,
                  os.path.join(args.out, "layouts_finetuned.png"), f"{method} (n_i {args.n_i}), {args.reward} reward")
        results |= {"finetuned": finetuned, "compute": compute, "rounds": rounds}
    results["wall_s"] = time.time() - t0
    common.write_json(os.path.join(args.out, "results.json"), results)
    for name in ("real_test", "reference", "finetuned"):
        if name in results:
            m = results[name]["metrics"]
            print(f"{name:>10}: " + ", ".join(f"{k} {m[k]['mean']:.4f}" for k in ("alignment_x100", "overlap", "fid"))
                  + ", class mix " + " ".join(f"{c} {f:.3f}" for c, f in zip(classes, m["class_freq"])))
    print(f"wrote {os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
