"""The training loop behind `fastbml train`: one run of one method on one dataset.

Per epoch: train (OPM in the forward, PMR's loss added to it, MMPareto as the backward pass,
OGM after it), PMR's prototypes, evaluate on val, D&R after the evaluation (as the D&R code
does), log, checkpoint. The best-val epoch's model is evaluated on test once at the end: model
selection never looks at test. Every epoch's shuffle is seeded by (seed, epoch) and the
checkpoint carries model, optimiser, scheduler, AMP scaler, method state and the global RNG,
so a resumed run continues exactly as an uninterrupted one (bit-identical on CPU).

Under DDP (`torchrun ... -m fastbml train`, or any initialised process group of 2+ ranks) the
model runs inside DistributedDataParallel, every rank trains on its shard of each epoch's
permutation (`cfg.batch_size` per rank: the global batch is world x batch_size), evaluation is
sharded and gathered so the metrics are those of the whole split, and rank 0 alone writes logs,
plots and checkpoints. Checkpoints hold no world-size-dependent state: a run resumes on any
number of ranks. With one process none of this runs (no wrapper, no collective).

With `cfg.fsdp` (`--fsdp`) the model is sharded with FSDP2 instead (`shard_model`), on one
process too, and checkpoints are DCP directories every rank writes its shards into
(docs/design.md#distributed-training); DCP re-shards them for any number of ranks.
"""

from __future__ import annotations

import fcntl
import json
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)

from .. import distributed, rng
from ..data import FileDataset, Splits, TensorDataset, load_dataset
from ..data.batch import SeededSampler, default_workers, prepare_batch
from ..data.encoded import collate
from ..models import build_model
from . import checkpoint as ckpt
from .config import AMP_DTYPES, TrainConfig, config_dict
from .logger import RunLogger, plot_history
from .methods import MethodStack, compiled, needs_unimodal_heads
from .metrics import classification_metrics
from .parallel import ShardSampler, gather_rows, resolve_device, setup_distributed, shard_model

CHECKPOINT = "checkpoint_last.pt"
# --on-nonfinite stop: the losses are checked every this many steps and at the end of each epoch
NONFINITE_CHECK_STEPS = 50
PREVIOUS = "checkpoint_prev.pt"   # the checkpoint_last.pt before the latest one
BEST = "checkpoint_best.pt"
BEST_PREVIOUS = "checkpoint_best_prev.pt"  # the best before the latest (what PREVIOUS refers to)
LOCK = ".fastbml.lock"            # held (flock) by the run that owns the directory
# Settings a --resume may change (documented in the README): the rest must match the checkpoint.
RESUME_MAY_CHANGE = ("epochs", "out", "data_root", "workers", "threads", "device",
                     "dist_backend", "progress", "tensorboard", "plots", "compile",
                     "compile_mode", "compile_backend", "fsdp_shard_size")


# Settings that may differ between ranks (paths, local resources); everything else must agree.
_RANK_LOCAL = ("out", "data_root", "device", "threads", "workers", "prefetch", "progress")


