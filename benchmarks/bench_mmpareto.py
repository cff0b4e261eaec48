"""MMPareto's step: the authors' loop against `fastbml.MMPareto` on a small audio-visual model.

Both compute, from one forward pass, the gradients the optimizer receives (optimizer.step is
the same for both and not timed):
- `original`: the authors' training loop (MMPareto_ICML2024 code/MMPareto.py), kept as it is
  apart from its loss logging: M + 2 = 4 backward passes with a zero_grad and a clone of every
  encoder gradient after each, the cosine as a Python branch on a device value, the solver's
  per-tensor dot products read back one by one, and per tensor a norm, a Python branch on the
  norm ratio and a new gradient tensor;
- `fastbml[...]`: `MMPareto.backward`, 2 backward passes, two multi-tensor ops and no host sync.

The model: two narrow ResNet-18 trunks (60 parameter tensors each, as many as ResNet-18's) on a
spectrogram and on RGB frames, a fused head and uni-modal heads, at three sizes from
compute-bound (widths 8 to 64, batch 16) to overhead-bound (widths 4 to 32, batch 4, 16x16
inputs); the plain multitask step (one backward pass) is timed alongside for scale.

    python -m benchmarks.bench_mmpareto     # written to benchmarks/results/<device>-mmpareto.md
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

import fastbml
from fastbml.models.resnet import BasicBlock

from .harness import ORIGINAL, Case, fastbml_backends, fastbml_impl, interleaved_medians
from .report import device_name, write_table
from .resnet_shapes import audio_visual_conv_grads

BATCH, CLASSES = 16, 6


class NarrowTrunk(nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 BasicBlocks) at widths 8, 16, 32, 64; pooled."""

    def __init__(self, in_channels: int, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, planes_in = [], width
        for i in range(4):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(planes_in, planes, stride),
                                        BasicBlock(planes, planes)))
            planes_in = planes
        self.layers = nn.Sequential(*stages)
        self.out_dim = planes_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3))


class AudioVisual(nn.Module):
    """The authors' AVClassifier layout: audio_net, visual_net, a fused `head` and the
    uni-modal heads `head_audio`, `head_video` (the names their parameter matching relies on)."""

    def __init__(self, classes: int = CLASSES, width: int = 8):
        super().__init__()
        self.audio_net = NarrowTrunk(1, width)
        self.visual_net = NarrowTrunk(3, width)
        d = self.audio_net.out_dim
        self.head = nn.Linear(2 * d, classes)
        self.head_audio = nn.Linear(d, classes)
        self.head_video = nn.Linear(d, classes)

    def forward(self, spec: torch.Tensor, frames: torch.Tensor):
        f_a = self.audio_net(spec)
        b, c, t, h, w = frames.shape
        f_v = self.visual_net(frames.transpose(1, 2).reshape(b * t, c, h, w))
        f_v = f_v.view(b, t, -1).mean(dim=1)
        return self.head(torch.cat([f_a, f_v], dim=1)), self.head_audio(f_a), self.head_video(f_v)


def _authors_min_norm_weights(vecs: list[list[torch.Tensor]]) -> list[float]:
    """The authors' MinNormSolver.find_min_norm_element for two tasks: per-tensor dot
    products, each read back to the host, then the closed form (_min_norm_element_from2)."""
    dps = {}
    for i, j in ((0, 1), (0, 0), (1, 1)):
        dps[(i, j)] = 0.0
        for k in range(len(vecs[i])):
            dps[(i, j)] += torch.mul(vecs[i][k], vecs[j][k]).sum().data.cpu()
    v1v1, v1v2, v2v2 = dps[(0, 0)], dps[(0, 1)], dps[(1, 1)]
    if v1v2 >= v1v1:
        gamma = 0.999
    elif v1v2 >= v2v2:
        gamma = 0.001
    else:
        gamma = float(-1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2)))
    return [gamma, 1 - gamma]


