"""graft_molecule.py — GRAFT / P-GRAFT on QM9 (arXiv 2510.02692, the molecule experiment).

    python graft_molecule.py --n_i 0.25            # P-GRAFT from the shipped reference model
    python graft_molecule.py --n_i 0               # GRAFT
    python graft_molecule.py --n_i 0.25 --rp       # RP-GRAFT (reverse stitching, the paper's ablation)
    python graft_molecule.py --algo ddpo           # the policy-gradient baseline
    python graft_molecule.py --eval_only           # metrics of the reference model
    python graft_molecule.py --measure_variance    # E[Var(r(X_0) | X_t)] over t (docs/method.md §3)
    python graft_molecule.py --pretrain --preset paper --device cuda   # pre-train a reference model

An E(3)-equivariant diffusion model (EDM, Hoogeboom et al. 2022) over 3-D molecules with hydrogens: positions
(zero centre of mass) and atom-type one-hots are noised jointly, an EGNN predicts the noise, and an ancestral
sampler generates. GRAFT keeps the Top-K of M samples by reward and fine-tunes on them; P-GRAFT keeps the
*intermediate* states x_s of the accepted samples and fine-tunes only the steps above s.
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

import acceptance
import common
import pretraining
from egnn import EGNNDynamics, edm_state_dict, remove_mean
from qm9 import CHARGES, MAX_N, Molecule, evaluate, load_qm9, molecules, training_smiles  # noqa: F401

# -- config: presets, flags, the derived quantities printed at start -----------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_REF = os.path.join(HERE, "checkpoints", "qm9_egnn_cpu.pt")

PRESETS = {
    # small enough to sample ~1,000 molecules in a few minutes on 2 CPU cores
    "cpu": dict(nf=64, n_layers=4, N=250, n_eval=1000, M=500, K=100, rounds=3, ft_steps=150,
                ft_ema=0.0, batch_size=64, lr=5e-4, ema_decay=0.999, train_steps=200_000),
    # EDM's QM9 model (nf 256, 9 layers): its released checkpoint loads into this size
    "paper": dict(nf=256, n_layers=9, N=1000, n_eval=10_000, M=10_000, K=1_000, rounds=4, ft_steps=2_000,
                  ft_ema=0.0, batch_size=64, lr=1e-4, ema_decay=0.9999, train_steps=1_500_000),
}
# the settings a fine-tuning run's state.pt must share with the command that resumes it
RESUME_KEYS = ("algo", "n_i", "rp", "M", "K", "accept", "tau", "dedup", "stratify", "sample_from", "ft_steps",
               "ft_lr", "ft_ema", "reward", "N", "T", "seed", "batch_size", "ddpo_lr", "ddpo_batch",
               "ddpo_steps_frac", "ddpo_clip")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="cpu", help="size and budget preset; flags below override it")
    # what to run
    a("--pretrain", action="store_true", help="pre-train a reference model (resumable) "
      "instead of fine-tuning")
    a("--eval_only", action="store_true", help="only evaluate the reference model")
    a("--measure_variance", action="store_true", help="measure E[Var(r(X_0)|X_t)] on a grid of n_i")
    a("--algo", choices=["graft", "ddpo"], default="graft", help="rejection-sampling fine-tuning or DDPO")
    a("--ref", default=DEFAULT_REF, help="reference checkpoint: a path or hf:org/repo/file (EDM's released "
      "generative_model_ema.npy also loads, with --preset paper)")
    a("--out", default=None, help="output folder (default runs/molecule_<method>)")
    a("--data_dir", default=os.path.join(HERE, "data", "qm9"), help="where the preprocessed QM9 cache lives")
    # model (must match the checkpoint)
    a("--nf", type=int, help="EGNN hidden width")
    a("--n_layers", type=int, help="EGNN equivariant blocks")
    a("--no_attention", action="store_true", help="drop EDM's edge attention")
    a("--no_tanh", action="store_true", help="drop EDM's tanh bound on coordinate updates")
    a("--no_charges", action="store_true", help="drop EDM's nuclear-charge feature (EDM keeps it)")
    # diffusion
    a("--T", type=int, default=1000, help="diffusion time steps of the training schedule")
    a("--schedule", default="polynomial_2", choices=["polynomial_2", "linear", "cosine"],
      help="noise schedule")
    a("--N", type=int, help="sampler steps (an evenly spaced sub-grid of 0..T; NFE per sample = N + 1)")
    # reward and GRAFT / P-GRAFT / RP-GRAFT (paper Alg. 1-2, docs/method.md §2-3)
    a("--reward", default="stable", help="reward: stable | valid | atom_stable | qed "
      "(or one added to REWARDS)")
    a("--n_i", type=float, default=0.0, help="P-GRAFT switch: N_I = round(n_i N); 0 is plain GRAFT")
    a("--rp", action="store_true", help="RP-GRAFT: reference above s, fine-tuned model below (ablation)")
    a("--M", type=int, help="molecules drawn per round")
    a("--K", type=int, help="molecules accepted per round (Top-K of M)")
    a("--accept", choices=["top_k", "best_of_n", "threshold"], default="top_k", help="acceptance rule")
    a("--tau", type=float, help="reward threshold for --accept threshold")
    a("--no_dedup", action="store_true", help="keep duplicate SMILES before ranking "
      "(de-duplication is default)")
    a("--stratify", action="store_true", help="Top-K within each atom count, K split in proportion: "
      "the accepted molecules keep the size histogram instead of favouring sizes that score well")
    a("--rounds", type=int, help="GRAFT rounds (or DDPO epochs of M samples)")
    a("--sample_from", choices=["current", "reference"], default="current", help="GRAFT: draw each round "
      "from the current fine-tuned model (tilts compound) or always from the reference (one tilt)")
    a("--ft_steps", type=int, help="fine-tuning gradient steps per round")
    a("--ft_lr", type=float, default=1e-4, help="fine-tuning learning rate (Adam)")
    a("--ft_ema", type=float, help="GRAFT: each round keeps the EMA of its fine-tuning iterates "
      "with this decay (0 keeps the last iterate)")
    # DDPO (docs/method.md §4)
    a("--ddpo_lr", type=float, default=1e-5, help="DDPO learning rate "
      "(full fine-tuning, lower than LoRA's 3e-4)")
    a("--ddpo_batch", type=int, default=50, help="trajectories per DDPO gradient step")
    a("--ddpo_steps_frac", type=float, default=0.1, help="fraction of sampler steps trained per trajectory")
    a("--ddpo_clip", type=float, default=1e-4, help="PPO clip range "
      "(tiny, for per-dimension-averaged log-probs)")
    # pre-training
    a("--batch_size", type=int, help="molecules per pre-training / fine-tuning step")
    a("--lr", type=float, help="pre-training learning rate")
    a("--ema_decay", type=float, help="EMA decay of pre-training weights")
    a("--train_steps", type=int, help="pre-training steps in total (resumable)")
    a("--max_minutes", type=float, default=None, help="stop pre-training after this many minutes "
      "(resume later)")
    # evaluation
    a("--n_eval", type=int, help="samples for the evaluation of each model")
    a("--sample_batch", type=int, default=250, help="molecules per sampler batch")
    a("--var_R", type=int, default=8, help="continuations per intermediate state for --measure_variance")
    a("--var_P", type=int, default=64, help="intermediate states per n_i for --measure_variance")
    # runtime
    a("--seed", type=int, default=0, help="seed: a CPU run is reproducible")
    a("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    a("--amp", action="store_true", help="bf16 autocast (GPU)")
    a("--compile", action="store_true", help="torch.compile the network")
    return p


def parse_args(argv=None):
    """Flags, the preset's values for those left unset, one-line errors (exit 2),
    and the derived N_I, dedup."""
    p = build_parser()
    args = p.parse_args(argv)
    unset = {k: v for k, v in PRESETS[args.preset].items() if getattr(args, k) is None}
    vars(args).update(unset)                                   # flags left unset take the preset's values
    if not 0 <= args.n_i < 1:
        p.error(f"--n_i must be in [0, 1), got {args.n_i}")
    if args.rp and args.n_i == 0:
        p.error("--rp needs --n_i > 0 (with n_i = 0 the reference would do every step)")
    for k in ("M", "K", "N", "T", "rounds", "n_eval", "batch_size", "sample_batch", "var_R", "var_P", "nf",
              "n_layers"):
        if getattr(args, k) <= 0:
            p.error(f"--{k} must be positive, got {getattr(args, k)}")
    if min(args.ft_steps, args.train_steps) < 0:
        p.error("--ft_steps and --train_steps must be >= 0")
    if not 0 <= args.ft_ema < 1:
        p.error(f"--ft_ema must be in [0, 1), got {args.ft_ema}")
    if args.K > args.M or args.N > args.T:
        p.error(f"need --K <= --M and --N <= --T, got K {args.K}, M {args.M}, N {args.N}, T {args.T}")
    if args.reward not in REWARDS:
        p.error(f"unknown --reward {args.reward!r}; choose from {', '.join(REWARDS)}")
    if args.stratify and args.accept != "top_k":
        p.error("--stratify works with --accept top_k only")
    if args.accept == "threshold" and args.tau is None:
        p.error("--accept threshold needs --tau")
    if not 0 < args.ddpo_steps_frac <= 1:
        p.error("--ddpo_steps_frac must be in (0, 1]")
    args.N_I, args.dedup = round(args.n_i * args.N), not args.no_dedup
    return args


def plan(method, args, tau, T):
    """The derived quantities of a fine-tuning run: acceptance, switch step, compute per round."""
    grad = (args.M * max(1, round(args.ddpo_steps_frac * (args.N - 1))) if args.algo == "ddpo"
            else args.ft_steps * args.batch_size)
    rule = {"top_k": f"Top-{args.K} of M {args.M} (K/M {args.K / args.M:.2f})",
            "best_of_n": f"Best-of-{args.M}", "threshold": f"r >= {args.tau} of M {args.M}"}[args.accept]
    accept = ("on-policy policy gradient" if args.algo == "ddpo"
              else f"{rule}, dedup {args.dedup}, EMA of each round's iterates {args.ft_ema}")
    return (f"{method}: {accept}, rounds {args.rounds}, N {args.N}, N_I {args.N_I}, s = tau_N_I = "
            f"{int(tau[args.N_I])}/{T}, reward {args.reward}; per round: NFE {args.M * (args.N + 1):,}, "
            f"gradient calls {grad:,}")


def model_config(args):
    """What a checkpoint must record to be rebuilt."""
    return dict(nf=args.nf, n_layers=args.n_layers, attention=not args.no_attention, tanh=not args.no_tanh,
                include_charges=not args.no_charges, T=args.T, schedule=args.schedule)


# -- data: QM9 with hydrogens, EDM's split (qm9.py) ----------------------------------------------------------

def to_features(pos, types, include_charges):
    """Numpy molecules -> (z (B, n, 3+F), mask (B, n)) with EDM's scaling: one-hot / 4, charge / 10."""
    n = max(int((types >= 0).sum(1).max()), 1)
    types = torch.as_tensor(types[:, :n], dtype=torch.long)
    mask = types >= 0                                                            # (B, n)
    h = F.one_hot(types.clamp(min=0), 5).float() * 0.25                          # (B, n, 5)
    if include_charges:
        h = torch.cat([h, torch.tensor(CHARGES, dtype=torch.float)[types.clamp(min=0)][..., None] * 0.1], -1)
    z = torch.cat([torch.as_tensor(pos[:, :n]), h], -1) * mask[..., None]       # (B, n, 3+F)
    return z, mask


