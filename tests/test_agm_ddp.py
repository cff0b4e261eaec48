"""AGM under torch.distributed (2 gloo CPU ranks): the ranks' score sums are all-reduced, so
every rank gets the coefficients and running scores of the global batch."""

import torch
from distributed_utils import run_ranks, values
from torch import nn

import fastbml
from fastbml.models.fusion import ConcatFusion

NAMES = ("audio", "visual", "text")


def agm_ranks(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    encoders = {m: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for m in NAMES}
    head = ConcatFusion(dict.fromkeys(NAMES, 4), 5)
    gen = torch.Generator().manual_seed(1)
    batch = 6 * world
    inputs = {m: torch.randn(batch, 3, generator=gen) for m in NAMES}
    logits = torch.randn(batch, 5, generator=gen)
    labels = torch.randint(0, 5, (batch,), generator=gen)
    shard = slice(rank * 6, (rank + 1) * 6)
    ranked = fastbml.AGM(encoders, head)                       # the default group
    alone = fastbml.AGM(encoders, head, process_group=None)    # the global batch, no collective
    out = {"ranked": [], "alone": []}
    for _ in range(3):
        for name, agm, x, z, y in (
                ("ranked", ranked, {m: v[shard] for m, v in inputs.items()}, logits[shard],
                 labels[shard]),
                ("alone", alone, inputs, logits, labels)):
            for enc in encoders.values():
                enc[0].weight.grad = torch.ones_like(enc[0].weight)
            k = agm.step(x, z, y, epoch=0)
            out[name].append((k.clone(), agm.running.clone(), encoders["text"][0].weight.grad[0, 0]))
    return out


def test_ranks_use_the_scores_of_the_global_batch():
    results = values(run_ranks(agm_ranks))
    for out in results:
        for (k, t, g), (k1, t1, g1) in zip(out["ranked"], out["alone"]):
            torch.testing.assert_close(k, k1)
            torch.testing.assert_close(t, t1)
            torch.testing.assert_close(g, g1)
        assert not torch.allclose(out["ranked"][0][0], torch.ones(3))
    for a, b in zip(results[0]["ranked"], results[1]["ranked"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
