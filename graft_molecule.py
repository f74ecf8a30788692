"""graft_molecule.py — GRAFT / P-GRAFT on QM9 (arXiv 2510.02692, the molecule experiment).

    python graft_molecule.py --n_i 0.25            # P-GRAFT from the shipped reference model
    python graft_molecule.py --n_i 0               # GRAFT
    python graft_molecule.py --n_i 0.25 --rp       # RP-GRAFT (reverse stitching, the paper's ablation)
    python graft_molecule.py --algo ddpo           # the policy-gradient baseline
    python graft_molecule.py --eval_only           # metrics of the reference model
    python graft_molecule.py --measure_variance    # E[Var(r(X_0) | X_t)] over t (SPEC 3)
    python graft_molecule.py --pretrain --preset paper --device cuda   # pre-train a reference model

An E(3)-equivariant diffusion model (EDM, Hoogeboom et al. 2022) over 3-D molecules with hydrogens: positions
(zero centre of mass) and atom-type one-hots are noised jointly, an EGNN predicts the noise, and an ancestral
sampler generates. GRAFT keeps the Top-K of M samples by reward and fine-tunes on them; P-GRAFT keeps the
*intermediate* states x_s of the accepted samples and fine-tunes only the steps above s.
"""
import argparse
import csv
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from egnn import EGNNDynamics, edm_state_dict, remove_mean

# -- config ---------------------------------------------------------------------------------------------------

ATOMS = ["H", "C", "N", "O", "F"]           # EDM's atom_encoder order
CHARGES = [1, 6, 7, 8, 9]                    # nuclear charges, EDM's optional integer feature
MAX_N = 29                                   # largest QM9 molecule with hydrogens
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


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="cpu", help="size and budget preset; flags below override it")
    # what to run
    a("--pretrain", action="store_true", help="pre-train a reference model (resumable) instead of fine-tuning")
    a("--eval_only", action="store_true", help="only evaluate the reference model")
    a("--measure_variance", action="store_true", help="measure E[Var(r(X_0)|X_t)] on a grid of n_i (SPEC 3)")
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
    a("--schedule", default="polynomial_2", choices=["polynomial_2", "linear", "cosine"], help="noise schedule")
    a("--N", type=int, help="sampler steps (an evenly spaced sub-grid of 0..T; NFE per sample = N + 1)")
    # reward and fine-tuning: GRAFT / P-GRAFT / RP-GRAFT / DDPO (the same flags in every script, common.py)
    a("--reward", default="stable", help="reward: stable | valid | atom_stable | qed")
    common.add_finetuning_args(a, "molecules")
    # pre-training
    a("--batch_size", type=int, help="molecules per pre-training / fine-tuning step")
    a("--lr", type=float, help="pre-training learning rate")
    a("--ema_decay", type=float, help="EMA decay of pre-training weights")
    a("--train_steps", type=int, help="pre-training steps in total (resumable)")
    a("--max_minutes", type=float, default=None, help="stop pre-training after this many minutes (resume later)")
    # evaluation
    a("--n_eval", type=int, help="samples for the evaluation of each model")
    a("--sample_batch", type=int, default=250, help="molecules per sampler batch")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = common.parse_with_presets(p, argv, PRESETS)
    common.check_finetuning_args(p, args, REWARDS, positive=("nf", "n_layers"))
    return args


def model_config(args):
    """What a checkpoint must record to be rebuilt."""
    return dict(nf=args.nf, n_layers=args.n_layers, attention=not args.no_attention, tanh=not args.no_tanh,
                include_charges=not args.no_charges, T=args.T, schedule=args.schedule)


# -- data -------------------------------------------------------------------------------------------------------

_FLOAT = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _qm9_csv_dir():
    import importlib.util
    spec = importlib.util.find_spec("qm9pack")
    if spec is None:
        raise SystemExit("graft_molecule: QM9 not found; pip install qm9pack==1.0.3")
    return os.path.join(spec.submodule_search_locations[0], "data")


