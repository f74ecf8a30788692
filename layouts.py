"""layouts.py — the layout data, the set denoiser and the measures graft_layout.py uses: PubLayNet / RICO
files (LayoutFormer++'s text format, or PubLayNet's official COCO files with LayoutDM's preprocessing),
LayoutGAN++'s alignment and overlap, and graft's own layout-FID feature network (docs/method.md §6-7).
Not the paper's algorithm."""
import functools
import json
import math
import os
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import pretraining

CLASSES = {"publaynet": ["text", "title", "list", "table", "figure"],
           "rico": ["Text", "Image", "Icon", "List_Item", "Text_Button", "Toolbar", "Web_View", "Input",
                    "Card", "Advertisement", "Background_Image", "Drawer", "Radio_Button", "Checkbox",
                    "Multi_Tab", "Pager_Indicator", "Modal", "On_Off_Switch", "Slider", "Map_View",
                    "Button_Bar", "Video", "Bottom_Navigation", "Number_Stepper", "Date_Picker"]}
MAX_N = 25                                          # LayoutDM's max_seq_length; the shipped files have <= 20
HERE = os.path.dirname(os.path.abspath(__file__))
FID_NET_NAME = "graft-layoutnet-v1"


# -- data ----------------------------------------------------------------------------------------------------

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
        raise SystemExit(f"graft_layout: {path} not found; the data/ folder is incomplete "
                         "(git checkout data)")
    layouts = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            tokens = [part.split() for part in line.split("|")] if line.strip() else []
            if any(len(t) != 5 or t[0] not in classes or not all(v.isdigit() for v in t[1:]) for t in tokens):
                raise SystemExit(f"graft_layout: {path}:{line_no} is not 'label x1 y1 x2 y2 | ...' "
                                 f"with integer corners and labels from {classes}")
            if tokens:
                layouts.append([(classes.index(t[0]), *(int(v) / 127 for v in t[1:]))
                                for t in tokens][:MAX_N])
    return pack(layouts)


def load_coco(json_path, max_elements=MAX_N):
    """LayoutDM's PubLayNet preprocessing of an official COCO file: images in id order,
    landscape pages (H < W) dropped, boxes outside the page or of zero size dropped,
    pages left with 0 or > 25 elements dropped, boxes as (xc, yc, w, h) divided by the page size."""
    try:
        with open(json_path) as f:
            coco = json.load(f)
        names, anns, layouts = {c["id"]: c["name"] for c in coco["categories"]}, defaultdict(list), []
        for a in coco["annotations"]:
            anns[a["image_id"]].append(a)
        for im in sorted(coco["images"], key=lambda im: im["id"]):
            W, H = float(im["width"]), float(im["height"])
            els = [(CLASSES["publaynet"].index(names[a["category_id"]]),
                    x / W, y / H, (x + w) / W, (y + h) / H)
                   for a in anns[im["id"]] for x, y, w, h in [a["bbox"]]
                   if x >= 0 and y >= 0 and x + w <= W and y + h <= H and w > 0 and h > 0]
            if H >= W and 0 < len(els) <= max_elements:
                layouts.append(els)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"graft_layout: {json_path} is not a readable PubLayNet COCO file "
                         f"({type(e).__name__}: {str(e)[:120]}); "
                         "pass the folder holding train.json and val.json")
    return pack(layouts)


def load_data(dataset, data=None):
    """{'train', 'test'}. Shipped files: 'valid' trains, 'test' evaluates. --data: LayoutDM's split of the
    official files (train.json shuffled with torch seed 0, its first 95% train; val.json is the test set)."""
    if data is not None:
        train = load_coco(os.path.join(data, "train.json"))
        perm = torch.randperm(len(train["n"]), generator=torch.Generator().manual_seed(0)).numpy()
        return {"train": {k: v[perm[:int(len(perm) * 0.95)]] for k, v in train.items()},
                "test": load_coco(os.path.join(data, "val.json"))}
    return {s: read_layout_text(os.path.join(HERE, "data", dataset, f"src1_{f}.txt"), CLASSES[dataset])
            for s, f in (("train", "valid"), ("test", "test"))}


def to_features(boxes, labels, n_classes):
    """Numpy layouts -> (z (B, n, 4 + C), mask (B, n)): box * 2 - 1 and class one-hot * 2 - 1,
    zero on padding."""
    n = max(int((labels >= 0).sum(1).max()), 1)
    lab = torch.as_tensor(labels[:, :n], dtype=torch.long)
    mask = lab >= 0                                                              # (B, n)
    z = torch.cat([torch.as_tensor(boxes[:, :n], dtype=torch.float) * 2 - 1,
                   F.one_hot(lab.clamp(min=0), n_classes).float() * 2 - 1], -1)  # (B, n, 4 + C)
    return z * mask[..., None], mask


