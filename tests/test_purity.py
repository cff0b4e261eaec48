"""cluster_purity: scaling, k-means backends against scikit-learn, stability, purity counting,
bad input."""

import importlib.util

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.preprocessing import MinMaxScaler
from utils import DEVICE

import fastbml
from fastbml.kmeans import kmeans
from fastbml.purity import minmax_scale, purity_from_clusters

FAST = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss is not installed (GPU machine)"))]


def blobs(n, k, *, std=2.5, dim=24, noise=0.0, dead=0, duplicates=0, seed=0):
    """Gaussian blobs [n, dim] with labels = blob index; `noise` of the labels flipped at
    random, `dead` constant columns, `duplicates` rows repeated."""
    x, y = make_blobs(n_samples=n, centers=k, n_features=dim, cluster_std=std, random_state=seed)
    rng = np.random.default_rng(seed)
    flip = rng.random(n) < noise
    y[flip] = rng.integers(0, k, flip.sum())
    x[:, :dead] = 0.5
    if duplicates:
        x = np.concatenate([x, x[:duplicates]])
        y = np.concatenate([y, y[:duplicates]])
    return torch.from_numpy(x).float().to(DEVICE), torch.from_numpy(y).to(DEVICE)


def reference_purity(x, y, k):
    """The authors' pipeline with n_init pinned to 10 (docs/methods.md#diagnosis): MinMaxScaler + KMeans."""
    scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x.cpu().numpy())
    clusters = KMeans(n_clusters=k, n_init=10, random_state=0).fit(scaled).labels_
    labels = y.cpu().numpy()
    return sum(np.bincount(labels[clusters == c]).max() for c in np.unique(clusters)) / len(labels)


def test_minmax_scale_matches_sklearn_with_constant_columns():
    x = torch.randn(50, 7, device=DEVICE) * 3 + 1
    x[:, 2] = 4.0
    expected = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x.cpu().double().numpy())
    got = minmax_scale(x)
    torch.testing.assert_close(got.cpu().double(), torch.from_numpy(expected), atol=1e-5, rtol=0)
    assert torch.all(got[:, 2] == -1.0)


def test_purity_counts_majority_labels():
    clusters = torch.randint(0, 5, (300,), device=DEVICE)
    labels = torch.randint(0, 4, (300,), device=DEVICE)
    expected = sum(torch.bincount(labels[clusters == c], minlength=4).max().item()
                   for c in range(5)) / 300
    assert float(purity_from_clusters(clusters, labels, 5, 4)) == pytest.approx(expected)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("k", "options"), [
    (3, {}),
    (7, {"noise": 0.2}),
    (12, {"dead": 5, "duplicates": 200}),
    (9, {"std": 4.0, "noise": 0.1}),
])
def test_fast_backends_agree_with_sklearn_n_init_10(backend, k, options):
    x, y = blobs(1500, k, seed=k, **options)
    got = fastbml.cluster_purity(x, y, k, kmeans=backend, seed=1)
    assert got == pytest.approx(reference_purity(x, y, k), abs=0.02)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("k", [7, 12])
def test_stable_across_seeds(backend, k):
    x, y = blobs(2000, k, std=3.5, seed=100 + k)
    purities = [fastbml.cluster_purity(x, y, k, kmeans=backend, seed=s) for s in range(4)]
    assert max(purities) - min(purities) <= 0.01, purities


def test_sklearn_backend_is_the_reference():
    x, y = blobs(800, 5, noise=0.1, seed=3)
    assert fastbml.cluster_purity(x, y, 5, kmeans="sklearn", seed=0) == pytest.approx(
        reference_purity(x, y, 5), abs=1e-6)


def test_backend_keyword_is_the_deprecated_name_of_kmeans():
    x, y = blobs(300, 3, seed=4)
    with pytest.warns(DeprecationWarning, match="use kmeans="):
        old = fastbml.cluster_purity(x, y, 3, backend="torch", seed=2)
    assert old == fastbml.cluster_purity(x, y, 3, kmeans="torch", seed=2)
    with pytest.raises(TypeError, match="kmeans= only"):
        fastbml.cluster_purity(x, y, 3, kmeans="torch", backend="sklearn")


def test_same_seed_same_purity_and_labels_beyond_clusters():
    x, y = blobs(600, 4, seed=5)
    assert fastbml.cluster_purity(x, y, 4, seed=3) == fastbml.cluster_purity(x, y, 4, seed=3)
    # more clusters than classes, and classes without samples, are fine
    assert 0.0 < fastbml.cluster_purity(x, y, 9, num_classes=6) <= 1.0


def test_purity_of_separated_blobs_is_one():
    x, y = blobs(900, 6, std=0.5, seed=9)
    assert fastbml.cluster_purity(x, y, 6) == 1.0


def test_kmeans_reaches_sklearn_inertia():
    x, _ = blobs(1200, 8, std=3.0, seed=11)
    x = minmax_scale(x)
    ours = float(kmeans(x, 8, seed=0).inertia)
    theirs = KMeans(n_clusters=8, n_init=10, random_state=0).fit(x.cpu().numpy()).inertia_
    assert ours <= theirs * 1.001


def test_kmeans_from_given_centroids_is_deterministic():
    x, _ = blobs(500, 4, seed=2)
    init = x[:4].clone()
    a, b = kmeans(x, 4, init=init), kmeans(x, 4, init=init)
    assert torch.equal(a.labels, b.labels) and 1 <= a.n_iter <= 300


@pytest.mark.parametrize(("call", "message"), [
    (lambda x, y: fastbml.cluster_purity(x[:5], y[:5], 6), "n_clusters = 6 exceeds"),
    (lambda x, y: fastbml.cluster_purity(x, y - 1, 3), "labels must be >= 0"),
    (lambda x, y: fastbml.cluster_purity(x, y, 3, num_classes=2), "outside num_classes"),
    (lambda x, y: fastbml.cluster_purity(x.index_fill(0, torch.tensor([3], device=x.device),
                                                      float("nan")), y, 3), "NaN/Inf"),
    (lambda x, y: fastbml.cluster_purity(x, y[:-1], 3), "labels must be"),
    (lambda x, y: fastbml.cluster_purity(x[0], y, 3), r"features must be \[N, D\]"),
    (lambda x, y: fastbml.cluster_purity(x, y.float(), 3), "integer class indices"),
    (lambda x, y: fastbml.cluster_purity(x, y, 0), "n_clusters must be"),
    (lambda x, y: fastbml.cluster_purity(x, y, 3, kmeans="cuml"), "kmeans must be"),
    (lambda x, y: fastbml.cluster_purity(x, y, 3, n_init=0), "n_init must be"),
])
def test_bad_input_is_named(call, message):
    x, y = blobs(60, 3, seed=1)
    with pytest.raises((ValueError, TypeError), match=message):
        call(x, y)


@pytest.mark.gpu
def test_cuda_torch_backend_agrees_with_sklearn():
    x, y = blobs(3000, 10, std=3.0, noise=0.1, seed=21)
    got = fastbml.cluster_purity(x.cuda(), y.cuda(), 10, kmeans="torch")
    assert got == pytest.approx(reference_purity(x, y, 10), abs=0.02)