def load_qm9(data_dir):
    """QM9 with hydrogens, EDM's split. Returns {split: {'pos': (N, 29, 3) float32 Angstrom, zero CoM,
    'types': (N, 29) int8 with -1 for padding, 'n': (N,) int}} and caches it as .npz (SPEC 7)."""
    cache = os.path.join(data_dir, "qm9_edm_split.npz")
    if not os.path.exists(cache):
        src = _qm9_csv_dir()
        csv.field_size_limit(1 << 26)
        pos, types, n = [], [], []
        for part in (1, 2, 3):
            with open(os.path.join(src, f"qm9_part{part}.csv"), newline="") as f:
                for row in tqdm(csv.DictReader(f), desc=f"QM9 part {part}", leave=False):
                    elems = re.findall(r"[A-Z][a-z]?", row["Elements"])
                    xyz = np.array([float(v) for v in _FLOAT.findall(row["XYZ_Ang"])], np.float32).reshape(-1, 3)
                    p, t = np.zeros((MAX_N, 3), np.float32), np.full(MAX_N, -1, np.int8)
                    p[: len(elems)] = xyz - xyz.mean(0)
                    t[: len(elems)] = [ATOMS.index(e) for e in elems]
                    pos.append(p), types.append(t), n.append(len(elems))
        pos, types, n = np.stack(pos), np.stack(types), np.array(n)
        if len(n) != 130_831:
            raise SystemExit(f"graft_molecule: expected 130,831 QM9 molecules, read {len(n)}; reinstall qm9pack==1.0.3")
        # EDM's split: np.random.seed(0) permutation, 100,000 train / 17,748 valid / 13,083 test
        np.random.seed(0)
        perm = np.random.permutation(len(n))
        split = dict(train=perm[:100_000], valid=perm[100_000:117_748], test=perm[117_748:])
        os.makedirs(data_dir, exist_ok=True)
        tmp = cache + ".tmp.npz"
        np.savez_compressed(tmp, pos=pos, types=types, n=n, **{f"idx_{k}": v for k, v in split.items()})
        os.replace(tmp, cache)
    z = np.load(cache)
    return {k: dict(pos=z["pos"][z[f"idx_{k}"]], types=z["types"][z[f"idx_{k}"]], n=z["n"][z[f"idx_{k}"]])
            for k in ("train", "valid", "test")}


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


# -- model: EDM's EGNN (egnn.py, a port whose module names match EDM's released QM9 weights) -------------------

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
            raise common.CheckpointError(f"{ref!r} has a model config this script cannot build ({e})") from None
        sd = ckpt["state_dicts"].get("ema") or ckpt["state_dicts"].get("model")
        if not isinstance(sd, dict):
            raise common.CheckpointError(f"{ref!r} has no 'ema' or 'model' weights")
        common.load_state(model, edm_state_dict(sd), f"checkpoint {ref!r}")
    except common.CheckpointError as e:
        raise SystemExit(f"graft_molecule: {e}")
    return model.to(device).eval(), cfg


# -- diffusion: schedule, training loss, sampler (P-GRAFT stitching lives in the sampler) ---------------------

def make_abar(cfg):
    return torch.tensor(common.noise_schedule(cfg["schedule"], cfg["T"]), dtype=torch.float32)  # (T+1,)


def sample_noise(shape, mask, gen=None):
    """N(0, I) on atoms, with the position part projected to zero centre of mass (EDM's subspace)."""
    eps = common.gaussian_noise(shape, mask, gen)
    return torch.cat([remove_mean(eps[..., :3], mask), eps[..., 3:]], -1)


