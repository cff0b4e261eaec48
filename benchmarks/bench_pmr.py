"""PMR benchmarks: the per-step prototype loss of two modalities, forward and backward.

Three implementations side by side, each computing both modalities' prototype scores, choosing
the weaker modality and back-propagating alpha * its prototypical cross-entropy into the
features (ResNet-18 width, 512):
- `original`: the authors' style (main_Prototype_grad.py): the B x C distance matrix built pair
  by pair in a Python double loop (a subtract, a dot, a sqrt and an indexed write each), the
  score a Python sum over the batch of a softmax per sample, and a Python `if` on the ratio;
- `torch`: the best plain PyTorch: `torch.cdist`, `cross_entropy`, the scores and the choice as
  device arithmetic, autograd through all of it;
- `fastbml[...]`: `fastbml.PMR.loss` (the fused prototype_cross_entropy op per modality, its
  analytic backward, no host sync).

    python -m benchmarks.bench_pmr       # writes benchmarks/results/<device>-pmr.md
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import fastbml

from .harness import ORIGINAL, PLAIN_TORCH, Case, fastbml_backends, fastbml_impl

ALPHA = 1.0
DIM = 512  # the pooled ResNet-18 feature


def _authors_distances(x, protos):
    d = torch.zeros(x.shape[0], protos.shape[0], device=x.device)
    for i in range(x.shape[0]):
        for j in range(protos.shape[0]):
            d[i, j] = torch.sqrt(torch.dot(x[i] - protos[j], x[i] - protos[j]))
    return d


def original_pmr_loss(f_a, f_v, p_a, p_v, labels):
    audio_sim, visual_sim = -_authors_distances(f_a, p_a), -_authors_distances(f_v, p_v)
    score_a = sum([torch.softmax(audio_sim, 1)[i][labels[i]] for i in range(labels.shape[0])])
    score_v = sum([torch.softmax(visual_sim, 1)[i][labels[i]] for i in range(labels.shape[0])])
    ratio = score_a / score_v
    if ratio > 1:  # a host sync
        beta, lam = 0.0, ALPHA
    elif ratio < 1:
        beta, lam = ALPHA, 0.0
    else:
        beta = lam = 0.0
    return beta * F.cross_entropy(audio_sim, labels) + lam * F.cross_entropy(visual_sim, labels)


def plain_pmr_loss(f_a, f_v, p_a, p_v, labels):
    sims = [-torch.cdist(f, p) for f, p in ((f_a, p_a), (f_v, p_v))]
    losses = torch.stack([F.cross_entropy(s, labels) for s in sims])
    scores = torch.stack([torch.softmax(s.detach(), 1).gather(1, labels[:, None]).sum()
                          for s in sims])
    weights = (scores < scores.flip(0)).float()
    return ALPHA * (weights * losses).sum()


def cases(device: torch.device) -> list[Case]:
    out: list[Case] = []
    g = torch.Generator(device="cpu").manual_seed(5)
    batch = 64
    for n_classes in (31, 309):  # Kinetics-Sounds, VGGSound
        centres = [torch.randn(n_classes, DIM, generator=g) for _ in range(2)]
        labels = torch.randint(0, n_classes, (batch,), generator=g)
        feats = [(c[labels] + torch.randn(batch, DIM, generator=g)).to(device).requires_grad_()
                 for c in centres]
        protos = [(c + 0.1 * torch.randn(n_classes, DIM, generator=g)).to(device)
                  for c in centres]
        labels = labels.to(device)
        shape = f"B={batch}, C={n_classes}, d={DIM}, M=2, fp32"

        def clear(fs=feats):
            for f in fs:
                f.grad = None

        def run(loss_fn, fs=feats, ps=protos, y=labels):
            return lambda: loss_fn(*fs, *ps, y).backward()

        out.append(Case("pmr_loss_fwd_bwd", shape, ORIGINAL, run(original_pmr_loss),
                        setup=clear, single_shot=n_classes > 100))  # ~10 s a call at C=309
        out.append(Case("pmr_loss_fwd_bwd", shape, PLAIN_TORCH, run(plain_pmr_loss),
                        setup=clear))
        for backend in fastbml_backends(device):
            pmr = fastbml.PMR(["audio", "visual"], n_classes, alpha=ALPHA, backend=backend)
            pmr.collect(protos, torch.arange(n_classes, device=device))  # prototypes = protos
            pmr.update_prototypes(0)
            out.append(Case("pmr_loss_fwd_bwd", shape, fastbml_impl(backend),
                            run(lambda f_a, f_v, p_a, p_v, y, pmr=pmr: pmr.loss([f_a, f_v], y, 0)),
                            setup=clear))
    return out


def main() -> None:
    from .report import markdown, run, write_table

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tables = []
    # on a CPU also with one thread: plain PyTorch's multi-threaded kernels stall on a busy
    # machine, fastbml's stay on the calling thread at these sizes
    for threads in (torch.get_num_threads(), 1) if device.type == "cpu" else (None,):
        if threads is not None:
            torch.set_num_threads(threads)
        result = run(device, "bench_pmr", args.repeats)
        tables.append(markdown(result))
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    write_table(f"{result['device']}-pmr.md",
                "\n".join(tables) + f"\nLoad average at the end (1 / 5 / 15 min): {load}.\n"
                "\nCommand: `python -m benchmarks.bench_pmr`\n")


if __name__ == "__main__":
    main()