def size_batches(n_atoms, batch, desc):
    """Batches of molecules of similar size, so little compute goes to padding:
    yields (indices, mask (B, n))."""
    order = np.argsort(n_atoms, kind="stable")
    for b in tqdm(range(0, len(order), batch), desc=desc, leave=False):
        idx = order[b:b + batch]
        yield idx, torch.arange(int(n_atoms[idx].max()))[None] < torch.as_tensor(n_atoms[idx])[:, None]


# -- model: EDM's EGNN (egnn.py, a port whose module names match EDM's released QM9 weights) -----------------

def build_model(cfg):
    return EGNNDynamics(**cfg)


def load_reference(ref, device, size_cfg):
    """(model, cfg) from a path or hf:org/repo/file. A bare state_dict (EDM's released weights) is built with
    the size flags `size_cfg`; anything missing, corrupt or mismatched exits with one clear line."""
    try:
        ckpt = common.load_checkpoint(ref)
        cfg = ckpt["config"].get("model") or size_cfg
        try:
            model = build_model(cfg)
        except TypeError as e:
            raise common.CheckpointError(f"{ref!r} has a model config this script cannot build "
                                         f"({e})") from None
        sd = ckpt["state_dicts"].get("ema") or ckpt["state_dicts"].get("model")
        if not isinstance(sd, dict):
            raise common.CheckpointError(f"{ref!r} has no 'ema' or 'model' weights")
        common.load_state(model, edm_state_dict(sd), f"checkpoint {ref!r}")
    except common.CheckpointError as e:
        raise SystemExit(f"graft_molecule: {e}")
    return model.to(device).eval(), cfg


