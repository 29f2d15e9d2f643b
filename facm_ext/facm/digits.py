"""The embedded default dataset (scikit-learn's bundled 8x8 handwritten digits, no network access) and a sample
quality metric against held-out real data: the Frechet distance between features of a small classifier trained in
the same run (an "FID" for 8x8 digits), plus the classifier's agreement with the requested labels.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10
HELD_OUT = 360  # of the 1797 images; the rest is the training split


@dataclasses.dataclass
class DigitsData:
    """train_x ``[N, 1, S, S]`` float32 in [-1, 1], train_y ``[N]`` long; test_x/test_y the held-out split
    (always at 8x8, the metric's resolution); S = image_size."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    image_size: int


def load_digits_data(image_size: int = 8, split_seed: int = 0) -> DigitsData:
    """scikit-learn's digits (1797 images of 8x8, values 0..16), scaled to [-1, 1], split into 1437 training and
    360 held-out images by a fixed permutation. ``image_size`` 8 (as is) or 16 (bilinear upsampling)."""
    if image_size not in (8, 16):
        raise ValueError(f"image_size: expected 8 or 16, got {image_size!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise RuntimeError("the default dataset needs scikit-learn (pip install scikit-learn); it ships the 8x8 "
                           "digits, no download") from err
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    test, train = order[:HELD_OUT], order[HELD_OUT:]
    train_x = images[train]
    if image_size == 16:
        train_x = F.interpolate(train_x, size=(16, 16), mode="bilinear", align_corners=False)
    return DigitsData(train_x, labels[train], images[test], labels[test], image_size)


def to_metric_resolution(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, S, S] -> [N, 1, 8, 8] (average pooling for S = 16)."""
    return x if x.shape[-1] == 8 else F.adaptive_avg_pool2d(x, 8)


class DigitFeatures(nn.Module):
    """The metric's classifier: MLP 64 -> 128 -> 64 (features) -> 10. forward(x [N, 1, 8, 8]) -> logits [N, 10];
    features(x) -> [N, 64]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU())
        self.head = nn.Linear(64, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(to_metric_resolution(x).float().clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.enable_grad()
def train_feature_classifier(data: DigitsData, *, seed: int = 0, steps: int = 600) -> DigitFeatures:
    """Train :class:`DigitFeatures` on the training split (Adam, full batch, light noise augmentation) on the CPU.
    Deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitFeatures()
    x, y = to_metric_resolution(data.train_x), data.train_y
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        noisy = x + 0.1 * torch.randn(x.shape, generator=g)
        loss = F.cross_entropy(net(noisy), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net


def _mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` of two feature sets ``[N, D]``."""
    mu_a, cov_a = _mean_cov(features_a)
    mu_b, cov_b = _mean_cov(features_b)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)
    return float(value.clamp(min=0))


@torch.no_grad()
def sample_quality(classifier: DigitFeatures, samples: torch.Tensor, labels: torch.Tensor,
                   reference: torch.Tensor) -> dict:
    """FD of ``samples`` ``[N, 1, S, S]`` against ``reference`` real images in the classifier's feature space, and
    the fraction of samples classified as their requested ``labels`` ``[N]``."""
    samples = samples.detach().float().cpu()
    fd = frechet_distance(classifier.features(samples), classifier.features(reference.float().cpu()))
    accuracy = (classifier(samples).argmax(1) == labels.cpu()).float().mean().item()
    return {"fd": fd, "accuracy": accuracy}
