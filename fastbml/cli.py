"""Command line: `fastbml train ...` and `fastbml demo [--quick] [--out DIR]` (also `python -m fastbml`).

`torchrun --nproc_per_node=N -m fastbml train ...` trains with DDP on N processes, and with
`--fsdp` sharded with FSDP2 (README, "Multi-GPU and multi-node"); --batch-size is per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .data import dataset_names
from .models import FUSIONS
from .train.config import (
    AMP_MODES,
    FSDP_MIXED_PRECISION,
    OPTIMIZERS,
    PRESETS,
    SCHEDULERS,
    TrainConfig,
    make_config,
)

_HELP = {
    "dataset": f"dataset name: {', '.join(dataset_names())}",
    "data_root": "directory holding the dataset (its layout: README.md, Datasets)",
    "method": "joint, ogm, ogm-ge, opm, dr, agm, pmr, mmpareto, or a combination joined by '+' "
              "(e.g. opm+ogm-ge, pmr+ogm-ge, mmpareto+opm)",
    "fusion": f"fusion head: {', '.join(FUSIONS)}",
    "init": "reference init: ogm (OGM-GE / T-PAMI global re-init) or dr (D&R: ResNet's own)",
    "modalities": "train on these modalities only (a uni-modal baseline with one)",
    "optimizer": ", ".join(OPTIMIZERS), "scheduler": ", ".join(SCHEDULERS),
    "amp": "mixed precision: " + ", ".join(AMP_MODES),
    "alpha": "OGM alpha", "ogm_form": "OGM coefficient form: paper or shifted",
    "ogm_start": "first epoch OGM modulates (0-based)", "ogm_end": "last epoch OGM modulates",
    "conv_only": "OGM modulates only 4-D conv kernels (original repositories' rule)",
    "q_base": "OPM base drop probability", "opm_lambda": "OPM lambda", "p_exe": "OPM p_exe",
    "warmup_epochs": "no OGM/OPM before this epoch (T-PAMI uses 6)",
    "dr_every": "D&R: re-learn after every this many epochs", "dr_times": "D&R: how many times",
    "agm_alpha": "AGM alpha", "agm_start": "first epoch AGM modulates (0-based)",
    "agm_end": "last epoch AGM modulates",
    "dr_lambda": "D&R lambda", "dr_clusters": "D&R k-means clusters (default: classes)",
    "pmr_alpha": "PMR: weight of the prototypical cross-entropy",
    "pmr_momentum": "PMR: weight of the previous prototypes in their EMA",
    "pmr_start": "first epoch PMR adds its loss (0-based)",
    "pmr_end": "last epoch PMR adds its loss",
    "mmpareto_gamma": "MMPareto step enlargement gamma",
    "mmpareto_start": "first epoch MMPareto combines gradients (0-based)",
    "mmpareto_end": "last epoch MMPareto combines gradients",
    "batch_size": "batch size per process (under torchrun the global batch is world size x this)",
    "device": "auto, cpu, cuda or cuda:N (under torchrun auto/cuda mean cuda:LOCAL_RANK)",
    "dist_backend": "torch.distributed backend under torchrun: auto (nccl on CUDA, gloo on "
                    "CPU), nccl or gloo",
    "workers": "DataLoader worker processes per process (default: the cores available to "
               "this process divided among the node's ranks, at most 16; 0 below 2)",
    "fsdp": "shard each encoder and the fusion head with FSDP2 (fully_shard) instead of DDP; "
            "checkpoints become torch.distributed.checkpoint directories (*.dcp) that resume "
            "on any number of processes; without torchrun: one process (nothing sharded)",
    "fsdp_mixed_precision": "with --fsdp: " + ", ".join(FSDP_MIXED_PRECISION) + " (bf16: "
                            "parameters all-gathered and used in bf16, gradients reduced in "
                            "fp32; replaces --amp)",
    "fsdp_shard_size": "with --fsdp: shard each parameter over groups of this many ranks and "
                       "replicate it across the groups (HSDP; e.g. the GPUs of one node); it "
                       "must divide the world size (default: shard over all ranks)",
    "prefetch": "batches each DataLoader worker loads ahead",
    "threads": "torch CPU threads", "backend": "fastbml kernel backend: auto, torch, cpp, triton",
    "compile": "torch.compile the training forward (OPM included) and the OGM step",
    "compile_mode": "torch.compile mode with Inductor: default, reduce-overhead (CUDA graphs), "
                    "max-autotune",
    "compile_backend": "torch.compile backend (inductor; aot_eager compiles without codegen)",
    "out": "run directory (logs, checkpoints, plots); one run at a time holds it (a lock)",
    "on_nonfinite": "a non-finite training loss: stop (default; an error, the last good "
                    "checkpoint kept) or skip (the step is skipped and counted, as GradScaler "
                    "does)",
}
_NONE_DEFAULT_TYPES = {"data_root": str, "ogm_end": int, "opm_end": int, "agm_end": int,
                       "pmr_end": int, "fsdp_shard_size": int,
                       "dr_clusters": int,
                       "threads": int, "workers": int}


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="settings of a reference repository (docs/methods.md#reference-presets); flags override them")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint; the settings "
                             "must be those of the run, except --epochs, paths, --workers, "
                             "--threads, --device, --dist-backend, the logging switches and "
                             "the --compile switches")
    parser.add_argument("--dataset-option", dest="dataset_options", type=_key_value,
                        action="append", metavar="KEY=VALUE",
                        help="dataset option (repeatable), e.g. frames=3")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "dataset_options":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kwargs = {"default": None, "help": _HELP.get(f.name)}
        if f.name == "modalities":
            parser.add_argument(flag, nargs="+", **kwargs)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kind = _NONE_DEFAULT_TYPES.get(f.name, type(default))
            parser.add_argument(flag, type=kind, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbml", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="train one method on one dataset"))
    demo = sub.add_parser("demo", help="joint vs ogm-ge vs opm vs dr on the synthetic dataset")
    demo.add_argument("--quick", action="store_true", help="one seed instead of three")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .train.demo import format_table, run_demo

        started = time.perf_counter()
        results = run_demo(args.out, quick=args.quick)
        print(format_table(results))
        print(f"\ntest accuracy (model chosen on val); {time.perf_counter() - started:.0f} s; "
              f"results.json and comparison.png in {args.out}")
        return 0
    import torch.distributed as dist

    from .train.engine import NonFiniteLossError, Trainer
    from .train.parallel import setup_distributed

    values = {k: v for k, v in vars(args).items() if k not in ("command", "preset", "resume")}
    values["dataset_options"] = dict(values["dataset_options"] or [])
    created, rank = False, 0
    try:
        cfg = make_config(args.preset, **values)
        created = setup_distributed(cfg.device, cfg.dist_backend, single_process=cfg.fsdp)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        summary = Trainer(cfg, resume=args.resume).fit()
    except (ValueError, FileNotFoundError, NonFiniteLossError) as exc:
        where = f" (rank {rank})" if created else ""
        print(f"fastbml train{where}: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, NonFiniteLossError) else 2
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
