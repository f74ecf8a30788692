"""image_features.py — the image side of noise_correction.py, none of it the paper's algorithm: the data
readers (Fashion-MNIST's IDX files, a folder of images; docs/method.md §7), the uint8 <-> [-1, 1]
conversions, the FID feature networks (docs/method.md §6: an offline Fashion-MNIST classifier, or
pytorch-fid's Inception-v3 ported to torchvision), the reference statistics, and the figures (sample grids,
FID against FLOPs).
Errors are noise_correction's: one line, prefixed with its name.
"""
import gzip
import hashlib
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

FMNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian's dataset-fashion-mnist (docs/method.md §7)
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSIFIER_NAME = "graft-fmnist-cnn pool features (256-d; not Inception, not comparable with published FIDs)"
INCEPTION_NAME = "Inception-v3 pool3 (pytorch-fid weights, 2048-d)"


# -- images: Fashion-MNIST, a folder of images, uint8 <-> float ----------------------------------------------

def read_idx(path):
    """An IDX file (gzip or not) of unsigned bytes -> numpy array of its declared shape."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{os.path.basename(path)} is not an IDX file of unsigned bytes")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * len(shape)).reshape(shape)


def find_fashion_mnist(data_root):
    """{name: path} from the Debian package's folder or torchvision's <root>/FashionMNIST/raw, or None."""
    for d in FMNIST_DIRS + (os.path.join(data_root, "FashionMNIST", "raw"),):
        found = {name: os.path.join(d, f) for name in sum(FMNIST_FILES.values(), ())
                 for f in (name, name + ".gz") if os.path.isfile(os.path.join(d, f))}
        if len(found) == 4:
            return found
    return None


def load_fashion_mnist(data_root, download=False):
    """{'train': (images (60000, 1, 32, 32) uint8, labels), 'test': (10000 ...)}: 28x28 padded by 2 with
    black."""
    paths = find_fashion_mnist(data_root)
    if paths is None and download:
        import torchvision
        try:
            for train in (True, False):
                torchvision.datasets.FashionMNIST(data_root, train=train, download=True)
        except Exception as e:  # offline, proxy, disk: the user can only act on the message
            first = str(e).splitlines()[0] if str(e) else ""
            raise SystemExit(f"noise_correction: torchvision could not download Fashion-MNIST "
                             f"({type(e).__name__}: {first}); apt-get install "
                             f"dataset-fashion-mnist") from None
        paths = find_fashion_mnist(data_root)
    if paths is None:
        raise SystemExit(f"noise_correction: Fashion-MNIST not found in {FMNIST_DIRS[0]} or "
                         f"{os.path.join(data_root, 'FashionMNIST', 'raw')}; install it with 'apt-get "
                         f"install dataset-fashion-mnist' (Debian) or rerun with --download (torchvision, "
                         f"internet)")
    out = {}
    try:
        for split, (img, lab) in FMNIST_FILES.items():
            x, y = read_idx(paths[img]), read_idx(paths[lab])
            if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (len(x),):
                raise ValueError(f"{split} images {x.shape} / labels {y.shape} are not Fashion-MNIST's")
            x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None]                           # (n, 1, 32, 32)
            out[split] = (torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)))
    except (OSError, ValueError, EOFError) as e:
        raise SystemExit(f"noise_correction: could not read Fashion-MNIST from {os.path.dirname(paths[img])} "
                         f"({e}); reinstall dataset-fashion-mnist") from None
    return out


class FolderImages(torch.utils.data.Dataset):
    """Every image under a folder, centre-cropped to a square and resized: items (uint8 (3, size, size),)."""

    EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, root, size):
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                            if f.lower().endswith(self.EXT))
        self.size = size
        if not self.files:
            raise SystemExit(f"noise_correction: no images ({', '.join(self.EXT)}) under {root}")
        try:
            self[0]
        except OSError as e:
            raise SystemExit(f"noise_correction: cannot read {self.files[0]} ({e})") from None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((self.size, self.size), Image.BICUBIC)
            return (torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1),)         # (3, size, size)


def to_float(x):
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8, the 8-bit quantisation a saved PNG would have (FID is measured on it)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# -- the Inception-v3 of FID (TTUR's TF graph of 2015-12-05, as pytorch-fid ports it) in torchvision ---------
# pytorch-fid's pt_inception-2015-12-05-6726825d.pth loads into torchvision's Inception3 with strict=True: the
# parameter names map 1:1 (1008 classes, no aux head). The weights alone do not give FID's features:
# pytorch-fid's blocks pool differently from torchvision's. In InceptionA, InceptionC and the first InceptionE
# (Mixed_7b) the pooling branch averages without counting the zero padding (count_include_pad=False;
# torchvision counts it), and the last block (Mixed_7c) max-pools where torchvision average-pools. Those
# branches are replaced here.

def _fid_pool_block(cls, pool):
    """A torchvision Inception block whose pooling branch uses `pool` (pytorch-fid's) instead of its own."""
    class FIDBlock(cls):
        def _forward(self, x):
            outs = super()._forward(x)
            outs[-1] = self.branch_pool(pool(x))
            return outs
    FIDBlock.__name__ = "FID" + cls.__name__
    return FIDBlock


def load_inception(path):
    """features(x): x (B, 1 or 3, H, W) in [-1, 1] -> (B, 2048) pool3 features, as pytorch-fid's
    InceptionV3([3])."""
    from torchvision.models import inception as tvi
    avg = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    blocks = [tvi.BasicConv2d, _fid_pool_block(tvi.InceptionA, avg), tvi.InceptionB,
              _fid_pool_block(tvi.InceptionC, avg), tvi.InceptionD, _fid_pool_block(tvi.InceptionE, avg),
              tvi.InceptionAux]
    net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False, inception_blocks=blocks)
    net.Mixed_7c = _fid_pool_block(tvi.InceptionE, lambda x: F.max_pool2d(x, 3, stride=1, padding=1))(2048)
    try:
        common.load_state(net, common.load_checkpoint(path)["state_dicts"]["model"],
                          f"Inception weights {path!r}")
    except common.CheckpointError as e:
        raise SystemExit(f"noise_correction: {e}; --inception wants pytorch-fid's "
                         f"pt_inception-2015-12-05-6726825d.pth")
    net.eval().requires_grad_(False)

    def features(x):
        x = x.float().expand(-1, 3, -1, -1)                                                # grey -> RGB
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)        # [-1, 1] already
        for name, m in net.named_children():
            if name in ("dropout", "fc"):
                break
            x = m(x)
        return x.flatten(1)                                                                # (B, 2048) pool3
    return features