# -- diffusion: schedule, shaped loss, sampler with P-GRAFT's stitching --------------------------------------

def make_abar(cfg):
    return torch.tensor(common.noise_schedule(cfg["schedule"], cfg["T"]), dtype=torch.float32)  # (T+1,)


def sample_noise(shape, mask, gen=None):
    """N(0, I) on atoms, the position part projected to zero centre of mass (EDM's subspace). Drawn on the
    CPU, so a seed gives the same draws on any device."""
    eps = torch.randn(shape, generator=gen).to(mask.device) * mask[..., None]   # (B, n, 3+F)
    return torch.cat([remove_mean(eps[..., :3], mask), eps[..., 3:]], -1)


def shaped_loss(net, z_s, mask, abar, t_lo, t_hi, abar_s=1.0, gen=None):
    """P-GRAFT's loss (docs/method.md §3) on data z_s (B, n, D) that lives at time s, for t in [t_lo, t_hi]:
        x_t = sqrt(abar_t/abar_s) x_s + sqrt(1 - abar_t/abar_s) eps',
        loss = |eps_theta(x_t, t) / c_t - eps'|^2,
        c_t = sqrt((1 - abar_t) / (1 - abar_t/abar_s)),
    so the reference's eps-parameterisation, sampler and weights still serve. abar_s = 1 (x_s = x_0) gives
    c_t = 1: the DDPM loss of pre-training and GRAFT. The error is averaged over each molecule's real dims."""
    B, abar = z_s.shape[0], abar.to(z_s.device)
    t = torch.randint(t_lo, t_hi + 1, (B,), generator=gen).to(z_s.device)
    ratio = (abar[t] / abar_s).view(B, 1, 1)                                    # abar_t / abar_s
    eps = sample_noise(z_s.shape, mask, gen)                                     # eps' (B, n, D)
    c_t = ((1 - abar[t].view(B, 1, 1)) / (1 - ratio)).sqrt()
    err = (net(ratio.sqrt() * z_s + (1 - ratio).sqrt() * eps, t.float() / (len(abar) - 1), mask) / c_t
           - eps) ** 2
    return ((err * mask[..., None]).sum((1, 2)) / (mask.sum(1) * z_s.shape[-1])).mean()


def step_mean_std(eps, z_t, abar, t, s):
    """Gaussian p(z_s | z_t) of the ancestral sampler for any s < t (EDM's sample_p_zs_given_zt)."""
    a_t, a_s = abar[t], abar[s]
    alpha_ts, sigma2_ts = (a_t / a_s).sqrt(), 1 - a_t / a_s
    sigma_t, sigma_s = (1 - a_t).sqrt(), (1 - a_s).sqrt()
    return z_t / alpha_ts - (sigma2_ts / alpha_ts / sigma_t) * eps, sigma2_ts.sqrt() * sigma_s / sigma_t


