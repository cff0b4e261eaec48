"""AGM in a whole training step: the demo's audio-visual ResNet-18 setting (docs/methods.md#agm).

The `synthetic` task in its ResNet-18 layout (spectrogram 1x32x32, frames 3x2x16x16, 10
classes), batch 64, SGD as in the demo preset, one thread as the demo runs. Side by side:
- `joint`: the plain step (forward, cross-entropy, backward, SGD update), for reference;
- `original`: the step as the authors' code runs it: after the training forward, the model in
  eval mode on the three zero-padded inputs (with autograd, as there), responses
  (T - P_a + P_v) / 2 and (T - P_v + P_a) / 2 through gradient-scaling hooks, scores by a
  per-sample Python loop (a softmax and a comparison each), coefficients and running scores as
  Python floats (`.item()`), and one backward through all four passes;
- `fastbml[...]`: the plain step plus `fastbml.AGM.step` after backward (one eval pass per
  encoder without gradient, one head call over the subsets, the `combined_nll` kernel, one
  multi-tensor scale).

Neither clips gradients (the authors' loop does when the head's gradient leaves [-1, 1]).

    python -m benchmarks.bench_agm   # interleaved rounds; writes
                                     # benchmarks/results/<device>-agm.md
"""

from __future__ import annotations

import math
import time
from itertools import combinations

import torch
from torch.nn import functional as F

import fastbml
from fastbml.data.synthetic import SyntheticConfig, make_synthetic
from fastbml.models import build_model

from .harness import ORIGINAL, Case, fastbml_backends, fastbml_impl, interleaved_medians
from .report import device_name, write_table

BATCH = 64
ALPHA = 1.0
JOINT = "joint"


def _setting(device: torch.device, n_modalities: int):
    """The demo's ResNet-18 model (with a second spectrogram modality for M = 3), an SGD
    optimiser as in the demo preset, and one batch of the task's data on `device`."""
    splits = make_synthetic(0, SyntheticConfig(layout="av"))
    info = splits.info
    inputs, labels = splits.train[list(range(BATCH))]
    specs = dict(info.inputs)
    if n_modalities == 3:
        specs["audio2"] = specs["audio"]
        inputs["audio2"] = inputs["audio"].flip(-1)
    inputs = {m: x.to(device) for m, x in inputs.items()}
    model = build_model(specs, info.num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, optimizer, inputs, labels.to(device)


def plain_step(model, optimizer, inputs, labels, agm=None) -> None:
    out = model(inputs)
    loss = F.cross_entropy(out.logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if agm is not None:
        agm.step(inputs, out.logits, labels, epoch=0)
    optimizer.step()


class OriginalAGM:
    """The authors' step for M modalities (their two- and three-modality code, written for any
    M): running scores as Python floats, the padded passes with autograd."""

    def __init__(self, model, optimizer, alpha: float = ALPHA):
        self.model, self.optimizer, self.alpha = model, optimizer, alpha
        self.names = list(model.modalities)
        self.t = [0.0] * len(self.names)
        self.n = 0

    @staticmethod
    def _score(response, labels) -> float:
        softmax = torch.nn.Softmax(dim=1)
        total = 0.0
        for i in range(labels.shape[0]):
            p = softmax(response)[i][labels[i]]
            if p < 1e-8 or torch.isinf(torch.log(p)):   # host syncs, per sample
                total += -math.log(1e-8)
            else:
                total += -torch.log(p)
        return float(total / labels.shape[0])

    def _responses(self, inputs):
        model, names = self.model, self.names
        n = len(names)
        model.train()
        outputs = {frozenset(range(n)): model(inputs).logits}
        model.eval()
        for size in range(n):  # every proper subset, the empty one too (computed, unused)
            for kept in combinations(range(n), size):
                padded = {m: x if i in kept else torch.zeros_like(x)
                          for i, (m, x) in enumerate(inputs.items())}
                outputs[frozenset(kept)] = model(padded).logits
        model.train()
        responses = []
        for m in range(n):
            others = [j for j in range(n) if j != m]
            response = 0
            for size in range(n):
                w = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                for kept in combinations(others, size):
                    kept = frozenset(kept)
                    lower = outputs[kept] if kept else 0  # f(empty) := 0
                    response = response + w * (outputs[kept | {m}] - lower)
            responses.append(response)
        return responses

    def step(self, inputs, labels) -> None:
        n = len(self.names)
        responses = self._responses(inputs)
        scores = [self._score(r.detach(), labels) for r in responses]
        self.n += 1
        factor, cap = n / (n - 1), 10 if n == 2 else 7
        mean_s, mean_t = sum(scores) / n, sum(self.t) / n
        coeffs = [math.exp(self.alpha * min(math.exp(factor * (mean_t - t))
                                            - math.exp(factor * (mean_s - s)), cap))
                  for s, t in zip(scores, self.t)]
        self.t = [t * (self.n - 1) / self.n + s / self.n for s, t in zip(scores, self.t)]
        for r, k in zip(responses, coeffs):
            r.register_hook(lambda g, k=k: g * k)
        loss = F.cross_entropy(sum(responses), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def cases(device: torch.device) -> list[Case]:
    out = []
    for n in (2, 3):
        model, optimizer, inputs, labels = _setting(device, n)
        shape = (f"AV ResNet-18 step (demo layout: spectrogram 1x32x32, frames 3x2x16x16"
                 f"{', a second spectrogram' if n == 3 else ''}), batch {BATCH}, M={n}, fp32")
        original = OriginalAGM(model, optimizer)
        out += [Case("agm_train_step", shape, JOINT,
                     lambda m=model, o=optimizer, x=inputs, y=labels: plain_step(m, o, x, y)),
                Case("agm_train_step", shape, ORIGINAL,
                     lambda a=original, x=inputs, y=labels: a.step(x, y))]
        for backend in fastbml_backends(device):
            agm = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head,
                              alpha=ALPHA, backend=backend)
            out.append(Case("agm_train_step", shape, fastbml_impl(backend),
                            lambda m=model, o=optimizer, x=inputs, y=labels, a=agm:
                            plain_step(m, o, x, y, a)))
    return out


def main(rounds: int = 10, threads: int = 1) -> None:
    """Medians with the implementations interleaved step by step (round r times each once), so
    that a slow spell of a shared machine hits them all alike."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_cases = cases(device)
    times = interleaved_medians(all_cases, device, rounds)
    name = device_name(device)
    lines = [f"# AGM training step on {name}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; median of {rounds} "
             "steps each, interleaved step by step. `original` is the authors' step "
             "(2^M - 1 padded forwards with autograd, per-sample Python score loop, hooks, "
             "one backward through all); `joint` is the plain step without AGM; AGM's cost is "
             "the step minus joint.", ""]
    for shape in dict.fromkeys(c.shape for c in all_cases):
        row = {impl: t for (s, impl), t in times.items() if s == shape}
        lines += [f"**{shape}**", "",
                  "| implementation | median ms | AGM's cost ms | step: original / this | "
                  "AGM's cost: original / this |", "|---|---:|---:|---:|---:|"]
        extra_orig = row[ORIGINAL] - row[JOINT]
        for impl, seconds in row.items():
            extra = seconds - row[JOINT]
            ratio = f"{extra_orig / extra:.1f}x" if impl != JOINT and extra > 0 else "-"
            lines.append(f"| {impl} | {seconds * 1e3:.1f} | {extra * 1e3:.1f} | "
                         f"{row[ORIGINAL] / seconds:.2f}x | {ratio} |")
        lines.append("")
    write_table(f"{name}-agm.md", "\n".join(lines))


if __name__ == "__main__":
    main()
