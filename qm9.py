"""qm9.py — QM9 with hydrogens in 3-D (EDM's split) and EDM's evaluation protocol: bond orders from
interatomic distances, atom / molecule stability, RDKit validity, uniqueness and novelty (docs/method.md
§6-7). What graft_molecule.py's rewards and evaluation read; not the paper's algorithm."""
import csv
import importlib.util
import os
import re

import numpy as np
from tqdm import tqdm

import common

ATOMS = ["H", "C", "N", "O", "F"]           # EDM's atom_encoder order
CHARGES = [1, 6, 7, 8, 9]                    # nuclear charges, EDM's optional integer feature
MAX_N = 29                                   # largest QM9 molecule with hydrogens


# -- data ----------------------------------------------------------------------------------------------------

_FLOAT = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _qm9_csv_dir():
    spec = importlib.util.find_spec("qm9pack")
    if spec is None:
        raise SystemExit("graft_molecule: QM9 not found; pip install qm9pack==1.0.3")
    return os.path.join(spec.submodule_search_locations[0], "data")


def load_qm9(data_dir):
    """QM9 with hydrogens, EDM's split. Returns {split: {'pos': (N, 29, 3) float32 Angstrom, zero CoM,
    'types': (N, 29) int8 with -1 for padding, 'n': (N,) int}} and caches it as .npz (docs/method.md §7)."""
    cache = os.path.join(data_dir, "qm9_edm_split.npz")
    if not os.path.exists(cache):
        src = _qm9_csv_dir()
        csv.field_size_limit(1 << 26)
        pos, types, n = [], [], []
        for part in (1, 2, 3):
            with open(os.path.join(src, f"qm9_part{part}.csv"), newline="") as f:
                for row in tqdm(csv.DictReader(f), desc=f"QM9 part {part}", leave=False):
                    elems = re.findall(r"[A-Z][a-z]?", row["Elements"])
                    xyz = np.array([float(v) for v in _FLOAT.findall(row["XYZ_Ang"])],
                                   np.float32).reshape(-1, 3)
                    p, t = np.zeros((MAX_N, 3), np.float32), np.full(MAX_N, -1, np.int8)
                    p[: len(elems)] = xyz - xyz.mean(0)
                    t[: len(elems)] = [ATOMS.index(e) for e in elems]
                    pos.append(p), types.append(t), n.append(len(elems))
        pos, types, n = np.stack(pos), np.stack(types), np.array(n)
        if len(n) != 130_831:
            raise SystemExit(f"graft_molecule: expected 130,831 QM9 molecules, read {len(n)}; "
                             "reinstall qm9pack==1.0.3")
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


# -- EDM's metrics -------------------------------------------------------------------------------------------

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
    """Atom / molecule stability, validity, uniqueness, novelty (docs/method.md §6), each with a 95% CI."""
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