def step_mean_std(eps, z_t, abar, t, s):
    """Gaussian p(z_s | z_t) of the ancestral sampler for any s < t (EDM's sample_p_zs_given_zt)."""
    a_t, a_s = abar[t], abar[s]
    alpha_ts, sigma2_ts = (a_t / a_s).sqrt(), 1 - a_t / a_s
    sigma_t, sigma_s = (1 - a_t).sqrt(), (1 - a_s).sqrt()
    mean = z_t / alpha_ts - (sigma2_ts / alpha_ts / sigma_t) * eps
    return mean, sigma2_ts.sqrt() * sigma_s / sigma_t


def decode(z0, mask):
    """Clean state -> numpy molecules: positions (B, 29, 3) Angstrom, types (B, 29) int8 (-1 padding)."""
    B, n, _ = z0.shape
    pos = np.zeros((B, MAX_N, 3), np.float32)
    types = np.full((B, MAX_N), -1, np.int8)
    pos[:, :n] = (z0[..., :3] * mask[..., None]).numpy()
    types[:, :n] = torch.where(mask, z0[..., 3:8].argmax(-1), -1).numpy()
    return pos, types


@torch.no_grad()
def sample(net_hi, net_lo, n_atoms, abar, N, N_I=0, batch=250, save_at=(), keep_traj=False, x_start=None,
           amp=False, desc="sampling"):
    """Ancestral sampling over the grid tau_N > ... > tau_0 = 0, then one x_0-prediction (NFE = N + 1).
    Stitching (SPEC 3): net_hi takes the steps from tau_k for k > N_I (down to s = tau_{N_I}), net_lo the rest
    and the final x_0-prediction. Reference sampling: both the reference. P-GRAFT: (fine-tuned, reference).
    RP-GRAFT: (reference, fine-tuned). GRAFT (N_I = 0): (fine-tuned, fine-tuned).
    save_at: step indices k whose state z_{tau_k} is returned in res["x_s"][k] (padded to 29 atoms); k = 0 gives
    the decoded clean molecule as features (GRAFT's data). x_start: (M, 29, D) states at step N_I to continue
    from (for the variance measurement). keep_traj: the trajectory (M, N+1, 29, D) and log-probs (M, N), for DDPO.
    Node counts are grouped by size so a batch wastes little on padding; results come back in input order."""
    T = len(abar) - 1
    tau = common.time_grid(T, N)
    dev = next(net_lo.parameters()).device
    D = 3 + net_lo.h_nf
    order = np.argsort(n_atoms, kind="stable")
    out = {k: [] for k in ("pos", "types", "traj", "logp")}
    x_s = {k: [] for k in save_at}
    pad = lambda a: F.pad(a, (0, 0, 0, MAX_N - a.shape[-2]))
    for b in tqdm(range(0, len(order), batch), desc=desc, leave=False):
        nb = n_atoms[order[b:b + batch]]
        B, n = len(nb), int(nb.max())
        mask = torch.arange(n)[None] < torch.as_tensor(nb)[:, None]             # (B, n)
        if x_start is None:
            z, k0 = sample_noise((B, n, D), mask), N                             # z_T (B, n, D)
        else:
            z, k0 = x_start[order[b:b + batch]][:, :n].clone(), N_I
        traj, logps = [z], []
        for k in range(k0, 0, -1):
            if k in x_s:
                x_s[k].append(pad(z))
            net = net_hi if k > N_I else net_lo
            t, s = tau[k], tau[k - 1]
            with common.autocast(dev, amp):
                eps = net(z.to(dev), torch.full((B,), t / T, device=dev), mask.to(dev)).float().cpu()
            mean, std = step_mean_std(eps, z, abar, t, s)
            z_new = mean + std * sample_noise(z.shape, mask)                     # (B, n, D)
            if keep_traj:
                logps.append(common.gaussian_logp(z_new, mean, std, mask))
                traj.append(z_new)
            z = z_new
        with common.autocast(dev, amp):
            eps = net_lo(z.to(dev), torch.zeros(B, device=dev), mask.to(dev)).float().cpu()
        z0 = (z - (1 - abar[0]).sqrt() * eps) / abar[0].sqrt()
        pos, types = decode(z0, mask)
        out["pos"].append(pos), out["types"].append(types)
        if 0 in x_s:
            x_s[0].append(pad(to_features(pos, types, D == 9)[0]))
        if keep_traj:
            out["traj"].append(pad(torch.stack(traj, 1)))                        # (B, N+1, 29, D)
            out["logp"].append(torch.stack(logps, 1))                            # (B, N)
    inv = np.argsort(order, kind="stable")
    res = {"pos": np.concatenate(out["pos"])[inv], "types": np.concatenate(out["types"])[inv],
           "x_s": {k: torch.cat(v)[torch.as_tensor(inv)] for k, v in x_s.items()}}
    if keep_traj:
        res["traj"], res["logp"] = torch.cat(out["traj"])[torch.as_tensor(inv)], torch.cat(out["logp"])[torch.as_tensor(inv)]
    return res