def gaussian_logp(z, mean, std, mask):
    """log N(z; mean, std^2) averaged over the real dimensions
    (DDPO's convention, docs/method.md §4) -> (B,)"""
    lp = ((-((z - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi))
          * mask[..., None])
    return lp.sum((1, 2)) / (mask.sum(1) * z.shape[-1])


def ancestral_steps(net, z, mask, abar, N, k_from, k_to, amp=False, traj=None):
    """z_{tau_k_from} -> z_{tau_k_to} by the ancestral steps of `net` on the grid of N steps (one NFE each).
    traj, if a list, receives (z_new, log p(z_new | z)) of every step: DDPO's data."""
    T, tau, dev = len(abar) - 1, common.time_grid(len(abar) - 1, N), next(net.parameters()).device
    for k in range(k_from, k_to, -1):
        with common.autocast(dev, amp):
            eps = net(z.to(dev), torch.full((len(z),), tau[k] / T, device=dev), mask.to(dev)).float().cpu()
        mean, std = step_mean_std(eps, z, abar, tau[k], tau[k - 1])
        z_new = mean + std * sample_noise(z.shape, mask)                         # z_{tau_{k-1}} (B, n, D)
        if traj is not None:
            traj.append((z_new, gaussian_logp(z_new, mean, std, mask)))
        z = z_new
    return z


def predict_x0(net, z, mask, abar, amp=False):
    """The final x_0-prediction from z_{tau_0} (the N + 1-th NFE)."""
    dev = next(net.parameters()).device
    with common.autocast(dev, amp):
        eps = net(z.to(dev), torch.zeros(len(z), device=dev), mask.to(dev)).float().cpu()
    return (z - (1 - abar[0]).sqrt() * eps) / abar[0].sqrt()


def decode(z0, mask):
    """Clean state -> numpy molecules: positions (B, 29, 3) Angstrom, types (B, 29) int8 (-1 padding)."""
    B, n, _ = z0.shape
    pos, types = np.zeros((B, MAX_N, 3), np.float32), np.full((B, MAX_N), -1, np.int8)
    pos[:, :n] = (z0[..., :3] * mask[..., None]).numpy()
    types[:, :n] = torch.where(mask, z0[..., 3:8].argmax(-1), -1).numpy()
    return pos, types


@torch.no_grad()
def sample(net_hi, net_lo, n_atoms, abar, N, N_I=0, batch=250, amp=False, desc="sampling"):
    """Molecules with n_atoms (M,) atoms from the stitched sampler of paper Alg. 2: net_hi denoises from z_T
    down to s = tau_{N_I}, net_lo from there to 0 and makes the final x_0-prediction (NFE = N + 1). Reference:
    (ref, ref); P-GRAFT: (fine-tuned, ref); RP-GRAFT: (ref, fine-tuned); GRAFT: N_I = 0.
    Returns {'pos' (M, 29, 3), 'types' (M, 29), 'x_s' (M, 29, D): the state at s, P-GRAFT's data}."""
    M, D = len(n_atoms), 3 + net_lo.h_nf
    out = {"pos": np.zeros((M, MAX_N, 3), np.float32), "types": np.full((M, MAX_N), -1, np.int8),
           "x_s": torch.zeros(M, MAX_N, D)}
    for idx, mask in size_batches(n_atoms, batch, desc):
        z_T = sample_noise((len(idx), mask.shape[1], D), mask)                  # (B, n, D)
        x_s = ancestral_steps(net_hi, z_T, mask, abar, N, N, N_I, amp)          # above s: net_hi
        z_0 = ancestral_steps(net_lo, x_s, mask, abar, N, N_I, 0, amp)          # below s: net_lo
        out["pos"][idx], out["types"][idx] = decode(predict_x0(net_lo, z_0, mask, abar, amp), mask)
        out["x_s"][idx, :mask.shape[1]] = x_s
    return out


@torch.no_grad()
def sample_trajectories(net, n_atoms, abar, N, batch=250, amp=False, desc="sampling"):
    """DDPO's data: molecules with their trajectories (M, N+1, 29, D) and each step's log-prob (M, N)."""
    M, D = len(n_atoms), 3 + net.h_nf
    out = {"pos": np.zeros((M, MAX_N, 3), np.float32), "types": np.full((M, MAX_N), -1, np.int8),
           "traj": torch.zeros(M, N + 1, MAX_N, D), "logp": torch.zeros(M, N)}
    for idx, mask in size_batches(n_atoms, batch, desc):
        z_T, steps = sample_noise((len(idx), mask.shape[1], D), mask), []
        z_0 = ancestral_steps(net, z_T, mask, abar, N, N, 0, amp, traj=steps)
        out["pos"][idx], out["types"][idx] = decode(predict_x0(net, z_0, mask, abar, amp), mask)
        out["traj"][idx, :, :mask.shape[1]] = torch.stack([z_T] + [z for z, _ in steps], 1)
        out["logp"][idx] = torch.stack([lp for _, lp in steps], 1)
    return out


@torch.no_grad()
def continue_from(net, x_s, n_atoms, abar, N, N_I, batch=250, desc="continuing"):
    """Molecules finished by `net` from states x_s (M, 29, D) at step N_I (the variance curve, §3)."""
    out = {"pos": np.zeros((len(n_atoms), MAX_N, 3), np.float32),
           "types": np.full((len(n_atoms), MAX_N), -1, np.int8)}
    for idx, mask in size_batches(n_atoms, batch, desc):
        z_0 = ancestral_steps(net, x_s[idx, :mask.shape[1]].clone(), mask, abar, N, N_I, 0)
        out["pos"][idx], out["types"][idx] = decode(predict_x0(net, z_0, mask, abar), mask)
    return out


# -- reward: a function of a list of qm9.Molecule -> tensor (B,); add your own to REWARDS --------------------

def reward_stable(mols):
    """1 if every atom has its allowed valence under the EDM bond tables (the paper's molecule reward)."""
    return torch.tensor([float(m.stable) for m in mols])


def reward_atom_stable(mols):
    return torch.tensor([float(m.atom_stable.mean()) for m in mols])


def reward_valid(mols):
    return torch.tensor([float(m.smiles is not None) for m in mols])


def reward_qed(mols):
    from rdkit.Chem import QED
    return torch.tensor([QED.qed(m.mol) if m.mol is not None else 0.0 for m in mols])


REWARDS = {"stable": reward_stable, "atom_stable": reward_atom_stable, "valid": reward_valid,
           "qed": reward_qed}


def score(samples, reward_fn):
    """Molecules and their rewards; a reward that is NaN or of the wrong shape stops the run."""
    mols = molecules(samples)
    r = torch.as_tensor(reward_fn(mols), dtype=torch.float32)
    if r.shape != (len(mols),):
        raise SystemExit(f"graft_molecule: the reward returned shape {tuple(r.shape)}, "
                         f"expected ({len(mols)},)")
    if not torch.isfinite(r).all():
        raise SystemExit(f"graft_molecule: the reward returned {int((~torch.isfinite(r)).sum())} "
                         "NaN/inf values")
    return mols, r


# -- fine-tuning: GRAFT / P-GRAFT / RP-GRAFT (paper Alg. 1-2) and DDPO (docs/method.md §4) -------------------

def method_name(args):
    return "ddpo" if args.algo == "ddpo" else "rpgraft" if args.rp else "pgraft" if args.N_I > 0 else "graft"


def samplers(args, ref, ft):
    """(net_hi, net_lo, N_I) of the fine-tuned sampler: who denoises above s and who below
    (docs/method.md §3). GRAFT and DDPO: the fine-tuned model everywhere; P-GRAFT: fine-tuned above s;
    RP-GRAFT: fine-tuned below."""
    if args.algo == "ddpo" or args.N_I == 0:
        return ft, ft, 0
    return (ref, ft, args.N_I) if args.rp else (ft, ref, args.N_I)


def training_window(args, abar):
    """(t_lo, t_hi, abar_s): the t trained and the time of the data. GRAFT: x_0, t in [1, T]. P-GRAFT: x_s,
    t in (s, T] with the shaped loss. RP-GRAFT: x_0, t in [1, s]."""
    T = len(abar) - 1
    s = int(common.time_grid(T, args.N)[args.N_I])
    if args.N_I == 0 or args.rp:
        return 1, s if args.rp else T, 1.0
    return s + 1, T, float(abar[s])


def train_on_accepted(ft, opt, x_acc, n_acc, abar, args):
    """The fine-tuning of one round on its accepted states x_acc (K, 29, D) with n_acc (K,) atoms: ft_steps of
    the shaped loss in the round's training window. --ft_ema d > 0: the round ends on the EMA of its Adam
    iterates, started from its first weights (docs/method.md §3). Returns the gradient calls."""
    dev, (t_lo, t_hi, abar_s) = next(ft.parameters()).device, training_window(args, abar)
    mask_all = torch.arange(x_acc.shape[1])[None] < torch.as_tensor(n_acc)[:, None]   # (K, 29)
    params = list(ft.parameters())
    avg = [p.detach().clone() for p in params] if args.ft_ema > 0 else None
    ft.train()
    for _ in tqdm(range(args.ft_steps), desc="fine-tuning", leave=False):
        idx = torch.randint(len(x_acc), (args.batch_size,))
        n = int(n_acc[idx.numpy()].max())
        with common.autocast(dev, args.amp):
            loss = shaped_loss(ft, x_acc[idx, :n].to(dev), mask_all[idx, :n].to(dev), abar, t_lo, t_hi,
                               abar_s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ft.parameters(), 1.0)
        opt.step()
        if avg is not None:
            torch._foreach_lerp_(avg, [p.detach() for p in params], 1 - args.ft_ema)
    if avg is not None:
        with torch.no_grad():
            for p, a in zip(params, avg):
                p.copy_(a)
    ft.eval()
    return args.ft_steps * args.batch_size


def graft_round(args, ref, ft, opt, abar, n_atoms, desc):
    """One round of paper Alg. 1 / Alg. 2: draw M molecules, score them, accept the Top-K (one copy per
    SMILES), train on the accepted x_s (P-GRAFT) or x_0 (GRAFT, RP-GRAFT).
    Returns (samples, mols, r, accepted, grad)."""
    hi, lo, N_I = (ref, ref, args.N_I) if args.sample_from == "reference" else samplers(args, ref, ft)
    res = sample(hi, lo, n_atoms, abar, args.N, N_I, args.sample_batch, args.amp, desc)
    mols, r = score(res, REWARDS[args.reward])
    keys = [m.smiles for m in mols] if args.dedup else None
    acc = acceptance.accept(r, args.accept, K=args.K, tau=args.tau, keys=keys,
                            groups=n_atoms if args.stratify else None)
    if len(acc) == 0:
        raise SystemExit(f"graft_molecule: {desc} accepted no sample; lower --tau or raise --M")
    keep_x_s, charges = args.N_I > 0 and not args.rp, ft.h_nf == 6            # h_nf 6: EDM's charge feature
    x = res["x_s"] if keep_x_s else to_features(res["pos"], res["types"], charges)[0]       # (M, n, D)
    grad = train_on_accepted(ft, opt, x[acc], n_atoms[acc.numpy()], abar, args)
    return res, mols, r, acc, grad


def ddpo_update(ft, opt, res, rewards, n_atoms, abar, args):
    """One inner epoch of PPO on M trajectories (docs/method.md §4): advantages standardised over the batch
    (one 'prompt'), clipped to +-5; the clipped surrogate on per-dimension-averaged log-probs; grad clip 1.
    The last step (tau_1 -> 0) has a near-zero std, so its log-prob ratio explodes: it is never trained."""
    dev, T, tau = next(ft.parameters()).device, len(abar) - 1, common.time_grid(len(abar) - 1, args.N)
    adv = ((rewards - rewards.mean()) / (rewards.std() + 1e-8)).clamp(-5, 5)
    mask_all = torch.arange(MAX_N)[None] < torch.as_tensor(n_atoms)[:, None]        # (M, 29)
    n_steps, grad_calls, perm = (max(1, round(args.ddpo_steps_frac * (args.N - 1))), 0,
                                 torch.randperm(len(rewards)))
    ft.train()
    for b in tqdm(range(0, len(perm), args.ddpo_batch), desc="DDPO", leave=False):
        idx = perm[b:b + args.ddpo_batch]
        n = int(n_atoms[idx.numpy()].max())
        mask, a = mask_all[idx, :n].to(dev), adv[idx].to(dev)
        opt.zero_grad(set_to_none=True)
        # step tau_{N-j} -> tau_{N-j-1}
        for j in torch.randperm(args.N - 1)[:n_steps].tolist():
            z_t, z_s, k = res["traj"][idx, j, :n].to(dev), res["traj"][idx, j + 1, :n].to(dev), args.N - j
            with common.autocast(dev, args.amp):
                eps = ft(z_t, torch.full((len(idx),), float(tau[k]) / T, device=dev), mask).float()
            mean, std = step_mean_std(eps, z_t, abar.to(dev), tau[k], tau[k - 1])
            ratio = torch.exp(gaussian_logp(z_s, mean, std, mask) - res["logp"][idx, j].to(dev))
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - args.ddpo_clip, 1 + args.ddpo_clip)).mean()
            (loss / n_steps).backward()
            grad_calls += len(idx)
        torch.nn.utils.clip_grad_norm_(ft.parameters(), 1.0)
        opt.step()
    ft.eval()
    return grad_calls


