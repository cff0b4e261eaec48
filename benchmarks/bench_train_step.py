"""What balancing costs in a training step: the audio-visual ResNet-18 model, batch 64.

One full step (forward, backward, modulation, SGD update) through fastbml's Trainer with each
method, against plain joint training in the same run (OGM and OPM: at most +5% on CPU, +3% on
a GPU; MMPareto, AGM and PMR cost more by design: a second backward pass, M eval-mode encoder
passes, the prototypical loss), plus OGM-GE written the way the reference repository does it (`original`):
a per-sample Python loop for the scores, a Python branch on the ratio, and `grad.std().item()`
with a fresh noise tensor for every conv kernel.

CPU inputs are reduced (spectrogram 1x128x96, one 112x112 frame) to keep the run short; the
modulation's cost does not depend on the input size, so the reduced step gives the *larger*
relative overhead. On CUDA the inputs are CREMA-D-sized (1x257x188, one 224x224 frame).

    python -m benchmarks.bench_train_step   # overheads, interleaved; also written to
                                            # benchmarks/results/<device>-train-step-overhead.md
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch.nn import functional as F

from fastbml.data import DatasetInfo, Splits, TensorDataset
from fastbml.models import InputSpec
from fastbml.train import Trainer, make_config

from .harness import ORIGINAL, Case, interleaved_medians
from .report import device_name, write_table

BATCH = 64
CLASSES = 6
METHODS = ("joint", "ogm", "ogm-ge", "opm", "opm+ogm-ge", "mmpareto", "agm", "pmr")


def _shapes(device: torch.device) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if device.type == "cuda":
        return (1, 257, 188), (3, 1, 224, 224)
    return (1, 128, 96), (3, 1, 112, 112)


def make_trainer(device: torch.device, method: str, out: str,
                 **overrides) -> tuple[Trainer, dict, torch.Tensor]:
    """A Trainer of the benchmark's model and batch for `method` (config `overrides` on top),
    with the batch on the device."""
    audio, visual = _shapes(device)
    g = torch.Generator().manual_seed(0)
    inputs = {"audio": torch.randn(BATCH, *audio, generator=g),
              "visual": torch.randn(BATCH, *visual, generator=g)}
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    data = TensorDataset(inputs, labels)
    info = DatasetInfo("bench", {"audio": InputSpec("spectrogram", audio),
                                 "visual": InputSpec("frames", visual)}, CLASSES)
    cfg = make_config("ogm-ge-cvpr2022", method=method, device=str(device), out=out,
                      progress=False, tensorboard=False, plots=False, ogm_end=None, **overrides)
    trainer = Trainer(cfg, Splits(info, data, data, data))
    trainer.model.train()
    return trainer, {m: x.to(device) for m, x in inputs.items()}, labels.to(device)


def _original_ogm_ge(model, alpha: float):
    """OGM-GE after backward as the OGM-GE repository's main.py does it
    (docs/methods.md#reference-pitfalls)."""
    def after_backward(unimodal, labels, epoch, **_):  # the batch (inputs, logits) unused
        softmax = torch.nn.Softmax(dim=1)
        score_a = sum(softmax(unimodal["audio"])[i][labels[i]] for i in range(labels.shape[0]))
        score_v = sum(softmax(unimodal["visual"])[i][labels[i]] for i in range(labels.shape[0]))
        ratio_v = score_v / score_a
        ratio_a = 1 / ratio_v
        if ratio_v > 1:                                  # host sync
            coeff_v, coeff_a = 1 - torch.tanh(alpha * F.relu(ratio_v)), 1
        else:
            coeff_a, coeff_v = 1 - torch.tanh(alpha * F.relu(ratio_a)), 1
        for name, p in model.named_parameters():
            if p.grad is None or p.grad.dim() != 4:
                continue
            coeff = coeff_a if name.startswith("encoders.audio") else coeff_v
            noise = torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)
            p.grad = p.grad * coeff + noise
    return after_backward


def cases(device: torch.device) -> list[Case]:
    audio, visual = _shapes(device)
    shape = (f"AV ResNet-18 step, batch {BATCH}, audio {'x'.join(map(str, audio))}, "
             f"visual {'x'.join(map(str, visual))}, fp32")
    out = tempfile.mkdtemp(prefix="fastbml-bench-")
    result = []
    for method in ("original", *METHODS):
        trainer, inputs, labels = make_trainer(device,
                                               "joint" if method == "original" else method,
                                               f"{out}/{method}")
        if method == "original":
            trainer.methods.after_backward = _original_ogm_ge(trainer.model, trainer.cfg.alpha)
        if method == "pmr":  # prototypes of every class, as after the trainer's first update
            trainer.methods.refresh_prototypes(0, lambda t=trainer: t._prototype_batches(0))
            trainer.model.train()
        impl = ORIGINAL if method == "original" else method
        result.append(Case("train_step", shape, impl,
                           lambda t=trainer, x=inputs, y=labels: t.train_step(x, y, epoch=0)))
    return result


def main(rounds: int = 15) -> None:
    """Overheads with the methods interleaved step by step (round r times every method once), so
    that a slow spell of a shared machine hits them all alike."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_cases = cases(device)
    times = {impl: t for (_, impl), t in interleaved_medians(all_cases, device, rounds).items()}
    name = device_name(device)
    lines = [f"# Training-step overhead on {name}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {all_cases[0].shape}; "
             f"median of {rounds} steps per method, the methods interleaved step by step.", "",
             "| method | median ms | overhead vs joint |", "|---|---:|---:|"]
    lines += [f"| {impl} | {seconds * 1e3:.1f} | {100 * (seconds / times['joint'] - 1):+.1f}% |"
              for impl, seconds in times.items()]
    table = "\n".join(lines) + "\n"
    write_table(f"{name}-train-step-overhead.md", table)


if __name__ == "__main__":
    main()
