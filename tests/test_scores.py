"""modality_scores: every backend against the torch path, plus the float64 definition."""

import pytest
import torch
from utils import ALL_BACKENDS, DEVICE, FAST_BACKENDS, FLOAT_DTYPES, assert_close, randn

import fastbml

SHAPES = [(2, 64, 31), (3, 7, 5), (2, 1, 1), (2, 256, 400), (1, 3, 1500), (4, 33, 2)]


def reference(logits, labels):
    """The definition in float64: sum over the batch of softmax(logits)[label]."""
    probs = torch.softmax(logits.double(), dim=-1)
    return probs[:, torch.arange(labels.numel()), labels].sum(dim=1)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_scores_match_the_definition(backend, shape):
    logits = randn(*shape, scale=3.0)
    labels = torch.randint(0, shape[2], (shape[1],), device=DEVICE)
    scores = fastbml.modality_scores(logits, labels, backend=backend)
    assert scores.dtype == torch.float32 and scores.shape == (shape[0],)
    torch.testing.assert_close(scores.double(), reference(logits, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fast_paths_match_torch_per_dtype_and_layout(backend, dtype):
    logits = [randn(37, 11, dtype=dtype, noncontiguous=True, scale=2.0) for _ in range(3)]
    labels = torch.randint(0, 11, (37,), device=DEVICE)
    expected = fastbml.modality_scores(logits, labels, backend="torch")
    assert_close(fastbml.modality_scores(logits, labels, backend=backend), expected,
                 dtype=torch.float32)


def test_list_and_stacked_inputs_agree_and_empty_batch_scores_zero():
    logits = [randn(9, 4), randn(9, 4)]
    labels = torch.randint(0, 4, (9,), device=DEVICE)
    torch.testing.assert_close(fastbml.modality_scores(logits, labels),
                               fastbml.modality_scores(torch.stack(logits), labels))
    empty = fastbml.modality_scores([randn(0, 4), randn(0, 4)],
                                    torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert torch.equal(empty, torch.zeros(2, device=DEVICE))


def test_scores_are_detached():
    logits = randn(2, 8, 3).requires_grad_()
    scores = fastbml.modality_scores(logits, torch.randint(0, 3, (8,), device=DEVICE))
    assert not scores.requires_grad


@pytest.mark.parametrize(
    ("logits", "labels", "error", "match"),
    [
        (lambda: [randn(4, 3), randn(5, 3)], lambda: torch.zeros(4, dtype=torch.long), ValueError,
         r"logits\[1\]"),
        (lambda: [randn(4, 3)], lambda: torch.zeros(5, dtype=torch.long), ValueError, "labels"),
        (lambda: [randn(4, 3)], lambda: torch.full((4,), 3), ValueError, "labels"),
        (lambda: [randn(4, 3)], lambda: torch.full((4,), -1), ValueError, "labels"),
        (lambda: [randn(4, 3)], lambda: torch.zeros(4), TypeError, "labels"),
        (lambda: [randn(4, 3)], lambda: [0, 1, 2, 0], TypeError, "labels"),
        (lambda: [[1.0, 2.0]], lambda: torch.zeros(1, dtype=torch.long), TypeError, "logits"),
        (lambda: [torch.ones(4, 3, dtype=torch.long)], lambda: torch.zeros(4, dtype=torch.long),
         TypeError, "logits"),
        (lambda: randn(4, 3), lambda: torch.zeros(4, dtype=torch.long), ValueError, "logits"),
        (lambda: [randn(4, 0)], lambda: torch.zeros(4, dtype=torch.long), ValueError, "classes"),
    ],
)
def test_bad_input_names_the_argument(logits, labels, error, match):
    y = labels()
    if isinstance(y, torch.Tensor):
        y = y.to(DEVICE)
    if DEVICE.type == "cuda" and match == "labels" and error is ValueError and y.numel() == 4:
        pytest.skip("label range is checked by a device-side assert on CUDA")
    with pytest.raises(error, match=match):
        fastbml.modality_scores(logits(), y)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_finite_logits_give_what_the_torch_path_gives(backend):
    logits = randn(2, 6, 5)
    logits[0, 1, 2] = float("nan")
    logits[1, 2, 1] = float("inf")
    logits[1, 4, 0] = float("-inf")  # a masked class: a finite score
    labels = torch.tensor([0, 1, 2, 3, 4, 1], device=DEVICE)
    expected = fastbml.modality_scores(logits, labels, backend="torch")
    actual = fastbml.modality_scores(logits, labels, backend=backend)
    assert torch.isnan(actual).tolist() == torch.isnan(expected).tolist() == [True, True]
    only_masked = logits.clone()
    only_masked[0, 1, 2] = 0.0
    only_masked[1, 2, 1] = 0.0
    expected = fastbml.modality_scores(only_masked, labels, backend="torch")
    assert_close(fastbml.modality_scores(only_masked, labels, backend=backend), expected,
                 dtype=torch.float32)