# -- metrics (SPEC 6, EDM protocol) -----------------------------------------------------------------------------

# bond lengths in pm, rows/cols H C N O F; 0 = that bond order does not exist for the pair
B1 = np.array([[74, 109, 101, 96, 92], [109, 154, 147, 143, 135], [101, 147, 145, 140, 136],
               [96, 143, 140, 148, 142], [92, 135, 136, 142, 142]], np.float64)
B2 = np.zeros((5, 5))
B3 = np.zeros((5, 5))
for (a, b), d in {("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120, ("N", "N"): 125, ("N", "O"): 121,
                  ("O", "O"): 121}.items():
    B2[ATOMS.index(a), ATOMS.index(b)] = B2[ATOMS.index(b), ATOMS.index(a)] = d
for (a, b), d in {("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113, ("N", "N"): 110}.items():
    B3[ATOMS.index(a), ATOMS.index(b)] = B3[ATOMS.index(b), ATOMS.index(a)] = d
VALENCE = np.array([1, 4, 3, 2, 1])


def bond_orders(pos, types):
    """EDM's get_bond_order for every pair of one molecule: pos (n, 3) Angstrom, types (n,) -> (n, n) int."""
    d = 100 * np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))                  # pm
    a, b = types[:, None], types[None]
    order = np.where(d < B1[a, b] + 10, 1, 0)
    double = (B2[a, b] > 0) & (d < B2[a, b] + 5)
    triple = double & (B3[a, b] > 0) & (d < B3[a, b] + 3)
    order = np.where(triple, 3, np.where(double, 2, order))
    np.fill_diagonal(order, 0)
    return order


class Molecule:
    """One generated molecule as a reward function sees it (see README, "add your own reward")."""

    def __init__(self, pos, types):
        keep = types >= 0
        self.pos, self.types = pos[keep], types[keep].astype(int)       # (n, 3) Angstrom, (n,) atom indices
        self.atoms = [ATOMS[t] for t in self.types]
        self.bonds = bond_orders(self.pos, self.types)                  # (n, n) EDM bond orders
        self.atom_stable = self.bonds.sum(1) == VALENCE[self.types]     # (n,) bool
        self.stable = bool(self.atom_stable.all())
        self.mol, self.smiles = build_rdkit(self.types, self.bonds)     # largest fragment, or (None, None)


def build_rdkit(types, bonds):
    """EDM's build_molecule + mol2smiles: RDKit molecule from the EDM bonds, sanitized, largest fragment."""
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")  # a failed sanitization is a counted outcome, not news
    mol = Chem.RWMol()
    for t in types:
        mol.AddAtom(Chem.Atom(ATOMS[t]))
    kinds = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    for i, j in zip(*np.nonzero(np.triu(bonds))):
        mol.AddBond(int(i), int(j), kinds[int(bonds[i, j])])
    try:
        Chem.SanitizeMol(mol)
    except Exception:
        return None, None
    frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    largest = max(frags, default=mol, key=lambda m: m.GetNumAtoms())
    try:
        Chem.SanitizeMol(largest)
        return largest, Chem.MolToSmiles(largest)
    except Exception:
        return None, None


def molecules(samples):
    return [Molecule(p, t) for p, t in zip(samples["pos"], samples["types"])]


def evaluate(mols, train_smiles):
    """Atom / molecule stability, validity, uniqueness, novelty (SPEC 6), each with a 95% CI."""
    atom_ok = np.concatenate([m.atom_stable for m in mols])
    valid = [m.smiles for m in mols if m.smiles is not None]
    uniq = set(valid)
    novel = [s not in train_smiles for s in uniq]
    return {"mol_stable": common.mean_ci95([m.stable for m in mols]),
            "atom_stable": common.mean_ci95(atom_ok),
            "valid": common.mean_ci95([m.smiles is not None for m in mols]),
            "unique": common.mean_ci95([1.0] * len(uniq) + [0.0] * (len(valid) - len(uniq))),
            "novel": common.mean_ci95(novel),
            "n_unique_valid": len(uniq)}


def training_smiles(data, data_dir):
    """Canonical SMILES of the training molecules through the same 3-D -> bonds -> RDKit path (EDM's)."""
    cache = os.path.join(data_dir, "train_smiles.txt")
    if not os.path.exists(cache):
        tr = data["train"]
        smi = [Molecule(p, t).smiles for p, t in tqdm(zip(tr["pos"], tr["types"]), total=len(tr["n"]),
                                                       desc="training SMILES", leave=False)]
        with open(cache + ".tmp", "w") as f:
            f.write("\n".join(s for s in smi if s))
        os.replace(cache + ".tmp", cache)
    with open(cache) as f:
        return set(f.read().split())


# -- reward: a plain function of a list of Molecule -> tensor (B,); add your own to REWARDS ---------------------

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


REWARDS = {"stable": reward_stable, "atom_stable": reward_atom_stable, "valid": reward_valid, "qed": reward_qed}


# -- pre-training the reference model (resumable) ---------------------------------------------------------------

def pretrain(args, device):
    """EDM's training: uniform t, eps loss on positions and features jointly, AdamW (amsgrad), EMA weights for
    sampling; resumable from <out>/ref.pt (common.train_resumable)."""
    data, cfg, path = load_qm9(args.data_dir)["train"], model_config(args), os.path.join(args.out, "ref.pt")
    model, ema = build_model(cfg).to(device), build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, amsgrad=True, weight_decay=1e-12)
    abar = make_abar(cfg).to(device)
    print(f"pre-training {sum(p.numel() for p in model.parameters()):,} parameters, batch {args.batch_size}, "
          f"lr {args.lr}, to step {args.train_steps}")

    def batches(step, gen):
        while True:
            for idx in common.size_bucketed_batches(data["n"], args.batch_size, gen):
                z, mask = to_features(data["pos"][idx], data["types"][idx], cfg["include_charges"])
                yield z.to(device), mask.to(device)

    def loss_fn(net, batch, gen):
        return common.shaped_loss(net, *batch, abar, 1, cfg["T"], noise=sample_noise)

    refuse = lambda saved: None if saved.get("model") == cfg else (
        f"graft_molecule: {path} was trained with {saved.get('model')}, not {cfg}; use another --out or the same size flags")
    step = common.train_resumable(path, {"model": cfg, "command": " ".join(sys.argv)}, model, ema, opt, batches,
                                  loss_fn, args.train_steps, args, device, "pre-training", refuse)
    print(f"saved {path} at step {step}")


