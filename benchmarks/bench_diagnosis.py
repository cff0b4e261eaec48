"""D&R diagnosis benchmarks: MinMax scaling + k-means + purity, train and held-out splits, two
modalities (four clusterings per diagnosis), at the sizes of the datasets D&R runs on.

- `original`: the D&R code's style: features to numpy, scikit-learn's MinMaxScaler and
  KMeans(n_clusters=k, random_state=0) with its default settings, purity by a loop over clusters;
- `fastbml[torch]`, `fastbml[faiss]`: `fastbml.cluster_purity` (k-means++ restarts, n_init=10);
- `fastbml[sklearn]`: the reference-compatible backend (scikit-learn with n_init=10 pinned, the
  stable diagnosis done the slow way; not at Kinetics-400 size).

The features are synthetic stand-ins for pooled ResNet-18 features: 512 post-ReLU columns (some
dead) driven by a 64-d class-dependent latent, one modality more separable than the other.

    python -m benchmarks.bench_diagnosis    # purities of every implementation, side by side
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

import fastbml

from .harness import ORIGINAL, Case, fastbml_impl

DIM = 512
# (name, train size, held-out size, classes); Kinetics-400 only where a GPU is present.
SCALES = [("CREMA-D", 5954, 744, 6), ("Kinetics-Sounds", 22000, 2000, 31),
          ("Kinetics-400", 240000, 20000, 400)]
SEPARATION = {"audio": 0.6, "visual": 0.4}


def pooled_features(n: int, classes: int, separation: float, seed: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 512] float32 features and [n] labels shaped like pooled ResNet-18 outputs."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 64, generator=torch.Generator().manual_seed(classes)) * separation
    labels = torch.randint(0, classes, (n,), generator=g)
    latent = means[labels] + torch.randn(n, 64, generator=g)
    projection = torch.randn(64, DIM, generator=torch.Generator().manual_seed(7)) / 8
    x = torch.relu(latent @ projection + 0.1 * torch.randn(n, DIM, generator=g))
    x[:, :16] = 0.0  # dead units: constant columns
    return x.to(device), labels.to(device)


def original_purity(features: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> float:
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import MinMaxScaler

    x = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features.cpu().numpy())
    y = labels.cpu().numpy()
    clusters = KMeans(n_clusters=n_clusters, random_state=0).fit(x).labels_
    majority = 0
    for c in np.unique(clusters):
        majority += np.bincount(y[clusters == c]).max()
    return majority / len(y)


def _diagnosis(data: dict, k: int, purity) -> list[float]:
    return [purity(x, y, k) for x, y in data.values()]


def _implementations(device: torch.device, scale: str) -> dict:
    impls = {ORIGINAL: original_purity}
    backends = ["torch"] + (["faiss"] if importlib.util.find_spec("faiss") else [])
    for backend in backends + (["sklearn"] if scale != "Kinetics-400" else []):
        impls[fastbml_impl(backend)] = (
            lambda x, y, k, b=backend: fastbml.cluster_purity(x, y, k, kmeans=b, seed=0))
    return impls


def _data(device: torch.device, n_train: int, n_val: int, k: int) -> dict:
    data = {}
    for i, (modality, separation) in enumerate(SEPARATION.items()):
        for split, n in (("train", n_train), ("val", n_val)):
            data[f"{modality}/{split}"] = pooled_features(n, k, separation, 10 * i + len(split),
                                                          device)
    return data


def cases(device: torch.device) -> list[Case]:
    result = []
    for scale, n_train, n_val, k in SCALES:
        if scale == "Kinetics-400" and device.type != "cuda":
            continue
        data = _data(device, n_train, n_val, k)
        shape = f"{scale}: ({n_train} + {n_val}) x {DIM}, k={k}, 2 modalities"
        for impl, purity in _implementations(device, scale).items():
            # runs of tens of seconds or minutes (scikit-learn's n_init=10, or Kinetics-400
            # size) are timed once
            slow = impl == fastbml_impl("sklearn") or (scale == "Kinetics-400" and impl == ORIGINAL)
            result.append(Case("dr_diagnosis", shape, impl,
                               lambda d=data, k=k, p=purity: _diagnosis(d, k, p),
                               single_shot=slow))
    return result


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for scale, n_train, n_val, k in SCALES:
        if scale == "Kinetics-400" and device.type != "cuda":
            continue
        data = _data(device, n_train, n_val, k)
        print(f"{scale} ({device}): purity per modality/split: {list(data)}")
        for impl, purity in _implementations(device, scale).items():
            print(f"  {impl:18s} {[round(p, 4) for p in _diagnosis(data, k, purity)]}")


if __name__ == "__main__":
    main()