def ddpo_round(args, ft, opt, abar, n_atoms, desc):
    """One DDPO epoch: M on-policy trajectories, their rewards, one PPO epoch. Same return as graft_round."""
    res = sample_trajectories(ft, n_atoms, abar, args.N, args.sample_batch, args.amp, desc)
    mols, r = score(res, REWARDS[args.reward])
    return res, mols, r, torch.arange(args.M), ddpo_update(ft, opt, res, r, n_atoms, abar, args)


def finetune(args, ref, ref_cfg, abar, hist, device):
    """The rounds: each draws M molecules (atom counts from the training histogram), scores, accepts and
    trains; state.pt after every round, so an interrupted run resumes from the last finished round."""
    ft = common.maybe_compile(build_model(ref_cfg).to(device), args.compile)
    ft.load_state_dict(ref.state_dict())
    opt = torch.optim.Adam(ft.parameters(), lr=args.ddpo_lr if args.algo == "ddpo" else args.ft_lr)
    state_path, key = (os.path.join(args.out, "state.pt"),
                       {k: getattr(args, k) for k in RESUME_KEYS} | {"ref": args.ref})
    rounds, compute = [], {"samples": 0, "nfe_sampling": 0, "grad_calls": 0, "wall_s": 0.0}
    if os.path.exists(state_path):
        st = common.load_checkpoint(state_path)
        if st["config"].get("resume_key") != key:
            raise SystemExit(f"graft_molecule: {args.out} holds a run with other settings; use another --out")
        common.load_state(ft, st["state_dicts"]["model"], state_path)
        opt.load_state_dict(st["state_dicts"]["opt"])
        rounds, compute = st["extra"]["rounds"], st["extra"]["compute"]
        print(f"resuming after round {len(rounds)}")
    for rnd in range(len(rounds), args.rounds):
        t0, desc = time.time(), f"round {rnd + 1}"
        torch.manual_seed(args.seed * 1_000_003 + rnd)  # per-round seeding: a resumed run repeats exactly
        n_atoms = np.random.RandomState(args.seed * 1_000_003 + rnd).choice(len(hist), args.M, p=hist)
        res, mols, r, acc, grad = (ddpo_round(args, ft, opt, abar, n_atoms, desc) if args.algo == "ddpo"
                                   else graft_round(args, ref, ft, opt, abar, n_atoms, desc))
        valid, wall = [m.smiles for m in mols if m.smiles is not None], time.time() - t0
        compute = {"samples": compute["samples"] + args.M,
                   "nfe_sampling": compute["nfe_sampling"] + args.M * (args.N + 1),
                   "grad_calls": compute["grad_calls"] + grad, "wall_s": compute["wall_s"] + wall}
        rounds.append({"round": rnd + 1, "mean_reward": float(r.mean()), "accept_rate": len(acc) / args.M,
                       "accepted_mean_reward": float(r[acc].mean()) if args.algo != "ddpo" else None,
                       "mol_stable": float(np.mean([m.stable for m in mols])),
                       "valid": len(valid) / len(mols), "unique": len(set(valid)) / max(len(valid), 1),
                       "samples_per_s": args.M / wall, "round_wall_s": wall, **compute})
        common.save_checkpoint(state_path, {"model": ft.state_dict(), "opt": opt.state_dict()},
                               {"resume_key": key, "model": ref_cfg}, {"rounds": rounds, "compute": compute})
        common.write_json(os.path.join(args.out, "metrics.jsonl"), rounds, lines=True)
        print(f"round {rnd + 1}/{args.rounds}: mean reward {r.mean():.3f}, accepted {len(acc)}/{args.M}, "
              f"unique {rounds[-1]['unique']:.3f}, {args.M / wall:.1f} samples/s")
    return ft, rounds, compute


