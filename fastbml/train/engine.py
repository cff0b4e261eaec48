"""The training loop behind `fastbml train`: one run of one method on one dataset.

Per epoch: train (OPM in the forward, OGM after backward), evaluate on val, D&R after the
evaluation (as the D&R code does), log, checkpoint. The best-val epoch's model is evaluated on
test once at the end: model selection never looks at test. Every epoch's shuffle is seeded by
(seed, epoch) and the checkpoint carries model, optimiser, scheduler, AMP scaler, method state
and the global RNG, so a resumed run continues exactly as an uninterrupted one (bit-identical on
CPU).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .. import rng
from ..data import Splits, TensorDataset, load_dataset
from ..models import build_model
from .config import TrainConfig, config_dict
from .logger import RunLogger, plot_history
from .methods import MethodStack
from .metrics import classification_metrics

CHECKPOINT = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


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


def _to_device(inputs: dict[str, torch.Tensor], modalities: list[str],
               device: torch.device) -> dict[str, torch.Tensor]:
    return {m: inputs[m].to(device, non_blocking=True) for m in modalities}


class Trainer:
    """One run: `Trainer(cfg).fit()` trains, logs into cfg.out and returns the summary dict.

    `splits` may be given directly (otherwise cfg.dataset is loaded); `resume=True` continues
    from cfg.out/checkpoint_last.pt.
    """

    def __init__(self, cfg: TrainConfig, splits: Splits | None = None, *, resume: bool = False):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
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
                                 init=cfg.init, hidden=cfg.hidden,
                                 feature_dim=cfg.feature_dim).to(self.device)
        self.methods = MethodStack(cfg, self.model, info.num_classes, self.device)
        self.optimizer = _build_optimizer(cfg, self.model.parameters())
        self.scheduler = _build_scheduler(cfg, self.optimizer)
        self.amp_dtype = _AMP_DTYPES.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.run_dir = Path(cfg.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.loader_gen = torch.Generator()
        self.train_loader = self._loader(self.splits.train, shuffle=True)
        self.start_epoch, self.best, self.seconds = 0, None, 0.0
        history = None
        if resume:
            history = self._load_checkpoint()
        else:
            (self.run_dir / "config.json").write_text(json.dumps(config_dict(cfg), indent=1))
        self.logger = RunLogger(self.run_dir, history, tensorboard=cfg.tensorboard)

    # ---------------------------------------------------------------- data
    def _loader(self, dataset: Dataset, *, shuffle: bool) -> DataLoader:
        """Batches of `dataset`; in-memory datasets are indexed a whole batch at a time."""
        cuda = self.device.type == "cuda"
        drop_last = shuffle and self.cfg.drop_last
        if isinstance(dataset, TensorDataset):
            sampler = (RandomSampler(dataset, generator=self.loader_gen) if shuffle
                       else SequentialSampler(dataset))
            return DataLoader(dataset, sampler=BatchSampler(sampler, self.cfg.batch_size,
                                                            drop_last),
                              batch_size=None, pin_memory=cuda)
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=shuffle,
                          drop_last=drop_last, num_workers=self.cfg.workers, pin_memory=cuda,
                          generator=self.loader_gen if shuffle else None)

    # ---------------------------------------------------------------- train / eval
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        self.methods.train(True)
        self.loader_gen.manual_seed(rng.step_seed(cfg.seed, epoch))
        loss_sum = torch.zeros((), device=self.device)
        n_seen = 0
        batches = self.train_loader
        if cfg.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        for inputs, labels in batches:
            labels = labels.to(self.device, non_blocking=True)
            loss_sum += self.train_step(_to_device(inputs, self.modalities, self.device),
                                        labels, epoch) * labels.shape[0]
            n_seen += labels.shape[0]
        if self.scheduler is not None:
            self.scheduler.step()
        return {"train_loss": float(loss_sum) / max(n_seen, 1), **self.methods.epoch_logs()}

    def train_step(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                   epoch: int) -> torch.Tensor:
        """One optimisation step on a batch already on the device; returns the detached loss."""
        model = self.model
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            features = model.encode(inputs)
            unimodal = model.head.unimodal_logits(features)
            fused_in, weights = self.methods.features(features, unimodal, labels, epoch)
            logits = model.head(fused_in)
        per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
        loss = per_sample.mean() if weights is None else (per_sample * weights).sum()
        aux = model.head.auxiliary_loss({m: u.float() for m, u in unimodal.items()}, labels)
        total = loss if aux is None else loss + aux
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        self.methods.after_backward(unimodal, labels, epoch)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def _outputs(self, dataset: Dataset):
        """Fused logits, labels, uni-modal logits and pooled features over a split (eval mode)."""
        self.model.eval()
        logits, labels = [], []
        unimodal = {m: [] for m in self.modalities}
        features = {m: [] for m in self.modalities}
        for inputs, y in self._loader(dataset, shuffle=False):
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = self.model(_to_device(inputs, self.modalities, self.device))
            logits.append(out.logits.float())
            labels.append(y.to(self.device))
            for m in self.modalities:
                unimodal[m].append(out.unimodal[m].float())
                features[m].append(out.features[m].float())
        cat = torch.cat
        return (cat(logits), cat(labels), {m: cat(v) for m, v in unimodal.items()},
                {m: cat(v) for m, v in features.items()})

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """acc, macro_f1, map and per-modality acc of the current model on `dataset`."""
        logits, labels, unimodal, _ = self._outputs(dataset)
        return classification_metrics(logits, labels, unimodal)

    def _feature_fn(self, dataset: Dataset):
        def extract() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            _, labels, _, features = self._outputs(dataset)
            return features, labels
        return extract

    # ---------------------------------------------------------------- loop
    def fit(self, until_epoch: int | None = None) -> dict:
        """Train from the current epoch to cfg.epochs (or stop after `until_epoch` epochs, as a
        killed run would), then evaluate the best-val model on test and write summary.json."""
        cfg = self.cfg
        stop = cfg.epochs if until_epoch is None else min(until_epoch, cfg.epochs)
        for epoch in range(self.start_epoch, stop):
            started = time.perf_counter()
            record = {"epoch": epoch, **self._train_epoch(epoch)}
            record.update({f"val_{k}": v for k, v in self.evaluate(self.splits.val).items()})
            record.update(self.methods.after_epoch(epoch, self._feature_fn(self.splits.train),
                                                   self._feature_fn(self.splits.val)))
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            record["seconds"] = time.perf_counter() - started
            self.seconds += record["seconds"]
            if self.best is None or record["val_acc"] > self.best["val_acc"]:
                self.best = {"epoch": epoch, "val_acc": record["val_acc"]}
                torch.save({"model": self.model.state_dict(), "epoch": epoch},
                           self.run_dir / BEST)
            self.logger.log(record)
            self.start_epoch = epoch + 1
            self._save_checkpoint()
        if self.start_epoch < cfg.epochs:
            self.logger.close()
            return {}
        return self._finish()

    def _finish(self) -> dict:
        if self.cfg.plots and self.logger.history:
            plot_history(self.logger.history, self.modalities, self.run_dir / "curves.png")
        best = torch.load(self.run_dir / BEST, map_location=self.device, weights_only=True)
        self.model.load_state_dict(best["model"])
        val_record = self.logger.history[best["epoch"] - self.logger.history[0]["epoch"]]
        summary = {
            "dataset": self.cfg.dataset, "method": self.cfg.method, "fusion": self.cfg.fusion,
            "best_epoch": best["epoch"],
            "val": {k[4:]: v for k, v in val_record.items() if k.startswith("val_")},
            "test": self.evaluate(self.splits.test),
            "train_seconds": self.seconds,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.logger.close()
        return summary

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self) -> None:
        state = {
            "epoch": self.start_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "methods": self.methods.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "best": self.best,
            "seconds": self.seconds,
            "history": self.logger.history,
            "config": config_dict(self.cfg),
        }
        tmp = self.run_dir / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / CHECKPOINT)

    def _load_checkpoint(self) -> list[dict]:
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = state["config"]
        for key in ("dataset", "method", "fusion", "seed", "modalities"):
            if saved[key] != getattr(self.cfg, key):
                raise ValueError(f"--resume: checkpoint {path} was written with {key}="
                                 f"{saved[key]!r}, this run has {getattr(self.cfg, key)!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.methods.load_state_dict(state["methods"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.start_epoch, self.best, self.seconds = state["epoch"], state["best"], state["seconds"]
        return state["history"]


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Train one run described by `cfg`; returns the summary (best epoch, val and test metrics)."""
    return Trainer(cfg, resume=resume).fit()
