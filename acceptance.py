"""acceptance.py — the rejection step of GRAFT (paper Alg. 1; docs/method.md §2), shared verbatim by the
task scripts: Top-K of M, Best-of-N, a threshold, de-duplication first, and Top-K within strata (per prompt
for text-to-image, per element count for molecules and layouts). Each rule returns indices into the rewards.
"""
import numpy as np
import torch


def accept_top_k(rewards, K):
    """Indices of the K largest rewards (Top-K of M; K = 1 is Best-of-N); ties broken by index."""
    return torch.argsort(-torch.as_tensor(rewards, dtype=torch.float64), stable=True)[:K]


def dedup_first(keys):
    """Indices of the first occurrence of every distinct key, None keys dropped (an invalid molecule has no
    identity). Applied before ranking, it adds -log(#copies) to the reshaped reward (docs/method.md §2)."""
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return torch.tensor(sorted(i for k, i in first.items() if k is not None), dtype=torch.long)


def stratum_quotas(groups, K):
    """K split over strata in proportion to their sizes (largest remainders, so the quotas sum to K): the
    accepted set keeps the sampled histogram of the stratifying condition. Returns {stratum: quota}."""
    values, counts = np.unique(np.asarray(groups), return_counts=True)
    share = K * counts / counts.sum()
    quota = np.floor(share).astype(int)
    for i in np.argsort(-(share - quota), kind="stable")[: K - quota.sum()]:
        quota[i] += 1
    return dict(zip(values.tolist(), quota.tolist()))


def accept(rewards, rule, K=None, tau=None, keys=None, groups=None):
    """One call for every rule: 'top_k' (Top-K of M), 'best_of_n' (K = 1), 'threshold' (r >= tau). With
    `keys`, duplicates are removed first and the rule ranks the survivors. With `groups` (top_k only), Top-K
    runs within each stratum, K split by stratum_quotas: per prompt, as the paper's text-to-image Top-K, or
    per element count. Returns indices into rewards."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    pool = dedup_first(keys) if keys is not None else torch.arange(len(rewards))
    r = rewards[pool]
    if rule == "top_k" and groups is not None:
        in_pool, sel = np.asarray(groups)[pool.numpy()], []
        for g, k in stratum_quotas(groups, K).items():
            ids = torch.as_tensor(np.nonzero(in_pool == g)[0], dtype=torch.long)
            sel.append(ids[accept_top_k(r[ids], min(k, len(ids)))])
        sel = torch.cat(sel).sort().values
    elif rule in ("top_k", "best_of_n"):
        sel = accept_top_k(r, min(K if rule == "top_k" else 1, len(pool)))
    elif rule == "threshold":                                                  # r >= tau
        sel = torch.nonzero(r >= tau).flatten()
    else:
        raise ValueError(f"unknown acceptance rule {rule!r}")
    return pool[sel]