# -- pre-training the reference model (resumable, pretraining.py) --------------------------------------------

def pretrain(args, device):
    """EDM's training: uniform t, eps loss on positions and features jointly, AdamW (amsgrad), EMA weights for
    sampling; resumable from <out>/ref.pt."""
    args.out = args.out or os.path.join("runs", f"molecule_pretrain_{args.preset}")
    data, cfg, path = load_qm9(args.data_dir)["train"], model_config(args), os.path.join(args.out, "ref.pt")
    model, ema = build_model(cfg).to(device), build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, amsgrad=True, weight_decay=1e-12)
    abar = make_abar(cfg).to(device)
    print(f"pre-training {sum(p.numel() for p in model.parameters()):,} parameters, batch {args.batch_size}, "
          f"lr {args.lr}, to step {args.train_steps}")

    make = lambda idx: to_features(data["pos"][idx], data["types"][idx], cfg["include_charges"])
    step = pretraining.train_resumable(path, {"model": cfg, "command": " ".join(sys.argv)}, model, ema, opt,
                                       pretraining.set_batches(data["n"], args.batch_size, make, device),
                                       lambda net, b, gen: shaped_loss(net, *b, abar, 1, cfg["T"]),
                                       args.train_steps, args, device, "pre-training",
                                       pretraining.same_model(cfg, path, "graft_molecule"))
    print(f"saved {path} at step {step}")