class _TrainForward(nn.Module):
    """The training forward (encoders, OPM, fusion head, the uni-modal heads MMPareto trains) as
    one module, for DDP to wrap: its only submodule is the model, so DDP sees (and all-reduces)
    exactly the model's gradients."""

    def __init__(self, model: nn.Module, methods: MethodStack):
        super().__init__()
        self.model = model
        self.methods = methods  # not a Module: OPM's state stays out of DDP's view

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, epoch: int):
        """(fused logits, uni-modal logits, per-sample loss weights or None, the methods' extra
        loss or None)."""
        model = self.model
        features = model.encode(inputs)
        unimodal = model.head.unimodal_logits(features)
        fused_in, weights = self.methods.features(features, unimodal, labels, epoch)
        extra = self.methods.extra_loss(features, labels, epoch)
        return (model.head(fused_in), unimodal, weights, extra,
                model.unimodal_head_logits(features))


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (`--on-nonfinite stop`)."""


def _on_rank0(fn, distributed_run: bool, device: torch.device):
    """fn() on rank 0, its result (or its ValueError / FileNotFoundError) on every rank."""
    result: object = None
    if not distributed_run or dist.get_rank() == 0:
        try:
            result = ("ok", fn())
        except (ValueError, FileNotFoundError) as exc:
            result = (type(exc), str(exc))
    if distributed_run:
        box = [result]
        dist.broadcast_object_list(box, src=0, device=device)
        result = box[0]
    kind, value = result
    if kind != "ok":
        raise (kind if kind is FileNotFoundError else ValueError)(value)
    return value


def _config_differences(saved: dict, current: dict) -> list[str]:
    """The settings (outside RESUME_MAY_CHANGE) in which `current` differs from `saved`;
    method names compare as sets of parts ("ogm-ge+opm" is "opm+ogm-ge")."""
    defaults = config_dict(TrainConfig())
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_MAY_CHANGE:
            continue
        old, new = saved.get(key, defaults.get(key)), current.get(key, defaults.get(key))
        if key == "method":
            from .methods import parse_method

            try:
                same = parse_method(old) == parse_method(new)
            except ValueError:
                same = old == new
        else:
            same = old == new
        if not same:
            out.append(f"{key}: {old!r} in the checkpoint, {new!r} now")
    return out


def _versions() -> dict[str, str]:
    """Library versions that change results: scikit-learn's KMeans defaults changed in 1.4
    (docs/methods.md#diagnosis), so a D&R run records them."""
    import sklearn

    from .. import __version__

    return {"fastbml": __version__, "torch": torch.__version__, "scikit-learn": sklearn.__version__}


def _build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    return None


class Trainer:
    """One run: `Trainer(cfg).fit()` trains, logs into cfg.out and returns the summary dict.

    `splits` may be given directly (otherwise cfg.dataset is loaded); `resume=True` continues
    from cfg.out/checkpoint_last.pt.

    Under torchrun the Trainer joins the process group itself (`setup_distributed`; the caller
    may destroy it afterwards), or uses one the caller initialised; with `cfg.fsdp` and no
    launch it creates a group of its one process (`created_group` says so). With 2+ ranks (and
    under FSDP), `fit`, `evaluate`, `full_state_dict` and the constructor are collectives: every
    rank calls them, and every rank gets the same metrics and summary (rank 0 alone writes
    files).
    """

    def __init__(self, cfg: TrainConfig, splits: Splits | None = None, *, resume: bool = False):
        self.cfg = cfg
        self.created_group = setup_distributed(cfg.device, cfg.dist_backend,
                                               single_process=cfg.fsdp)
        ranked = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if ranked else 0
        self.world = dist.get_world_size() if ranked else 1
        self.distributed = self.world > 1
        self.fsdp = cfg.fsdp  # FSDP2 on the group's ranks (one process: a group of one)
        self._digests: dict[str, str] = {}  # SHA-256 of sharded checkpoint files, by path
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg.device)
        if self.distributed:
            backend = dist.get_backend()
            if backend == "nccl" and self.device.type != "cuda":
                raise ValueError(f"the process group uses nccl but this rank trains on "
                                 f"{self.device}; use --dist-backend gloo for CPU training")
            shared = {k: v for k, v in config_dict(cfg).items() if k not in _RANK_LOCAL}
            distributed.check_same_on_all_ranks(shared, dist.group.WORLD, "fastbml train")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.splits = splits or load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed,
                                             options=cfg.dataset_options)
        info = self.splits.info
        self.modalities = list(info.modalities if cfg.modalities is None else cfg.modalities)
        unknown = sorted(set(self.modalities) - set(info.modalities))
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {list(info.modalities)}, "
                             f"got {cfg.modalities!r}")
        inputs = {m: info.inputs[m] for m in self.modalities}
        self.model = build_model(inputs, info.num_classes, fusion=cfg.fusion,
                                 init=cfg.init, hidden=cfg.hidden, feature_dim=cfg.feature_dim,
                                 unimodal_heads=needs_unimodal_heads(cfg.method)
                                 ).to(self.device)
        if self.fsdp:  # before the helpers and the optimiser take the (now sharded) parameters
            shard_model(self.model, self.device, cfg.fsdp_mixed_precision, cfg.fsdp_shard_size)
        self.methods = MethodStack(cfg, self.model, info.num_classes, self.device)
        self.optimizer = _build_optimizer(cfg, self.model.parameters())
        self.scheduler = _build_scheduler(cfg, self.optimizer)
        self.amp_dtype = AMP_DTYPES.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.run_dir = Path(cfg.out)
        self._lock = None
        _on_rank0(self._take_directory, self.distributed, self.device)
        if self.fsdp and self.distributed:
            self._share_directory()
        self.loader_gen = torch.Generator()
        self.train_sampler: ShardSampler | None = None
        self.augment_seeds: SeededSampler | None = None
        self.workers = default_workers() if cfg.workers is None else cfg.workers
        self.train_loader = self._loader(self.splits.train, shuffle=True)
        self.eval_loaders: dict[int, tuple[Dataset, DataLoader]] = {}  # built once per split
        self.start_epoch, self.best, self.seconds = 0, None, 0.0
        self._loss_check = torch.zeros((), device=self.device)
        self.skipped_steps = 0
        history = None
        try:
            if resume:
                history = self._load_checkpoint()
            if self.is_main:  # on resume: the settings that may have changed (--epochs, ...)
                (self.run_dir / "config.json").write_text(json.dumps(config_dict(cfg), indent=1))
        except BaseException:
            self._release_directory()
            raise
        # The training forward; wrapped in DDP (which broadcasts rank 0's state) only when
        # there is more than one rank and no FSDP, so a single process runs exactly the plain
        # module.
        forward = _TrainForward(self.model, self.methods)
        self.ddp: DistributedDataParallel | None = None
        if self.distributed and not self.fsdp:
            self.ddp = DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._forward = forward.forward if self.ddp is None else self.ddp
        # --compile: one graph for the forward (DDP splits its graph at its gradient buckets,
        # FSDP2's hooks at each sharded module)
        self._forward = compiled(cfg, self._forward, fullgraph=self.ddp is None and not self.fsdp)
        self.logger = RunLogger(self.run_dir, history, tensorboard=cfg.tensorboard,
                                write=self.is_main)

    # ---------------------------------------------------------------- run directory
    def _take_directory(self) -> None:
        """Create cfg.out and hold its lock (rank 0): a second run on it is refused at once."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.run_dir / LOCK, "a")  # noqa: SIM115 - held for the whole run
        except OSError as exc:
            raise ValueError(f"--out {self.run_dir}: cannot create the run directory "
                             f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ValueError(f"--out {self.run_dir} is in use by another fastbml run (it "
                             f"holds {self.run_dir / LOCK}); wait for it to end or choose "
                             "another --out") from None
        self._lock = lock

    def _share_directory(self) -> None:
        """Under FSDP every rank writes its shards into rank 0's run directory: take its path,
        and check that every rank sees it (a file system the ranks share)."""
        box = [str(self.run_dir.resolve())]
        dist.broadcast_object_list(box, src=0, device=self.device)
        self.run_dir = Path(box[0])
        unseen = torch.tensor([0 if (self.run_dir / LOCK).is_file() else 1], device=self.device)
        dist.all_reduce(unseen)
        if unseen:
            raise ValueError(f"--fsdp: {int(unseen)} rank(s) cannot see rank 0's --out "
                             f"{self.run_dir}: the sharded checkpoints are written there by every "
                             "rank, so it must be on a file system all ranks share")

    def _release_directory(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def close(self) -> None:
        """Release the run directory (`fit` does when it returns or fails)."""
        self._release_directory()
        self.logger.close()

    def __del__(self):
        self._release_directory()

    # ---------------------------------------------------------------- data
    def _loader(self, dataset: Dataset, *, shuffle: bool) -> DataLoader:
        """Batches of `dataset` (this rank's share under DDP: the epoch's shuffled shard when
        training, rows rank, rank + W, ... when evaluating); in-memory datasets are indexed a
        whole batch at a time, file datasets through persistent workers (`self.workers`)."""
        cfg = self.cfg
        cuda = self.device.type == "cuda"
        drop_last = shuffle and cfg.drop_last
        sampler = None
        if self.distributed and shuffle:
            sampler = self.train_sampler = ShardSampler(
                dataset, num_replicas=self.world, rank=self.rank, seed=cfg.seed)
        elif self.distributed:
            # rows rank, rank + W, ..., padded with row 0 to the same count on every rank: the
            # ranks run the same number of forwards (FSDP's all-gathers are collectives)
            shard = list(range(self.rank, len(dataset), self.world))
            shard += [0] * (-(-len(dataset) // self.world) - len(shard))
            sampler = shard
            if not isinstance(dataset, (TensorDataset, FileDataset)):
                dataset, sampler = Subset(dataset, shard), None
        if isinstance(dataset, TensorDataset):
            if sampler is None:
                sampler = (RandomSampler(dataset, generator=self.loader_gen) if shuffle
                           else SequentialSampler(dataset))
            return DataLoader(dataset, sampler=BatchSampler(sampler, cfg.batch_size, drop_last),
                              batch_size=None, pin_memory=cuda)
        if sampler is None:
            sampler = (RandomSampler(dataset, generator=self.loader_gen) if shuffle
                       else SequentialSampler(dataset))
        if isinstance(dataset, FileDataset):
            # each read's augmentation is drawn from (seed, epoch, index): the worker count,
            # persistent workers and a resume leave what is read unchanged
            sampler = SeededSampler(sampler, rng.step_seed(cfg.seed, 1))
            if shuffle:
                self.augment_seeds = sampler
        workers = self.workers
        # the loader's generator only draws the workers' base seed (not torch's global RNG)
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                          drop_last=drop_last, num_workers=workers, pin_memory=cuda,
                          collate_fn=collate if isinstance(dataset, FileDataset) else None,
                          persistent_workers=workers > 0,
                          prefetch_factor=cfg.prefetch if workers > 0 else None,
                          generator=torch.Generator().manual_seed(cfg.seed))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """The evaluation loader of `dataset`, built on first use and kept (with its workers)."""
        if id(dataset) not in self.eval_loaders:
            self.eval_loaders[id(dataset)] = (dataset, self._loader(dataset, shuffle=False))
        return self.eval_loaders[id(dataset)][1]

    def _inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch on the device; uint8 frames normalised there, in the AMP dtype."""
        return prepare_batch(inputs, self.splits.info, self.device, self.amp_dtype,
                             self.modalities)

    # ---------------------------------------------------------------- train / eval
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        self.methods.train(True)
        self._seed_train_order(epoch)
        loss_sum = torch.zeros((), device=self.device)
        self._loss_check.zero_()
        skipped_before = self.skipped_steps
        n_seen = 0
        batches = self.train_loader
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        for step, (inputs, labels) in enumerate(batches, start=1):
            labels = labels.to(self.device, non_blocking=True)
            loss = self.train_step(self._inputs(inputs), labels, epoch)
            if loss is not None:  # None: a skipped step (--on-nonfinite skip)
                loss_sum += loss * labels.shape[0]
                n_seen += labels.shape[0]
            if step % NONFINITE_CHECK_STEPS == 0 and self.cfg.on_nonfinite == "stop":
                self._stop_if_diverged(epoch)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.distributed:
            # one collective: the loss over every rank's samples
            totals = torch.stack([loss_sum.double(), torch.tensor(float(n_seen), dtype=torch.float64,
                                                                  device=self.device),
                                  self._loss_check.double()])
            dist.all_reduce(totals)
            loss_sum, n_seen = totals[0], int(totals[1])
            self._loss_check.copy_(totals[2])
            # DDP broadcasts buffers (BatchNorm statistics) from rank 0 before each forward, so
            # after the last step they differ: take rank 0's for evaluation and the checkpoint.
            buffers = list(self.model.buffers())
            if buffers:
                distributed.broadcast_(buffers, dist.group.WORLD)
        if not torch.isfinite(self._loss_check):  # NaN / inf in any step's loss propagates here
            self._diverged(epoch)
        logs = {"train_loss": float(loss_sum) / max(n_seen, 1), **self.methods.epoch_logs()}
        if self.cfg.on_nonfinite == "skip":
            logs["skipped_steps"] = self.skipped_steps - skipped_before
        return logs

    def _seed_train_order(self, epoch: int) -> None:
        """The training loader's shuffle (and file datasets' augmentation) of `epoch`, from
        (seed, epoch) alone."""
        seed = self.cfg.seed
        self.loader_gen.manual_seed(rng.step_seed(seed, epoch))
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)
            # a different stream on every rank (file datasets' augmentation: SeededSampler)
            self.loader_gen.manual_seed(rng.step_seed(rng.step_seed(seed, epoch), self.rank))
        if self.augment_seeds is not None:
            self.augment_seeds.seed = rng.step_seed(rng.step_seed(seed, epoch), 1)

    @torch.no_grad()
    def _prototype_batches(self, epoch: int):
        """PMR's prototype subset (docs/methods.md#pmr): the first max(1, N_b // 10) training
        batches in the order of `epoch`, with the training transforms, through the encoders in
        eval mode, as (features, labels); this rank's shard under DDP."""
        self._seed_train_order(epoch)
        self.model.eval()
        count = max(1, len(self.train_loader) // 10)
        for _, (inputs, labels) in zip(range(count), self.train_loader):
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                features = self.model.encode(self._inputs(inputs))
            yield features, labels.to(self.device)

    def _stop_if_diverged(self, epoch: int) -> None:
        """Mid-epoch divergence check: one host read (and under DDP one all_reduce of a scalar,
        so that every rank stops together) per NONFINITE_CHECK_STEPS steps."""
        total = self._loss_check.clone()
        if self.distributed:
            dist.all_reduce(total)
        if not torch.isfinite(total):
            self._diverged(epoch)

    def _diverged(self, epoch: int) -> None:
        kept = (f"{self.run_dir / CHECKPOINT} holds the last good epoch ({epoch - 1})"
                if epoch > 0 else "no checkpoint was written")
        raise NonFiniteLossError(
            f"the training loss became non-finite in epoch {epoch}: the run diverged; {kept}. "
            "Lower --lr, or pass --on-nonfinite skip to skip such steps")

    def train_step(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                   epoch: int) -> torch.Tensor | None:
        """One optimisation step on a batch already on the device; returns the detached loss
        (None for a step skipped because the loss is non-finite, `--on-nonfinite skip`)."""
        model = self.model
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits, unimodal, weights, extra, head_logits = self._forward(inputs, labels, epoch)
        per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
        loss = per_sample.mean() if weights is None else (per_sample * weights).sum()
        aux = model.head.auxiliary_loss({m: u.float() for m, u in unimodal.items()}, labels)
        total = sum((t for t in (aux, extra) if t is not None), loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.on_nonfinite == "skip":
            bad = (~torch.isfinite(total.detach())).to(torch.int32)
            if self.distributed:  # every rank skips the same steps
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad:  # a host sync per step: the price of deciding exactly
                self.skipped_steps += 1
                return None
        else:  # no sync: checked once per epoch (NaN / inf propagate through the sum)
            self._loss_check += total.detach()
        self.methods.backward(total, head_logits, labels, epoch, self.scaler)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.methods.after_backward(unimodal, labels, epoch, inputs=inputs, logits=logits)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def _outputs(self, dataset: Dataset, *, gather: bool = True):
        """Fused logits, labels, uni-modal logits and pooled features over a split (eval mode).

        Under DDP and FSDP each rank runs rows rank, rank + W, ... of the split (and padding,
        dropped here); with `gather` the logits and labels of all ranks are gathered back into
        split order (the features, for D&R, always stay this rank's shard).
        """
        self.model.eval()
        logits, labels = [], []
        unimodal = {m: [] for m in self.modalities}
        features = {m: [] for m in self.modalities}
        for inputs, y in self._eval_loader(dataset):
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = self.model(self._inputs(inputs))
            logits.append(out.logits.float())
            labels.append(y.to(self.device))
            for m in self.modalities:
                unimodal[m].append(out.unimodal[m].float())
                features[m].append(out.features[m].float())
        if not labels:  # an empty shard (fewer rows than ranks)
            c = self.splits.info.num_classes
            logits.append(torch.zeros(0, c, device=self.device))
            labels.append(torch.zeros(0, dtype=torch.long, device=self.device))
            for m in self.modalities:
                unimodal[m].append(torch.zeros(0, c, device=self.device))
                features[m].append(torch.zeros(0, self.model.encoders[m].out_dim,
                                               device=self.device))
        keep = len(range(self.rank, len(dataset), self.world))  # this rank's rows, unpadded

        def cat(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts)[:keep]

        logits, labels = cat(logits), cat(labels)
        unimodal = {m: cat(v) for m, v in unimodal.items()}
        features = {m: cat(v) for m, v in features.items()}
        if self.distributed and gather:
            # one all-gather: [fused | uni-modal ... | label] rows (labels exact in float32)
            packed = torch.cat([logits, *unimodal.values(), labels[:, None].float()], dim=1)
            packed = gather_rows(packed, len(dataset), self.world)
            parts = packed.split([logits.shape[1], *(u.shape[1] for u in unimodal.values()), 1],
                                 dim=1)
            logits, labels = parts[0], parts[-1][:, 0].long()
            unimodal = dict(zip(unimodal, parts[1:-1]))
        return logits, labels, unimodal, features

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """acc, macro_f1, map and per-modality acc of the current model on `dataset` (under DDP
        a collective: every rank calls it and gets the metrics of the whole split)."""
        logits, labels, unimodal, _ = self._outputs(dataset)
        return classification_metrics(logits, labels, unimodal)

    def _feature_fn(self, dataset: Dataset):
        """D&R's feature extractor: pooled features and labels of this rank's shard of `dataset`
        (the whole split with one process)."""
        def extract() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            _, labels, _, features = self._outputs(dataset, gather=False)
            return features, labels
        return extract

    # ---------------------------------------------------------------- loop
    def fit(self, until_epoch: int | None = None) -> dict:
        """Train from the current epoch to cfg.epochs (or stop after `until_epoch` epochs, as a
        killed run would), then evaluate the best-val model on test and write summary.json."""
        try:
            return self._fit(until_epoch)
        except BaseException:
            self.logger.close()
            raise
        finally:
            self._release_directory()

    def _fit(self, until_epoch: int | None) -> dict:
        cfg = self.cfg
        stop = cfg.epochs if until_epoch is None else min(until_epoch, cfg.epochs)
        if self.start_epoch == 0 and stop > 0:  # PMR's first prototypes, before training
            self.methods.refresh_prototypes(0, lambda: self._prototype_batches(0))
        for epoch in range(self.start_epoch, stop):
            started = time.perf_counter()
            record = {"epoch": epoch, **self._train_epoch(epoch)}
            self.methods.refresh_prototypes(epoch, lambda e=epoch: self._prototype_batches(e + 1))
            record.update({f"val_{k}": v for k, v in self.evaluate(self.splits.val).items()})
            record.update(self.methods.after_epoch(epoch, self._feature_fn(self.splits.train),
                                                   self._feature_fn(self.splits.val)))
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            record["seconds"] = time.perf_counter() - started
            self.seconds += record["seconds"]
            if self.best is None or record["val_acc"] > self.best["val_acc"]:
                self.best = {"epoch": epoch, "val_acc": record["val_acc"]}
                self._save_best(epoch)
            self.logger.log(record)
            self.start_epoch = epoch + 1
            self._save_checkpoint()
        if self.start_epoch < cfg.epochs:
            self.logger.close()
            if self.distributed:
                dist.barrier()
            return {}
        return self._finish()

    def _finish(self) -> dict:
        if self.cfg.plots and self.logger.history and self.is_main:
            plot_history(self.logger.history, self.modalities, self.run_dir / "curves.png")
        self._load_best()
        best_epoch = self.best["epoch"]
        val_record = self.logger.history[best_epoch - self.logger.history[0]["epoch"]]
        summary = {
            "dataset": self.cfg.dataset, "method": self.cfg.method, "fusion": self.cfg.fusion,
            "best_epoch": best_epoch,
            "val": {k[4:]: v for k, v in val_record.items() if k.startswith("val_")},
            "test": self.evaluate(self.splits.test),
            "train_seconds": self.seconds,
            "skipped_steps": sum(r.get("skipped_steps", 0) for r in self.logger.history),
            "versions": _versions(),
        }
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.logger.close()
        if self.distributed:  # when fit() returns, rank 0's files are complete on every rank
            dist.barrier()
        return summary

    # ---------------------------------------------------------------- checkpoints
    def _path(self, name: str) -> Path:
        """Where checkpoint `name` lives: a file, or under --fsdp a sharded directory (.dcp)."""
        return self.run_dir / (Path(name).with_suffix(".dcp").name if self.fsdp else name)

    def _read_state(self, path: Path) -> dict:
        """The verified checkpoint at `path` (of a sharded one: its host state), on the CPU."""
        if self.fsdp:
            return ckpt.load_sharded_state(path, self._digests)
        return ckpt.load(path)

    def _sharded_state(self, *, model_only: bool = False) -> dict:
        """Under --fsdp: the state dicts DCP writes and fills in place (parameters and optimiser
        state as this rank's DTensor shards; the helpers' state, which may hold shards too)."""
        if model_only:
            return {"model": get_model_state_dict(self.model)}
        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer, "methods": self.methods.state_dict()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers as whole tensors, on every rank (under --fsdp a
        collective that gathers the shards)."""
        if not self.fsdp:
            return self.model.state_dict()
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))

    def _save_best(self, epoch: int) -> None:
        path, previous = self._path(BEST), self._path(BEST_PREVIOUS)
        if self.fsdp:
            ckpt.save_sharded(self._sharded_state(model_only=True), {"epoch": epoch}, path,
                              previous=previous)
        elif self.is_main:
            ckpt.save({"model": self.model.state_dict(), "epoch": epoch}, path,
                      previous=previous)

    def _load_best(self) -> None:
        """The best epoch's model into self.model, on every rank."""
        path = self._path(BEST)
        if self.fsdp:  # the ranks hash it, rank 0 verifies it, every rank reads its shards
            self._digests = ckpt.sharded_digests([path])
            _on_rank0(lambda: self._read_state(path), self.distributed, self.device)
            tensors = self._sharded_state(model_only=True)
            ckpt.load_sharded(tensors, path)
            set_model_state_dict(self.model, tensors["model"])
            return
        if self.is_main:
            self.model.load_state_dict(ckpt.load(path, map_location=self.device)["model"])
        if self.distributed:  # rank 0 read the best model: every rank evaluates it on test
            distributed.broadcast_(list(self.model.state_dict().values()), dist.group.WORLD)

    def _save_checkpoint(self) -> None:
        """A collective. Model, optimiser and method state are replicated on the ranks (under
        --fsdp sharded, and written by every rank with DCP), the rest is rank 0's, the data order
        comes from (seed, epoch): any world size can resume."""
        state = {
            "epoch": self.start_epoch,
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "best": self.best,
            "seconds": self.seconds,
            "history": self.logger.history,
            "config": config_dict(self.cfg),
            "world_size": self.world,
        }
        path, previous = self._path(CHECKPOINT), self._path(PREVIOUS)
        if self.fsdp:
            ckpt.save_sharded(self._sharded_state(), state, path, previous=previous)
        elif self.is_main:
            state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                         methods=self.methods.state_dict())
            ckpt.save(state, path, previous=previous)

    def _read_checkpoint(self) -> tuple[dict, Path]:
        """Rank 0: the verified last checkpoint, or (with a warning) the previous one when the
        last is damaged; the best checkpoint it refers to is verified too."""
        path, previous = self._path(CHECKPOINT), self._path(PREVIOUS)
        if not path.exists() and not previous.exists():
            other = self.run_dir / (CHECKPOINT if self.fsdp else Path(CHECKPOINT).with_suffix(
                ".dcp").name)
            if other.exists():
                raise ValueError(f"--resume: {other} is the checkpoint of a run "
                                 f"{'without' if self.fsdp else 'with'} --fsdp; resume it "
                                 f"{'without' if self.fsdp else 'with'} --fsdp")
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        try:
            state = self._read_state(path)  # on the CPU (the RNG state must be there)
        except ckpt.CheckpointError as exc:
            if not previous.exists():
                raise ckpt.CheckpointError(f"--resume: {exc}") from None
            try:
                state = self._read_state(previous)
            except ckpt.CheckpointError as prev_exc:
                raise ckpt.CheckpointError(f"--resume: {exc}; and {prev_exc}") from None
            warnings.warn(f"--resume: {exc}; resuming from the previous checkpoint {previous} "
                          f"(epoch {state.get('epoch')})", stacklevel=3)
            path = previous
        if state.get("best") is not None:
            self._check_best(state["best"]["epoch"], path, fallback=path == previous)
        differences = _config_differences(state.get("config", {}), config_dict(self.cfg))
        if differences:
            raise ValueError(f"--resume: this run's settings differ from those of checkpoint "
                             f"{path}: {'; '.join(differences)}. Only "
                             f"{', '.join(RESUME_MAY_CHANGE)} may change on resume")
        return state, path

    def _check_best(self, epoch: int, path: Path, *, fallback: bool) -> None:
        """Verify that the best checkpoint holds `epoch`, the best epoch `path` refers to; after
        a fallback to the previous checkpoint, the previous best may be the one."""
        best_path, best_prev = self._path(BEST), self._path(BEST_PREVIOUS)
        try:
            found = self._read_state(best_path).get("epoch")
        except ckpt.CheckpointError as exc:
            if not fallback:
                raise ckpt.CheckpointError(f"--resume: {exc}") from None
            found = None
        if found == epoch:
            return
        if fallback and best_prev.exists() and self._read_state(best_prev).get("epoch") == epoch:
            ckpt.move(best_prev, best_path)
            return
        raise ckpt.CheckpointError(f"--resume: {best_path} holds epoch {found}, but {path} "
                                   f"expects the best epoch {epoch}")

    def _load_checkpoint(self) -> list[dict]:
        if self.fsdp:  # the ranks hash the files rank 0 verifies (the previous ones: rank 0)
            self._digests = ckpt.sharded_digests([self._path(CHECKPOINT), self._path(BEST)])
        state, path = (None, None)
        if self.is_main:
            state, path = self._read_checkpoint_or_message()
        if self.distributed:  # rank 0 reads it: the other nodes need not see the file
            box = [(state, path)]
            dist.broadcast_object_list(box, src=0, device=self.device)
            state, path = box[0]
        if isinstance(state, tuple):  # (error type, message)
            kind, message = state
            raise (FileNotFoundError if kind == "missing" else ValueError)(message)
        try:
            if self.fsdp:  # every rank reads its shards (of any world size's checkpoint)
                tensors = self._sharded_state()
                ckpt.load_sharded(tensors, path)
                set_state_dict(self.model, self.optimizer, model_state_dict=tensors["model"],
                               optim_state_dict=tensors["optimizer"])
                self.methods.load_state_dict(tensors["methods"])
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.methods.load_state_dict(state["methods"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
            if state["rng"]["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.start_epoch, self.best = state["epoch"], state["best"]
            self.seconds = state["seconds"]
            return state["history"]
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"--resume: checkpoint {path} does not fit this run: "
                                       f"{type(exc).__name__}: {exc}") from exc

    def _read_checkpoint_or_message(self):
        try:
            return self._read_checkpoint()
        except FileNotFoundError as exc:
            return ("missing", str(exc)), None
        except ValueError as exc:
            return ("invalid", str(exc)), None

def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Train one run described by `cfg`; returns the summary (best epoch, val and test metrics)."""
    return Trainer(cfg, resume=resume).fit()