def recorded_parameters(model: nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The authors' recorded tensors per task: names without 'head' containing the modality."""
    records: dict[str, list[tuple[str, torch.Tensor]]] = {"audio": [], "visual": []}
    for name, param in model.named_parameters():
        if "head" in name:
            continue
        for modality in records:
            if modality in name:
                records[modality].append((name, param))
                break
    return records


def authors_step(model: nn.Module, optimizer: torch.optim.Optimizer, spec: torch.Tensor,
                 frames: torch.Tensor, label: torch.Tensor, records: dict,
                 gamma: float = 1.5) -> torch.Tensor:
    """One step of the authors' loop up to optimizer.step(); returns the total loss."""
    criterion = nn.CrossEntropyLoss()
    optimizer.zero_grad()
    out, out_a, out_v = model(spec, frames)
    losses = {"both": criterion(out, label), "audio": criterion(out_a, label),
              "visual": criterion(out_v, label)}
    grads: dict[str, dict[str, dict[str, torch.Tensor]]] = {"audio": {}, "visual": {}}
    for loss_type, loss in losses.items():
        loss.backward(retain_graph=True)
        for modality in ("audio", "visual"):
            if loss_type not in ("both", modality):
                continue
            saved = grads[modality][loss_type] = {}
            for name, param in records[modality]:
                saved[name] = param.grad.data.clone()
            saved["concat"] = torch.cat([saved[name].flatten() for name, _ in records[modality]])
        optimizer.zero_grad()
    total = losses["both"] + losses["audio"] + losses["visual"]
    k = authors_weights(grads)
    total.backward()
    authors_rewrite(model.named_parameters(), grads, k, gamma)
    return total


def authors_weights(grads: dict) -> dict[str, list[float]]:
    """The authors' weights per modality: a Python branch on the cosine, else the solver."""
    k = {}
    for modality in ("audio", "visual"):
        both, own = grads[modality]["both"], grads[modality][modality]
        cos = F.cosine_similarity(both["concat"], own["concat"], dim=0)
        if cos > 0:  # a host sync
            k[modality] = [0.5, 0.5]
        else:
            k[modality] = _authors_min_norm_weights([list(both.values()), list(own.values())])
    return k


def authors_rewrite(named_parameters, grads: dict, k: dict, gamma: float = 1.5) -> None:
    """The authors' per-tensor rewrite of the encoder gradients (`.grad` holds the total's)."""
    for name, param in named_parameters:
        if param.grad is None:
            continue
        layer = re.split("[_.]", str(name))
        if "head" in layer:
            continue
        for modality in ("audio", "visual"):
            if modality not in layer:
                continue
            three_norm = torch.norm(param.grad.data.clone())
            new_grad = (2 * k[modality][0] * grads[modality]["both"][name]
                        + 2 * k[modality][1] * grads[modality][modality][name])
            diff = three_norm / torch.norm(new_grad)
            if diff > 1:  # a host sync per tensor
                param.grad = diff * new_grad * gamma
            else:
                param.grad = new_grad * gamma


def fastbml_step(model: AudioVisual, optimizer: torch.optim.Optimizer, mmpareto: fastbml.MMPareto,
                 spec: torch.Tensor, frames: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The same step through fastbml.MMPareto (two backward passes, no host sync)."""
    optimizer.zero_grad()
    out, out_a, out_v = model(spec, frames)
    loss_mm = F.cross_entropy(out, label)
    unimodal = {"audio": F.cross_entropy(out_a, label), "visual": F.cross_entropy(out_v, label)}
    mmpareto.backward(loss_mm, unimodal)
    return loss_mm


def joint_step(model: AudioVisual, optimizer: torch.optim.Optimizer, spec: torch.Tensor,
               frames: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The plain multitask step (one backward of L_mm + L_a + L_v, no MMPareto): the floor."""
    optimizer.zero_grad()
    out, out_a, out_v = model(spec, frames)
    total = (F.cross_entropy(out, label) + F.cross_entropy(out_a, label)
             + F.cross_entropy(out_v, label))
    total.backward()
    return total


# (width, batch, spectrogram side, frames, frame side): compute-bound to overhead-bound
SIZES = ((8, 16, 64, 2, 48), (4, 8, 32, 1, 24), (4, 4, 16, 1, 16))


def make_batch(device: torch.device, batch: int = BATCH, spec_side: int = 64,
               n_frames: int = 2, frame_side: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    spec = torch.randn(batch, 1, spec_side, spec_side, generator=g)
    frames = torch.randn(batch, 3, n_frames, frame_side, frame_side, generator=g)
    label = torch.randint(0, CLASSES, (batch,), generator=g)
    return spec.to(device), frames.to(device), label.to(device)


JOINT = "plain multitask step (1 backward, no MMPareto)"


def cases(device: torch.device) -> list[Case]:
    out = []
    for width, batch, spec_side, n_frames, frame_side in SIZES:
        torch.manual_seed(0)
        model = AudioVisual(width=width).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # never stepped
        data = make_batch(device, batch, spec_side, n_frames, frame_side)
        records = recorded_parameters(model)
        shape = (f"narrow AV ResNet-18 (widths {width}-{8 * width}, 2x60 tensors), batch "
                 f"{batch}, spectrogram {spec_side}^2, {n_frames} frame(s) {frame_side}^2, fp32")
        out.append(Case("mmpareto_step", shape, ORIGINAL,
                        lambda m=model, o=optimizer, d=data, r=records: authors_step(m, o, *d, r)))
        for backend in ["torch", *fastbml_backends(device)]:
            helper = fastbml.MMPareto({"audio": model.audio_net, "visual": model.visual_net},
                                      backend=backend)
            out.append(Case("mmpareto_step", shape, fastbml_impl(backend),
                            lambda m=model, o=optimizer, h=helper, d=data:
                            fastbml_step(m, o, h, *d)))
        out.append(Case("mmpareto_step", shape, JOINT,
                        lambda m=model, o=optimizer, d=data: joint_step(m, o, *d)))
    return out + combination_cases(device)


def combination_cases(device: torch.device) -> list[Case]:
    """The combination alone, after the gradients are captured, on stand-ins for the conv
    gradients of two ResNet-18 encoders (one modality conflicting, the other not): the
    authors' weights and per-tensor rewrite against `mmpareto_combine_`."""
    g_mm = [list(group) for group in audio_visual_conv_grads(device)]
    gen = torch.Generator().manual_seed(1)
    noise = [[torch.randn(g.shape, generator=gen).to(device) * 1e-3 for g in group]
             for group in g_mm]
    # audio: g_uni mostly against g_mm (the conflict branch); visual: along it (the plain sum)
    g_uni = [[-0.5 * g + n for g, n in zip(g_mm[0], noise[0])],
             [0.5 * g + n for g, n in zip(g_mm[1], noise[1])]]
    names = [[f"{m}_net.conv{i}.weight" for i in range(len(g))]
             for m, g in zip(("audio", "visual"), g_mm)]
    params = [[nn.Parameter(torch.empty_like(g)) for g in group] for group in g_mm]
    totals = [[a + b for a, b in zip(x, y)] for x, y in zip(g_mm, g_uni)]
    grads = {}
    for m, modality in enumerate(("audio", "visual")):
        grads[modality] = {
            key: {**dict(zip(names[m], g[m])), "concat": torch.cat([t.flatten() for t in g[m]])}
            for key, g in (("both", g_mm), (modality, g_uni))}
    named = [(n, p) for group_n, group_p in zip(names, params) for n, p in zip(group_n, group_p)]

    def restore():
        for group_p, group_t in zip(params, totals):
            for p, t in zip(group_p, group_t):
                p.grad = t.clone()

    n_elements = sum(g.numel() for group in g_mm for g in group)
    shape = f"2x ResNet-18 conv grads: {len(named)} tensors, {n_elements / 1e6:.1f}M fp32"
    out = [Case("mmpareto_combination", shape, ORIGINAL,
                lambda: authors_rewrite(named, grads, authors_weights(grads)), setup=restore)]
    for backend in ["torch", *fastbml_backends(device)]:
        out.append(Case("mmpareto_combination", shape, fastbml_impl(backend),
                        lambda b=backend: fastbml.mmpareto_combine_(
                            [[p.grad for p in group] for group in params], g_uni, backend=b),
                        setup=restore))
    return out


def main(rounds: int = 21) -> None:
    """Medians with the implementations interleaved call by call (two warm-up rounds)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_cases = cases(device)
    times = interleaved_medians(all_cases, device, rounds)
    name = device_name(device)
    lines = [f"# MMPareto step on {name}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); from the forward "
             "pass to the gradients the optimizer receives (optimizer.step excluded); median of "
             f"{rounds} steps per row, all rows interleaved step by step. The authors' loop "
             "takes 4 backward passes (3 through each encoder), fastbml 2; the last row of each "
             "step table is plain multitask training, one backward pass, for scale. The last "
             "table times the combination alone, once the per-loss gradients are captured "
             "(`fastbml[torch]` is the float64 reference path).", ""]
    for shape in dict.fromkeys(c.shape for c in all_cases):
        row = {impl: t for (sh, impl), t in times.items() if sh == shape}
        lines += [f"## {shape}", "", "| implementation | median ms | × vs original |",
                  "|---|---:|---:|"]
        for impl, seconds in row.items():
            lines.append(f"| {impl} | {seconds * 1e3:.2f} | {row[ORIGINAL] / seconds:.2f} |")
        lines.append("")
    write_table(f"{name}-mmpareto.md", "\n".join(lines))


if __name__ == "__main__":
    main()