# -- evaluation (EDM's metrics, qm9.py) ----------------------------------------------------------------------

def evaluate_sampler(hi, lo, N_I, args, abar, hist, train_smiles, desc):
    """n_eval molecules from the same seed for every model (common random numbers), docs/method.md §6."""
    torch.manual_seed(args.seed + 12_345)
    n_atoms = np.random.RandomState(args.seed + 12_345).choice(len(hist), args.n_eval, p=hist)
    t0 = time.time()
    res = sample(hi, lo, n_atoms, abar, args.N, N_I, args.sample_batch, args.amp, desc)
    mols, r = score(res, REWARDS[args.reward])
    metrics = evaluate(mols, train_smiles) | {"reward": common.mean_ci95(r.numpy())}
    return {"n_samples": args.n_eval, "nfe": args.n_eval * (args.N + 1), "wall_s": time.time() - t0,
            "samples_per_s": args.n_eval / (time.time() - t0), "metrics": metrics}, res


def reference_eval(args, ref, abar, hist, train_smiles):
    """The reference model's evaluation, cached by (checkpoint bytes, sampler, n_eval, seed, reward): every
    run of a sweep compares against the same numbers without paying for them again."""
    tag = (f"{common.sha1_file(common.resolve_ref(args.ref))}_"
           f"N{args.N}_n{args.n_eval}_s{args.seed}_{args.reward}")
    def run():
        ev, res = evaluate_sampler(ref, ref, 0, args, abar, hist, train_smiles, "reference eval")
        return ev, {"pos": res["pos"], "types": res["types"]}
    return common.cached(os.path.join(args.data_dir, "reference_evals", tag), run)


def save_grid(samples, path, n=24):
    """PNG grid of the first n valid molecules (RDKit 2-D depictions, hydrogens hidden),
    stable ones marked."""
    from rdkit import Chem
    from rdkit.Chem import Draw
    mols, legends = [], []
    for m in molecules({"pos": samples["pos"][:4 * n], "types": samples["types"][:4 * n]}):
        if m.mol is not None and len(mols) < n:
            mols.append(Chem.RemoveHs(m.mol, sanitize=False))
            legends.append(("stable " if m.stable else "") + m.smiles[:28])
    if mols:
        Draw.MolsToGridImage(mols, molsPerRow=6, subImgSize=(220, 180), legends=legends).save(path)


