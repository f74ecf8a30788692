"""inception.py — the Inception-v3 of FID (TTUR's TF graph of 2015-12-05, as pytorch-fid ports it) in torchvision.

Loads pytorch-fid's pt_inception-2015-12-05-6726825d.pth into torchvision's Inception3 with strict=True: the
parameter names map 1:1 (1008 classes, no aux head). The weights alone do not give FID's features: pytorch-fid's
blocks pool differently from torchvision's. In InceptionA, InceptionC and the first InceptionE (Mixed_7b) the
pooling branch averages without counting the zero padding (count_include_pad=False; torchvision counts it), and
the last block (Mixed_7c) max-pools where torchvision average-pools. Those branches are replaced here.
"""
import torch.nn.functional as F

import common


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
    """features(x): x (B, 1 or 3, H, W) in [-1, 1] -> (B, 2048) pool3 features, as pytorch-fid's InceptionV3([3])."""
    from torchvision.models import inception as tvi
    avg = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False,
                         inception_blocks=[tvi.BasicConv2d, _fid_pool_block(tvi.InceptionA, avg), tvi.InceptionB,
                                           _fid_pool_block(tvi.InceptionC, avg), tvi.InceptionD,
                                           _fid_pool_block(tvi.InceptionE, avg), tvi.InceptionAux])
    net.Mixed_7c = _fid_pool_block(tvi.InceptionE, lambda x: F.max_pool2d(x, 3, stride=1, padding=1))(2048)
    try:
        common.load_state(net, common.load_checkpoint(path)["state_dicts"]["model"], f"Inception weights {path!r}")
    except common.CheckpointError as e:
        raise SystemExit(f"noise_correction: {e}; --inception wants pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
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