# -- FID features and statistics (docs/method.md §6; the Frechet distance is common.frechet_distance) --------

class FeatureCNN(nn.Module):
    """graft-fmnist-cnn: a small Fashion-MNIST classifier; its 256-d pooled last layer is the FID feature."""

    def __init__(self, in_ch=1, n_classes=10):
        super().__init__()
        layers, c = [], in_ch
        for cout, stride in ((32, 1), (64, 2), (128, 2), (128, 1), (256, 2)):
            layers += [nn.Conv2d(c, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]
            c = cout
        self.body, self.fc = nn.Sequential(*layers), nn.Linear(256, n_classes)

    def features(self, x):
        return self.body(x).mean((2, 3))                                                   # (B, 256)

    def forward(self, x):
        return self.fc(self.features(x))


def train_classifier(train, test, path, epochs=2.0, device="cpu", seed=0):
    """Trained once, cached at `path`: the metric must not change between runs."""
    torch.manual_seed(seed)
    net = FeatureCNN().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, y = train
    steps = max(1, round(epochs * (len(x) // 128)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="training the FID feature network"):
        idx = torch.randint(len(x), (128,))
        loss = F.cross_entropy(net(to_float(x[idx]).to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(to_float(test[0][i:i + 500]).to(device)).argmax(1).cpu()
                          for i in range(0, len(test[0]), 500)])
        acc = float((pred == test[1]).float().mean())
    common.save_checkpoint(path, {"model": net.state_dict()}, {"name": CLASSIFIER_NAME},
                           {"test_accuracy": acc})
    print(f"feature network: test accuracy {acc:.4f}, saved {path}")


def feature_network(args, data, device):
    """(features fn, name, tag of the weights): pytorch-fid's Inception if --inception, else graft-fmnist-cnn
    (--classifier, trained on data['labels'] if missing)."""
    if args.inception:
        f = load_inception(args.inception)
        return lambda x: f(x.to(device)), INCEPTION_NAME, common.sha1_file(args.inception)
    if not os.path.exists(args.classifier):
        lab = data["labels"]
        train_classifier(lab["train"], lab["test"], args.classifier, args.classifier_epochs, device,
                         args.seed)
    net = FeatureCNN().to(device)
    try:
        sd = common.load_checkpoint(args.classifier)["state_dicts"]["model"]
        common.load_state(net, sd, args.classifier)
    except common.CheckpointError as e:
        raise SystemExit(f"noise_correction: {e}; delete it to retrain the feature network")
    net.eval().requires_grad_(False)
    return lambda x: net.features(x.to(device)), CLASSIFIER_NAME, common.sha1_file(args.classifier)


@torch.no_grad()
def feature_stats(feat, images_uint8, batch):
    """(mu, Sigma) in float64 of the features of uint8 images, as pytorch-fid (rowvar=False, ddof=1)."""
    f = np.concatenate([feat(to_float(images_uint8[i:i + batch])).double().cpu().numpy()
                        for i in range(0, len(images_uint8), batch)])
    return f.mean(0), np.cov(f, rowvar=False)


def reference_stats(args, data, feat, feat_tag):
    """The real images' statistics, cached in --cache_dir by (feature weights, reference set)."""
    key = (f"{feat_tag}|{data['ref_name']}|{len(data['ref'])}|{os.path.abspath(args.data)}|{args.image_size}|"
           f"{args.n_ref}")
    cache = os.path.join(args.cache_dir, f"fid_ref_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz")
    if os.path.exists(cache):
        z = np.load(cache)
        return z["mu"], z["sigma"]
    ds = data["ref"]
    n = min(len(ds), args.n_ref)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n] if n < len(ds) else range(n)
    imgs = (torch.stack([ds[int(i)][0] for i in tqdm(idx, desc="FID reference images", leave=False)])
            if not args.fmnist else ds.tensors[0])
    mu, sigma = feature_stats(feat, imgs, args.sample_batch)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache + ".tmp.npz", mu=mu, sigma=sigma)
    os.replace(cache + ".tmp.npz", cache)
    return mu, sigma


# -- figures -------------------------------------------------------------------------------------------------

def plot_side_by_side(panels, path):
    """Base and corrected samples from the same noise seeds, side by side."""
    import torchvision
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (title, imgs) in zip(np.atleast_1d(axes), panels):
        g = torchvision.utils.make_grid(imgs[:64].cpu(), nrow=8, padding=1, pad_value=255)
        g = g.permute(1, 2, 0).numpy()
        ax.imshow(g.squeeze(-1) if g.shape[-1] == 1 else g, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9), ax.axis("off")
    fig.tight_layout(), fig.savefig(path, dpi=130), plt.close(fig)


def plot_fid_flops(curve, path, feat_name):
    """FID (mean and std over seeds) against FLOPs per image, base and corrected samplers (noise_correction's
    curve points), log-log."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    # base labels above right, corrected below left: the two curves sit close
    for kind, style, ms, label, text in (
            ("base", "o-", 6, "base (N steps)", dict(xytext=(4, 4), ha="left", va="bottom")),
            ("corrected", "*-", 10, "corrector N_c + base N", dict(xytext=(-6, -3), ha="right", va="top"))):
        pts = [c for c in curve if c["sampler"] == kind]
        x, fid = [c["flops_per_image"] for c in pts], [c["metrics"]["fid"] for c in pts]
        if pts:
            ax.errorbar(x, [f["mean"] for f in fid], yerr=[f["std"] or 0 for f in fid], fmt=style, capsize=3,
                        ms=ms, label=label)
            for c, xi, f in zip(pts, x, fid):
                ax.annotate(f"{c['N']}" if kind == "base" else f"{c['N_c']}+{c['N']}", (xi, f["mean"]),
                            textcoords="offset points", fontsize=7, **text)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("FLOPs per image"), ax.set_ylabel("FID (log scale)")
    ax.yaxis.set_major_locator(plt.matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    ax.set_title(f"FID: {feat_name.split(' (')[0]}", fontsize=8), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(path, dpi=130), plt.close(fig)