def plot_rounds(out, rounds, reference):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [0] + [r["round"] for r in rounds]
    ax.plot(x, [reference["metrics"]["mol_stable"]["mean"]] + [r["mol_stable"] for r in rounds], "o-",
            label="molecule stability of the round's samples")
    ax.plot(x, [reference["metrics"]["unique"]["mean"]] + [r["unique"] for r in rounds], "s--",
            label="uniqueness")
    ax.set_xticks(x), ax.set_xlabel("round (0 = reference)"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(os.path.join(out, "rounds.png"), dpi=120), plt.close(fig)


def measure_variance(args, ref, abar, hist):
    """docs/method.md §3: E[Var(r(X_0) | X_t)] at t = tau_{N_I} for a grid of n_i. P base trajectories of the
    reference stopped at each grid step, R stochastic continuations from each state, the within-group variance
    averaged over the P groups."""
    grid = sorted({round(f * args.N) for f in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)}, reverse=True)
    torch.manual_seed(args.seed)
    n_atoms = np.random.RandomState(args.seed).choice(len(hist), args.var_P, p=hist)
    D, base = 3 + ref.h_nf, {k: torch.zeros(args.var_P, MAX_N, 3 + ref.h_nf) for k in grid}
    for idx, mask in size_batches(n_atoms, args.sample_batch, "base trajectories"):
        z, k_prev = sample_noise((len(idx), mask.shape[1], D), mask), args.N
        for k in grid:                                                           # N_I from N down
            z, k_prev = ancestral_steps(ref, z, mask, abar, args.N, k_prev, k), k
            base[k][idx, :mask.shape[1]] = z
    curve = []
    for N_I in grid[::-1]:
        x = base[N_I].repeat_interleave(args.var_R, 0)                          # (P R, 29, D)
        res = continue_from(ref, x, np.repeat(n_atoms, args.var_R), abar, args.N, N_I, args.sample_batch,
                            f"continuations from N_I={N_I}")
        r = score(res, REWARDS[args.reward])[1].view(args.var_P, args.var_R)
        within = r.var(1, unbiased=True)                                         # (P,)
        curve.append({"n_i": N_I / args.N, "N_I": N_I, "t": int(common.time_grid(args.T, args.N)[N_I]),
                      "cond_var": common.mean_ci95(within.numpy()), "total_var": float(r.flatten().var())})
        print(f"n_i {N_I / args.N:.2f}: E[Var(r|x_t)] = {within.mean():.4f} (total Var(r) {r.var():.4f})")
    common.write_json(os.path.join(args.out, "variance.json"),
                      {"reward": args.reward, "P": args.var_P, "R": args.var_R, "N": args.N, "curve": curve})
    plot_variance(os.path.join(args.out, "variance_curve.png"), curve, args.reward)
    return curve


def plot_variance(path, curve, reward):
    """E[Var(r | x_t)] against n_i with 95% intervals."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([c["n_i"] for c in curve], [c["cond_var"]["mean"] for c in curve], fmt="o-", capsize=3,
                yerr=[c["cond_var"]["mean"] - c["cond_var"]["ci95"][0] for c in curve])
    ax.set_xlabel("n_i  (switch step N_I / N)"), ax.set_ylabel(f"E[Var({reward} | x_t)]"), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    common.seed_everything(args.seed)
    device = common.get_device(args.device)
    if args.pretrain:                                                            # the reference model
        return pretrain(args, device)
    method = "reference" if args.eval_only else "variance" if args.measure_variance else method_name(args)
    args.out = args.out or os.path.join("runs", f"molecule_{method}" + (f"_ni{args.n_i}" if args.N_I else ""))
    os.makedirs(args.out, exist_ok=True)
    ref, ref_cfg = load_reference(args.ref, device, model_config(args))
    data = load_qm9(args.data_dir)
    hist = np.bincount(data["train"]["n"], minlength=MAX_N + 1) / len(data["train"]["n"])  # p(n atoms)
    abar, ref = make_abar(ref_cfg), common.maybe_compile(ref, args.compile)
    print(f"reference: {args.ref} ({sum(p.numel() for p in ref.parameters()):,} parameters, {ref_cfg})")
    if args.measure_variance:
        return measure_variance(args, ref, abar, hist)
    if not args.eval_only:
        print(plan(method, args, common.time_grid(ref_cfg["T"], args.N), ref_cfg["T"]))
    train_smiles, t0 = training_smiles(data, args.data_dir), time.time()
    reference, ref_samples = reference_eval(args, ref, abar, hist, train_smiles)
    save_grid(ref_samples, os.path.join(args.out, "molecules_reference.png"))
    results = {"task": "molecule", "method": method, "n_i": args.n_i,
               "command": "python graft_molecule.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "config": dict(vars(args)) | {"model": ref_cfg}, "reference": reference}
    if not args.eval_only:
        ft, rounds, compute = finetune(args, ref, ref_cfg, abar, hist, device)          # Alg. 1 / 2 rounds
        finetuned, ft_samples = evaluate_sampler(*samplers(args, ref, ft), args, abar, hist, train_smiles,
                                                 "fine-tuned eval")                     # stitched at N_I
        save_grid(ft_samples, os.path.join(args.out, "molecules_finetuned.png"))
        plot_rounds(args.out, rounds, reference)
        results |= {"finetuned": finetuned, "compute": compute, "rounds": rounds}
    results["wall_s"] = time.time() - t0
    common.write_json(os.path.join(args.out, "results.json"), results)
    for name in ("reference", "finetuned"):
        if name in results:
            m = results[name]["metrics"]
            print(f"{name:>10}: " + ", ".join(f"{k} {m[k]['mean']:.3f}" for k in
                                              ("mol_stable", "atom_stable", "valid", "unique", "novel")))
    print(f"wrote {os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
