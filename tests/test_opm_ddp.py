"""fastbml.OPM under DDP (gloo, 2 CPU processes): global-batch q, one shared coin, own masks per
rank, replicas that stay identical."""

import torch
import torch.nn.functional as F
from distributed_utils import run_ranks, values
from torch import nn

import fastbml

GLOBAL_BATCH, STEPS = 16, 10


class Net(nn.Module):
    """Two encoders, OPM as a submodule before the concat head (so model.eval() turns it off)."""

    def __init__(self):
        super().__init__()
        self.audio = nn.Linear(10, 8)
        self.visual = nn.Linear(6, 8)
        self.head = nn.Linear(16, 4)
        self.opm = fastbml.OPM(["audio", "visual"], p_exe=0.7)

    def unimodal(self, feats):
        u = fastbml.concat_unimodal_logits([feats["audio"], feats["visual"]],
                                           self.head.weight.detach(), self.head.bias.detach())
        return dict(zip(("audio", "visual"), u))

    def forward(self, a, v, y):
        feats = {"audio": self.audio(a), "visual": self.visual(v)}
        out, w = self.opm(feats, self.unimodal(feats), y, epoch=0)
        dropped = torch.stack([(out[m] == 0).all(dim=1) for m in ("audio", "visual")])
        return self.head(torch.cat([out["audio"], out["visual"]], dim=1)), w, dropped


def global_batch(step):
    g = torch.Generator().manual_seed(200 + step)
    return (torch.randn(GLOBAL_BATCH, 10, generator=g) * 2, torch.randn(GLOBAL_BATCH, 6, generator=g),
            torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))


def train_opm_ranks(rank, world):
    torch.manual_seed(0)
    model = Net()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = []
    for step in range(STEPS):
        a, v, y = (t.chunk(world)[rank] for t in global_batch(step))
        logits, w, dropped = ddp(a, v, y)
        opt.zero_grad()
        (F.cross_entropy(logits, y, reduction="none") * w).sum().backward()
        record.append((model.opm.last_q.clone(), bool(model.opm.last_executed), dropped))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], record, model.opm.seed


def test_ranks_share_q_and_coin_draw_their_own_masks_and_stay_identical():
    (params0, rec0, seed0), (params1, rec1, seed1) = values(run_ranks(train_opm_ranks))
    assert seed0 == seed1
    for p0, p1 in zip(params0, params1):
        assert torch.equal(p0, p1)
    differing = 0
    for (q0, ran0, drop0), (q1, ran1, drop1) in zip(rec0, rec1):
        assert torch.equal(q0, q1) and ran0 == ran1
        assert not drop0[q0 == 0].any() and not drop1[q1 == 0].any()  # only the dominant one
        differing += ran0 and not torch.equal(drop0, drop1)
    assert differing > 0
    # The first step's q is that of one process scoring the whole global batch.
    torch.manual_seed(0)
    model = Net()
    a, v, y = global_batch(0)
    u = model.unimodal({"audio": model.audio(a), "visual": model.visual(v)})
    scores = fastbml.modality_scores([u["audio"], u["visual"]], y)
    torch.testing.assert_close(rec0[0][0], fastbml.opm_drop_probs(scores, 0.5, 0.5))