# -- fine-tuning: GRAFT / P-GRAFT / RP-GRAFT (paper Alg. 1-2) and DDPO (SPEC 4) ---------------------------------

def score(samples, reward_fn):
    """Molecules and their rewards; a reward that is NaN or of the wrong shape stops the run."""
    mols = molecules(samples)
    r = torch.as_tensor(reward_fn(mols), dtype=torch.float32)
    if r.shape != (len(mols),):
        raise SystemExit(f"graft_molecule: the reward returned shape {tuple(r.shape)}, expected ({len(mols)},)")
    if not torch.isfinite(r).all():
        raise SystemExit(f"graft_molecule: the reward returned {int((~torch.isfinite(r)).sum())} NaN/inf values")
    return mols, r


def finetune(args, ref, ref_cfg, abar, hist, device):
    """GRAFT rounds (or DDPO epochs): draw M, score, accept, train; a checkpoint after every round."""
    ft = common.maybe_compile(build_model(ref_cfg).to(device), args.compile)
    ft.load_state_dict(ref.state_dict())
    lr = args.ddpo_lr if args.algo == "ddpo" else args.ft_lr
    opt = torch.optim.Adam(ft.parameters(), lr=lr)
    state_path = os.path.join(args.out, "state.pt")
    key = {k: getattr(args, k) for k in common.RESUME_KEYS} | {"ref": args.ref}
    rounds, compute, start = [], {"samples": 0, "nfe_sampling": 0, "grad_calls": 0, "wall_s": 0.0}, 0
    if os.path.exists(state_path):
        st = common.load_checkpoint(state_path)
        if st["config"]["resume_key"] != key:
            raise SystemExit(f"graft_molecule: {args.out} holds a run with other settings; use another --out")
        common.load_state(ft, st["state_dicts"]["model"], state_path)
        opt.load_state_dict(st["state_dicts"]["opt"])
        rounds, compute = st["extra"]["rounds"], st["extra"]["compute"]
        start = len(rounds)
        print(f"resuming after round {start}")
    tau = common.time_grid(len(abar) - 1, args.N)
    save_k, t_lo, t_hi, abar_s = common.training_window(args, abar, tau)
    reward_fn = REWARDS[args.reward]
    for rnd in range(start, args.rounds):
        t0 = time.time()
        torch.manual_seed(args.seed * 1_000_003 + rnd)  # per-round seeding: a resumed run repeats exactly
        n_atoms = np.random.RandomState(args.seed * 1_000_003 + rnd).choice(len(hist), args.M, p=hist)
        if args.sample_from == "reference" and args.algo != "ddpo":  # DDPO stays on-policy
            hi, lo, N_I = ref, ref, args.N_I
        else:
            hi, lo, N_I = common.samplers(args, ref, ft)
        res = sample(hi, lo, n_atoms, abar, args.N, N_I, args.sample_batch, save_at=() if args.algo == "ddpo"
                     else (save_k,), keep_traj=args.algo == "ddpo", amp=args.amp, desc=f"round {rnd + 1} sampling")
        mols, r = score(res, reward_fn)
        if args.algo == "ddpo":
            grad = common.ddpo_update(ft, opt, res, r, n_atoms, abar, args.N, args, step_mean_std)
            n_acc = args.M
        else:
            keys = [m.smiles for m in mols] if args.dedup else None
            acc = common.accept(r, args.accept, K=args.K, tau=args.tau, keys=keys,
                                groups=n_atoms if args.stratify else None)
            n_acc = len(acc)
            if n_acc == 0:
                raise SystemExit(f"graft_molecule: round {rnd + 1} accepted no sample; lower --tau or raise --M")
            grad = common.train_on_accepted(ft, opt, res["x_s"][save_k][acc], n_atoms[acc.numpy()], abar, t_lo, t_hi,
                                            abar_s, args.ft_steps, args.batch_size, args.amp, noise=sample_noise,
                                            ema_decay=args.ft_ema)
        valid = [m.smiles for m in mols if m.smiles is not None]
        wall = time.time() - t0
        compute = {"samples": compute["samples"] + args.M, "nfe_sampling": compute["nfe_sampling"] + args.M * (args.N + 1),
                   "grad_calls": compute["grad_calls"] + grad, "wall_s": compute["wall_s"] + wall}
        rounds.append({"round": rnd + 1, "mean_reward": float(r.mean()), "accept_rate": n_acc / args.M,
                       "accepted_mean_reward": float(r[acc].mean()) if args.algo != "ddpo" else None,
                       "mol_stable": float(np.mean([m.stable for m in mols])),
                       "valid": len(valid) / len(mols), "unique": len(set(valid)) / max(len(valid), 1),
                       "samples_per_s": args.M / wall, "round_wall_s": wall, **compute})
        common.save_checkpoint(state_path, {"model": ft.state_dict(), "opt": opt.state_dict()},
                               {"resume_key": key, "model": ref_cfg}, {"rounds": rounds, "compute": compute})
        common.write_jsonl(os.path.join(args.out, "metrics.jsonl"), rounds)
        print(f"round {rnd + 1}/{args.rounds}: mean reward {r.mean():.3f}, accepted {n_acc}/{args.M}, "
              f"unique {rounds[-1]['unique']:.3f}, {args.M / wall:.1f} samples/s")
    return ft, rounds, compute