# -- the denoiser: a transformer over the set of elements, no positional encodings ---------------------------

class Block(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the time embedding (DiT's adaLN-zero)."""

    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.norm2 = (nn.LayerNorm(d, elementwise_affine=False),
                                  nn.LayerNorm(d, elementwise_affine=False))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ada = nn.Linear(d, 6 * d)
        # every block starts as the identity
        nn.init.zeros_(self.ada.weight), nn.init.zeros_(self.ada.bias)

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
        self.time_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(),
                                      nn.Linear(d_model, d_model), nn.SiLU())
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm, self.final_ada = (nn.LayerNorm(d_model, elementwise_affine=False),
                                     nn.Linear(d_model, 2 * d_model))
        self.out = nn.Linear(d_model, self.D)
        for lin in (self.final_ada, self.out):
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)

    def forward(self, z, t, mask):
        """z (B, n, D), t (B,) in [0, 1], mask (B, n) bool -> eps (B, n, D)."""
        freqs = torch.exp(-math.log(10_000) * torch.arange(self.d_model // 2, device=z.device)
                          / (self.d_model // 2))
        a = 1000 * t.float()[:, None] * freqs                                    # DDPM's sinusoidal embedding
        c = self.time_mlp(torch.cat([a.cos(), a.sin()], -1).to(z.dtype))        # (B, d)
        h = self.inp(z)                                                          # (B, n, d)
        for blk in self.blocks:
            h = blk(h, c, ~mask)
        s, b = self.final_ada(c)[:, None].chunk(2, -1)
        return self.out(self.norm(h) * (1 + s) + b) * mask[..., None]


# -- LayoutGAN++'s measures and the layout-FID feature network -----------------------------------------------

def alignment(boxes, labels):
    """Per-layout LayoutGAN++ alignment (report the mean x100): for each real element i the six coordinates
    (xl, xc, xr, yt, yc, yb), d_i = min over real j != i and the 6 kinds of |c_ik - c_jk|,
    g_i = -log(1 - d_i), mean of g_i over the real elements. Padding takes no part, as i or as j
    (LayoutGAN++'s code masks only i). An element with no partner (a one-element layout) gets d_i = 1 there,
    which LayoutGAN++ maps to g_i = 0: so here."""
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
    """Per-layout LayoutGAN++ overlap: sum over ordered pairs of real elements i != j of
    intersection / area(i), divided by the number of real elements (a zero-area element adds 0,
    as LayoutGAN++'s nan_to_num does)."""
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
    """graft's layout-FID feature network: a transformer over the element set with a summary token, trained
    once to tell real training layouts from perturbed ones (LayoutGAN++'s LayoutNet is a real/fake
    discriminator too). The summary token (128-d) is the feature.
    Not LayoutDM's FIDNetV3 weights: its FIDs are not comparable."""

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
    """Fake layouts for the FID net. Half of them: every box jittered (log-uniform scale 0.25%..5% of the
    page), which is what misalignment looks like; a quarter: random classes for about half the elements; a
    quarter: uniformly redrawn boxes for about half the elements."""
    B, n, D = z.shape
    kind = torch.tensor([0, 0, 1, 2])[torch.randint(4, (B, 1, 1), generator=gen)]
    some = torch.rand(B, n, 1, generator=gen) < 0.5
    sigma = torch.exp(torch.rand(B, 1, 1, generator=gen) * math.log(20)) * 0.005
    boxes = z[..., :4] + (kind == 0) * sigma * torch.randn(B, n, 4, generator=gen)
    boxes = torch.where((kind == 2) & some, torch.rand(B, n, 4, generator=gen) * 2 - 1, boxes)
    cls = F.one_hot(torch.randint(D - 4, (B, n), generator=gen), D - 4).float() * 2 - 1
    return (torch.cat([boxes.clamp(-1, 1), torch.where((kind == 1) & some, cls, z[..., 4:])], -1)
            * mask[..., None])


def fid_network(path, train, n_classes, steps, seed=0):
    """The cached FID feature net, or train it once on the training layouts (batches of 64 real + 64 fake,
    Adam 1e-3, logistic loss) and cache it."""
    # the same initial weights always
    torch.manual_seed(seed)
    net = LayoutNet(n_classes)
    if not os.path.exists(path):
        print(f"training the layout-FID feature network {FID_NET_NAME} once ({steps} steps) -> {path}")
        gen = torch.Generator().manual_seed(seed)
        opt, step = torch.optim.Adam(net.parameters(), lr=1e-3), 0
        while step < steps:
            for idx in pretraining.size_bucketed_batches(train["n"], 64, gen)[:steps - step]:
                z, mask = to_features(train["boxes"][idx], train["labels"][idx], n_classes)
                logits = net.head(net.features(torch.cat([z, perturb(z, mask, gen)]),
                                               torch.cat([mask, mask])))
                loss = F.binary_cross_entropy_with_logits(logits.squeeze(-1),
                                                          (torch.arange(2 * len(idx)) < len(idx)).float())
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
        self.info = {"name": FID_NET_NAME,
                     "path": os.path.relpath(path, HERE) if path.startswith(HERE) else path,
                     "sha1": common.sha1_file(path),
                     "note": "layout FID with graft's own feature network; not comparable with "
                             "LayoutDM's FIDNetV3 or LayoutGAN++'s LayoutNet numbers"}
        self.real = self.stats(test["boxes"], test["labels"])

    @torch.no_grad()
    def stats(self, boxes, labels):
        f = np.concatenate([self.net.features(*to_features(boxes[i:i + 1000], labels[i:i + 1000],
                                                           self.n_classes))
                            .double().numpy() for i in range(0, len(boxes), 1000)])
        return f.mean(0), np.cov(f, rowvar=False)

    def __call__(self, boxes, labels):
        return common.frechet_distance(*self.stats(boxes, labels), *self.real)


def class_freq(labels, n_classes):
    """Fraction of the elements in each class."""
    return (np.bincount(labels[labels >= 0], minlength=n_classes)
            / max((labels >= 0).sum(), 1)).round(4).tolist()


def evaluate(boxes, labels, fid):
    """Alignment x100 and overlap with 95% CIs, layout FID against the test set (docs/method.md §6); distinct
    layouts; the class mix (the FID net reacts strongly to it)."""
    keys = layout_keys(boxes, labels)
    return {"alignment_x100": common.mean_ci95(100 * alignment(boxes, labels)),
            "overlap": common.mean_ci95(overlap(boxes, labels)),
            "fid": {"mean": fid(boxes, labels), "ci95": None},
            "unique": len(set(keys)) / len(keys), "n_elements": float((labels >= 0).sum(1).mean()),
            "class_freq": class_freq(labels, fid.n_classes)}


def real_floor(data, fid, n_eval, seed=0):
    """The real data's own scores, the floor a model can reach: alignment and overlap of the whole test set,
    and the FID of n_eval training layouts against it (a model's FID uses the same sample size)."""
    te, tr = data["test"], data["train"]
    idx = np.random.RandomState(seed).choice(len(tr["n"]), min(n_eval, len(tr["n"])), replace=False)
    return {"n_samples": len(te["n"]), "metrics": {
        "alignment_x100": common.mean_ci95(100 * alignment(te["boxes"], te["labels"])),
        "overlap": common.mean_ci95(overlap(te["boxes"], te["labels"])), "n_elements": float(te["n"].mean()),
        "class_freq": class_freq(te["labels"], fid.n_classes),
        "fid": {"mean": fid(tr["boxes"][idx], tr["labels"][idx]), "ci95": None, "n_train_layouts": len(idx)}}}


def save_grid(boxes, labels, classes, aspect, path, title, rows=4, cols=6):
    """PNG grid of the first rows x cols layouts, each element a box coloured by its class."""
    plt, C = common.pyplot(), len(classes)
    colors = (plt.get_cmap("tab10")(np.arange(C)) if C <= 10
              else plt.get_cmap("turbo")(np.linspace(0.05, 0.95, C)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.6 * aspect + 0.6))
    for ax, bx, lb in zip(axes.flat, boxes, labels):
        for (l, t, r, b), c in zip(to_ltrb(bx[lb >= 0]), lb[lb >= 0]):
            ax.add_patch(plt.Rectangle((l, t), r - l, b - t, facecolor=(*colors[c][:3], 0.35),
                                       edgecolor=colors[c]))
    for ax in axes.flat:
        ax.set_xlim(0, 1), ax.set_ylim(1, 0), ax.set_aspect(aspect), ax.set_xticks([]), ax.set_yticks([])
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in range(C)], classes, loc="lower center",
               ncol=min(C, 7), fontsize=7)
    (fig.suptitle(title, fontsize=9), fig.tight_layout(rect=(0, 0.07, 1, 0.97)),
     fig.savefig(path, dpi=110), plt.close(fig))