# -- evaluation -------------------------------------------------------------------------------------------------

def evaluate_sampler(hi, lo, N_I, args, abar, hist, train_smiles, desc):
    """n_eval molecules from the same seed for every model (common random numbers), SPEC 6 metrics."""
    torch.manual_seed(args.seed + 12_345)
    n_atoms = np.random.RandomState(args.seed + 12_345).choice(len(hist), args.n_eval, p=hist)
    t0 = time.time()
    res = sample(hi, lo, n_atoms, abar, args.N, N_I, args.sample_batch, amp=args.amp, desc=desc)
    mols, r = score(res, REWARDS[args.reward])
    metrics = evaluate(mols, train_smiles) | {"reward": common.mean_ci95(r.numpy())}
    return {"n_samples": args.n_eval, "nfe": args.n_eval * (args.N + 1), "wall_s": time.time() - t0,
            "samples_per_s": args.n_eval / (time.time() - t0), "metrics": metrics}, res


def reference_eval(args, ref, abar, hist, train_smiles):
    """The reference model's evaluation, cached by (checkpoint bytes, sampler, n_eval, seed, reward): every run of
    a sweep compares against the same numbers without paying for them again."""
    tag = f"{common.sha1_file(common.resolve_ref(args.ref))}_N{args.N}_n{args.n_eval}_s{args.seed}_{args.reward}"
    cache = os.path.join(args.data_dir, "reference_evals", tag)
    if os.path.exists(cache + ".json"):
        with open(cache + ".json") as f:
            ev = json.load(f)
        z = np.load(cache + ".npz")
        return ev, {"pos": z["pos"], "types": z["types"]}
    ev, res = evaluate_sampler(ref, ref, 0, args, abar, hist, train_smiles, "reference eval")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez_compressed(cache + ".tmp.npz", pos=res["pos"], types=res["types"])
    os.replace(cache + ".tmp.npz", cache + ".npz")
    common.write_json(cache + ".json", ev)
    return ev, res


def save_grid(samples, path, n=24):
    """PNG grid of the first n valid molecules (RDKit 2-D depictions, hydrogens hidden), stable ones marked."""
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
    ax.plot(x, [reference["metrics"]["unique"]["mean"]] + [r["unique"] for r in rounds], "s--", label="uniqueness")
    ax.set_xticks(x), ax.set_xlabel("round (0 = reference)"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(os.path.join(out, "rounds.png"), dpi=120), plt.close(fig)


def measure_variance(args, ref, abar, hist):
    """SPEC 3: E[Var(r(X_0) | X_t)] at t = tau_{N_I} for a grid of n_i. P base trajectories of the reference,
    R stochastic continuations from each saved x_t, the within-group variance averaged over groups."""
    grid = sorted({round(f * args.N) for f in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)})
    torch.manual_seed(args.seed)
    n_atoms = np.random.RandomState(args.seed).choice(len(hist), args.var_P, p=hist)
    base = sample(ref, ref, n_atoms, abar, args.N, 0, args.sample_batch, save_at=grid, desc="base trajectories")
    curve = []
    for N_I in grid:
        x = base["x_s"][N_I].repeat_interleave(args.var_R, 0)                     # (P R, 29, D)
        res = sample(ref, ref, np.repeat(n_atoms, args.var_R), abar, args.N, N_I, args.sample_batch, x_start=x,
                     desc=f"continuations from N_I={N_I}")
        r = score(res, REWARDS[args.reward])[1].view(args.var_P, args.var_R)
        within = r.var(1, unbiased=True)                                         # (P,)
        curve.append({"n_i": N_I / args.N, "N_I": N_I, "t": int(common.time_grid(args.T, args.N)[N_I]),
                      "cond_var": common.mean_ci95(within.numpy()), "total_var": float(r.flatten().var())})
        print(f"n_i {N_I / args.N:.2f}: E[Var(r|x_t)] = {within.mean():.4f} (total Var(r) {r.var():.4f})")
    common.write_json(os.path.join(args.out, "variance.json"), {"reward": args.reward, "P": args.var_P,
                                                                  "R": args.var_R, "N": args.N, "curve": curve})
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    m = [c["cond_var"]["mean"] for c in curve]
    lo = [c["cond_var"]["mean"] - c["cond_var"]["ci95"][0] for c in curve]
    ax.errorbar([c["n_i"] for c in curve], m, yerr=lo, fmt="o-", capsize=3)
    ax.set_xlabel("n_i  (switch step N_I / N)"), ax.set_ylabel(f"E[Var({args.reward} | x_t)]"), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(os.path.join(args.out, "variance_curve.png"), dpi=120), plt.close(fig)
    return curve


# -- main -------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    common.seed_everything(args.seed)
    device = common.get_device(args.device)
    if args.pretrain:
        args.out = args.out or os.path.join("runs", f"molecule_pretrain_{args.preset}")
        return pretrain(args, device)
    method = "reference" if args.eval_only else "variance" if args.measure_variance else common.method_name(args)
    args.out = args.out or os.path.join("runs", f"molecule_{method}" + (f"_ni{args.n_i}" if args.N_I else ""))
    os.makedirs(args.out, exist_ok=True)
    ref, ref_cfg = load_reference(args.ref, device, model_config(args))
    data = load_qm9(args.data_dir)
    hist = np.bincount(data["train"]["n"], minlength=MAX_N + 1) / len(data["train"]["n"])  # p(n atoms)
    abar = make_abar(ref_cfg)
    ref = common.maybe_compile(ref, args.compile)
    tau = common.time_grid(ref_cfg["T"], args.N)
    print(f"reference: {args.ref} ({sum(p.numel() for p in ref.parameters()):,} parameters, {ref_cfg})")
    if args.measure_variance:
        return measure_variance(args, ref, abar, hist)
    if not args.eval_only:
        print(common.plan(method, args, tau, ref_cfg["T"]))
    train_smiles = training_smiles(data, args.data_dir)
    t0 = time.time()
    reference, ref_samples = reference_eval(args, ref, abar, hist, train_smiles)
    save_grid(ref_samples, os.path.join(args.out, "molecules_reference.png"))
    results = {"task": "molecule", "method": method, "n_i": args.n_i,
               "command": "python graft_molecule.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "config": {k: v for k, v in vars(args).items()} | {"model": ref_cfg}, "reference": reference}
    if not args.eval_only:
        ft, rounds, compute = finetune(args, ref, ref_cfg, abar, hist, device)
        hi, lo, N_I = common.samplers(args, ref, ft)
        finetuned, ft_samples = evaluate_sampler(hi, lo, N_I, args, abar, hist, train_smiles, "fine-tuned eval")
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
