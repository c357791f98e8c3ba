"""``train_fold``: train one cross-validation fold of one configuration from a workspace.

Run directory ``WORK/runs/<cfg>/fold_<k>/``::

    checkpoint_latest.pt   every ``train.checkpoint_every`` epochs and at exit (for --resume)
    checkpoint_best.pt     best EMA validation pseudo-Dice so far
    checkpoint_final.pt    after the last epoch (or early stopping)
    metrics.jsonl, progress.png, training_log.txt, training_summary.json

A cascade's second stage (``previous_stage`` set, e.g. ``3d_cascade_fullres``) first makes sure every
case of the fold has its first stage's cross-validation segmentation in the preprocessed store
(:func:`voxflow.train.cascade.ensure_previous_stage`; a clear error names the ``3d_lowres`` fold to
train or validate otherwise; under DDP rank 0 writes it while the other ranks wait); its network takes
one extra one-hot input channel per foreground label.

Randomness: the network is initialised from ``train.seed`` on every rank (DDP also broadcasts rank
0's weights); each epoch gets a fresh training loader seeded with ``train.seed + 7919 · epoch`` (its
streams are derived per rank and worker), so a run resumed at epoch k sees the batches an uninterrupted
run would (bit-identical weights with a deterministic loader, see the kill-and-resume test).
Python/numpy/torch RNG states are saved in the checkpoints and restored on resume.

The batch of the plan is split across DDP ranks (rank r gets ``B // N`` plus one of the remainder);
the loss is that of the global batch (Dice statistics all-reduced with gradient, see
:mod:`voxflow.train.losses`), so N ranks take the step one process with batch B would.

Preemption: SIGTERM or SIGUSR1 (what SLURM and spot instances send before a kill) on any rank asks
every rank to stop after its current step; rank 0 writes ``checkpoint_latest.pt`` (atomically, with
the position inside the epoch and every rank's RNG state) and the run ends with
:class:`~voxflow.errors.TrainingInterrupted`. ``--resume`` replays the epoch's loader up to that
position, so it continues exactly; resuming with another number of processes works (same global
batch, other per-rank data streams) and says so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxflow._lock import LOCK_NAME, dir_lock_file, locked
from voxflow.errors import IncompleteStoreError, PlanError, TrainingInterrupted
from voxflow.nets import build_network, count_parameters, deep_supervision_scales
from voxflow.plan.schema import Configuration, Plan, TrainSpec, atomic_write_json
from voxflow.store import DatasetMeta, Store
from voxflow.train import distributed as D
from voxflow.train._steps import (
    EpochProgress,
    amp_dtype_for,
    epoch_loss,
    pseudo_dice,
    resolve_precision,
    train_epoch,
    validate,
)
from voxflow.train.checkpoint import (
    capture_rng,
    fit_state_dict,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    strip_state_dict,
)
from voxflow.train.labels import LabelSpec
from voxflow.train.losses import DeepSupervisionLoss, SegmentationLoss, deep_supervision_weights
from voxflow.train.monitor import RunMonitor
from voxflow.train.schedules import build_optimizer, lr_at, set_lr
from voxflow.train.splits import fold_cases, load_or_create_splits, require_finished_store
from voxflow.train.validation import validate_fold
from voxflow.workspace import FoldDir, Workspace

__all__ = ["TrainState", "build_losses", "class_weights_from_counts", "train_fold"]

log = logging.getLogger(__name__)

LoaderFactory = Callable[..., Any]
EMA_MOMENTUM = 0.9


@dataclass
class TrainState:
    """Trainer bookkeeping saved in every checkpoint. ``epoch`` is the next epoch to run."""

    epoch: int = 0
    ema_pseudo_dice: float | None = None
    best_ema: float = -math.inf
    epochs_since_best: int = 0
    class_weights: list[float] | None = None
    train_seconds: float = 0.0
    stopped_early: bool = False
    epoch_steps: int = 0  # optimiser steps done in epoch ``epoch`` when it was interrupted
    epoch_batches: int = 0  # batches drawn from that epoch's loader by then (replayed on resume)


@dataclass
class _Job:
    """Everything one rank needs, resolved once from the workspace."""

    work: Workspace
    configuration: Configuration
    meta: DatasetMeta
    labels: LabelSpec
    store_path: Path
    fold: int | str
    train_ids: list[str]
    val_ids: list[str]
    run_dir: Path
    resume: bool
    num_workers: int
    validate_cases: bool
    in_channels: int = 0  # network input channels: the image's, plus a cascade's previous-stage one-hot


def _default_loader() -> LoaderFactory:
    from voxflow.data import build_loader

    return build_loader


def _has_checkpoints(run_dir: Path) -> bool:
    return any((run_dir / f"checkpoint_{n}.pt").exists() for n in ("latest", "final"))


def _resolve(
    work: Workspace,
    configuration: str,
    fold: int | str,
    *,
    resume: bool,
    overrides: Mapping[str, Any] | None,
    num_workers: int,
    validate_cases: bool,
    restart: bool = False,
) -> _Job:
    plan = Plan.load(work.plans)
    if overrides:
        plan = plan.with_overrides(dict(overrides), configuration=configuration)
    config = plan.configuration(configuration)
    store = Store.open(work.preprocessed(configuration))
    require_finished_store(store, work, configuration)
    case_ids = store.case_ids()
    if str(fold) == "all":  # every case trains and validates; no splits needed (works with one case)
        train_ids, val_ids = fold_cases([], fold, case_ids)
    else:
        if len(case_ids) < 2:
            raise PlanError(
                f"cross-validation needs at least 2 cases; {store.path} has {len(case_ids)}. "
                f"Train with --fold all (every case trains and validates)."
            )
        splits = load_or_create_splits(work, case_ids, groups=store.meta.extra.get("case_groups"))
        train_ids, val_ids = fold_cases(splits, fold, case_ids)
    run_dir = work.run_dir(configuration, fold)
    if not resume and not restart and _has_checkpoints(run_dir):
        raise PlanError(
            f"{run_dir} already holds checkpoints of a run; continue it with --resume, or start "
            f"it afresh with --restart (which deletes them)."
        )
    if not train_ids or not val_ids:
        raise PlanError(
            f"fold {fold!r} of {work.splits} must have training and validation cases; got "
            f"{len(train_ids)} and {len(val_ids)}."
        )
    if restart and run_dir.exists():
        for f in run_dir.iterdir():
            if f.name != LOCK_NAME:  # the lock this process holds
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        log.info("--restart: removed the earlier run in %s", run_dir)
    in_channels = config.n_channels
    if config.previous_stage is not None:  # a cascade's second stage: the previous stage's CV segmentations
        from voxflow.models import previous_stage_labels
        from voxflow.train.cascade import previous_stage_sources

        cv_splits = load_or_create_splits(work, case_ids, groups=store.meta.extra.get("case_groups"))
        # every prerequisite checked here (read only); prev_seg is written by rank 0 (_prepare_previous_stage)
        previous_stage_sources(work, config, sorted({*train_ids, *val_ids}), splits=cv_splits)
        in_channels += len(previous_stage_labels(store.meta))
    return _Job(
        work,
        config,
        store.meta,
        LabelSpec.from_meta(store.meta),
        store.path,
        fold,
        train_ids,
        val_ids,
        run_dir,
        resume,
        num_workers,
        validate_cases,
        in_channels,
    )


def _run_dir_lock(args: Mapping[str, Any]) -> Path | None:
    """The fold's run-directory lock (issue 19): one writer per fold. A DDP run is one writer: with
    ``--nproc`` only this launching process takes it; under torchrun only global rank 0 does."""
    if torch.distributed.is_torchelastic_launched() and os.environ.get("RANK", "0") != "0":
        return None
    return dir_lock_file(args["work"].run_dir(args["configuration"], args["fold"]))


@locked(_run_dir_lock, command="train")
def train_fold(
    work: Workspace,
    configuration: str,
    fold: int | str,
    *,
    device: str = "cpu",
    resume: bool = False,
    restart: bool = False,
    overrides: Mapping[str, Any] | None = None,
    nproc: int = 1,
    num_workers: int = 2,
    loader_factory: LoaderFactory | None = None,
    validate_cases: bool = True,
) -> Path:
    """Train ``configuration`` on ``fold`` (0..4 or ``"all"``) and return the run directory.

    ``overrides`` are ``--set`` style keys relative to the configuration (``{"train.epochs": 5}``).
    ``nproc > 1`` spawns that many DDP processes. ``loader_factory`` defaults to
    :func:`voxflow.data.build_loader` (same signature; must be picklable for ``nproc > 1``).
    ``validate_cases`` predicts the validation cases at the end (when :mod:`voxflow.infer` exists).
    """
    if resume and restart:
        raise PlanError("--resume continues a run and --restart deletes it; give one of them.")
    job = _resolve(
        work,
        configuration,
        fold,
        resume=resume,
        restart=restart,
        overrides=overrides,
        num_workers=num_workers,
        validate_cases=validate_cases,
    )
    factory = loader_factory or _default_loader()
    if nproc > 1:
        interrupted = _spawn(nproc, device, job, factory)
    else:
        interrupted = _rank_entry(0, 1, None, device, job, factory)
    if interrupted:
        raise TrainingInterrupted(interrupted)
    return job.run_dir


def _spawn(nproc: int, device: str, job: _Job, factory: LoaderFactory) -> str | None:
    """Run ``nproc`` ranks with ``torch.multiprocessing``; SIGTERM/SIGUSR1 reaching this process are
    passed on to the ranks (which stop after their step). Returns rank 0's interruption message."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(
        _rank_main,
        args=(nproc, D.free_port(), device, job, factory, queue),
        nprocs=nproc,
        join=False,
        start_method="spawn",
    )

    def forward(signum: int, frame: object) -> None:
        for p in ctx.processes:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signum)

    with _handlers(forward):
        while not ctx.join():
            pass
    return None if queue.empty() else queue.get()


def _rank_main(
    rank: int, world_size: int, port: int, device: str, job: _Job, factory: LoaderFactory, queue: Any
) -> None:
    message = _rank_entry(rank, world_size, port, device, job, factory)
    if rank == 0 and message:
        queue.put(message)


def _rank_entry(
    rank: int, world_size: int, port: int | None, device: str, job: _Job, factory: LoaderFactory
) -> str | None:
    """Train on one rank; returns a message when the run was interrupted by a signal."""
    info = D.setup_process_group(device, rank=rank, world_size=world_size, port=port)
    try:
        _prepare_previous_stage(job, info)
        return _Trainer(job, info, factory).run()
    finally:
        D.cleanup(info)


def _prepare_previous_stage(job: _Job, info: D.DistInfo) -> None:
    """A cascade's second stage: rank 0 writes the missing or stale ``prev_seg`` of the fold's cases
    (:func:`~voxflow.train.cascade.ensure_previous_stage`) while the other ranks wait
    (:func:`~voxflow.train.distributed.main_first`: one writer, no timeout on a long preparation);
    they then check that they see it (the workspace must be on a file system every node shares)."""
    config = job.configuration
    if config.previous_stage is None:
        return
    from voxflow.train.cascade import ensure_previous_stage, stale_previous_stage

    store = Store.open(job.store_path)
    splits = load_or_create_splits(job.work, store.case_ids(), groups=store.meta.extra.get("case_groups"))
    cases = sorted({*job.train_ids, *job.val_ids})
    what = f"writing the {config.previous_stage} segmentations (prev_seg) of {config.name}"
    D.main_first(info, lambda: ensure_previous_stage(job.work, config, cases, splits=splits), what=what)
    if info.is_main:
        return
    stale = stale_previous_stage(job.work, config, cases, splits=splits)
    if stale:
        case, (_, reason) = next(iter(stale.items()))
        raise IncompleteStoreError(
            f"rank {info.rank} must see the prev_seg that rank 0 wrote into {job.store_path}; {len(stale)} case(s) "
            f"lack it here (e.g. {case!r}: {reason}). Put the workspace on a file system that every node shares."
        )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _handlers:
    """Install ``handler`` for :data:`STOP_SIGNALS` inside the block (main thread only)."""

    def __init__(self, handler: Any):
        self.handler = handler
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _handlers:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handler) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)


class _StopRequest:
    """Remembers the first stop signal received; the training loop polls it after every step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning(
                "received %s: stopping after the current step and writing checkpoint_latest.pt",
                signal.Signals(signum).name,
            )

    def requested(self) -> bool:
        return self.signum is not None


class _Counted:
    """An iterator that counts what was drawn from it."""

    def __init__(self, it: Iterator[Any]):
        self.it, self.n = it, 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        item = next(self.it)
        self.n += 1
        return item


def _drop_optimizer_params(
    state: dict[str, Any], keys: list[str], dropped: list[str], params: set[str]
) -> dict[str, Any]:
    """An optimiser state dict without the entries of the parameters named ``dropped``.

    ``keys`` are the checkpoint's state-dict keys in order; the optimiser numbered its parameters in
    that order (buffers are not parameters: keys that are neither ``params`` nor ``dropped`` are skipped).
    """
    order = [k for k in keys if k in params or k in dropped]
    gone = {i for i, k in enumerate(order) if k in dropped}
    remap = {old: new for new, old in enumerate(i for i in range(len(order)) if i not in gone)}
    groups = [{**g, "params": [remap[i] for i in g["params"] if i not in gone]} for g in state["param_groups"]]
    kept = {remap[i]: v for i, v in state["state"].items() if i not in gone}
    return {"state": kept, "param_groups": groups}


def build_losses(
    labels: LabelSpec,
    spec: TrainSpec,
    n_outputs: int,
    *,
    distributed: bool = False,
    class_weights: torch.Tensor | None = None,
) -> tuple[nn.Module, nn.Module]:
    """The training loss over the ``n_outputs`` deep-supervision outputs and the full-resolution loss
    used for validation; ``distributed``: the loss of the global DDP batch."""
    base = SegmentationLoss(labels, kind=spec.loss, class_weights=class_weights, distributed=distributed)
    return DeepSupervisionLoss(base, deep_supervision_weights(n_outputs)), base


def class_weights_from_counts(counts: np.ndarray, *, max_weight: float = 100.0) -> list[float]:
    """Median-frequency balancing: ``w_c = median(f) / f_c``, clipped to ``[1/max, max]``."""
    freq = counts.astype(np.float64) / max(float(counts.sum()), 1.0)
    freq = np.where(freq > 0, freq, np.nan)
    med = np.nanmedian(freq) if np.isfinite(freq).any() else 1.0
    w = np.nan_to_num(med / freq, nan=max_weight)
    return [float(x) for x in np.clip(w, 1.0 / max_weight, max_weight)]


def _close(loader: Any) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Trainer:
    """The training loop of one rank: parts composed, state in :class:`TrainState`."""

    def __init__(self, job: _Job, info: D.DistInfo, factory: LoaderFactory):
        self.job, self.info, self.factory = job, info, factory
        self.cfg = job.configuration
        self.spec = self.cfg.train
        _seed_all(self.spec.seed)
        self.net = build_network(self.cfg.network, job.in_channels, job.labels.num_outputs).to(info.device)
        self.optimizer = build_optimizer(self.net.parameters(), self.spec)
        try:
            self.precision = resolve_precision(self.spec.precision, info.device, amp=self.spec.amp)
        except ValueError as e:
            raise PlanError(f"train.precision: {e}") from e
        self.amp_dtype = amp_dtype_for(self.precision)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self.stop = _StopRequest()
        self.epoch_loss_sum = 0.0  # this rank's summed loss of the unfinished epoch (for exact resumes)
        self.rng_restored = False
        self.data_wait_fraction = 0.0  # of the last epoch's step time, on this rank
        self.scales = deep_supervision_scales(self.cfg.network)
        self.monitor = RunMonitor(job.run_dir, enabled=info.is_main, class_names=job.labels.names)

    # ------------------------------------------------------------------ checkpoints
    def _payload(self) -> dict[str, Any]:
        return {
            "network": strip_state_dict(self.net.state_dict()),
            "configuration": dataclasses.asdict(self.cfg),
            "dataset": self.job.meta.to_dict(),
            "in_channels": self.job.in_channels,
            "num_outputs": self.job.labels.num_outputs,
            "label_spec": dataclasses.asdict(self.job.labels),
            "epoch": self.state.epoch,
            "fold": str(self.job.fold),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "trainer_state": dataclasses.asdict(self.state),
            "precision": self.precision,
            "world_size": self.info.world_size,
            "rng": capture_rng(),
        }

    def _rank_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG state and unfinished-epoch loss (a collective: all ranks call it)."""
        mine = {"rng": capture_rng(), "epoch_loss_sum": self.epoch_loss_sum}
        if not self.info.distributed:
            return [mine]
        gathered: list[Any] = [None] * self.info.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return gathered

    def _save(self, *names: str) -> None:
        """Write checkpoints ``names`` on rank 0; every rank must call it (it gathers rank states)."""
        ranks = self._rank_states()
        if not self.info.is_main:
            return
        payload = {**self._payload(), "rank_states": ranks}
        for name in names:
            save_checkpoint(FoldDir(self.job.run_dir).checkpoint(name), payload)

    def _try_resume(self) -> bool:
        """Load checkpoint_latest.pt; return True when the run had already finished."""
        run = FoldDir(self.job.run_dir)
        final, latest = run.checkpoint_final, run.checkpoint_latest
        if self.info.is_main:  # temporary files of writes cut short by a kill
            for tmp in run.partial_checkpoints:
                tmp.unlink(missing_ok=True)
        if not latest.exists() and not final.exists():
            log.warning("--resume: no checkpoint in %s; starting from scratch", self.job.run_dir)
            return False
        ckpt = load_checkpoint(latest if latest.exists() else final, map_location=self.info.device)
        network, dropped = fit_state_dict(ckpt["network"], self.net)
        self.net.load_state_dict(network)
        optimizer = ckpt["optimizer"]
        if dropped:
            log.info(
                "checkpoint holds %d weights of unsupervised heads that this version no longer builds; dropped: %s",
                len(dropped),
                ", ".join(dropped),
            )
            optimizer = _drop_optimizer_params(
                optimizer, list(strip_state_dict(ckpt["network"])), dropped, {n for n, _ in self.net.named_parameters()}
            )
        self.optimizer.load_state_dict(optimizer)
        self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.state = TrainState(**ckpt["trainer_state"])
        ranks, old_world = ckpt.get("rank_states"), int(ckpt.get("world_size", 1))
        if ranks is not None and len(ranks) == self.info.world_size:
            restore_rng(ranks[self.info.rank]["rng"])
            self.epoch_loss_sum = float(ranks[self.info.rank]["epoch_loss_sum"])
            self.rng_restored = True
        else:
            if self.info.is_main and ranks is None:
                restore_rng(ckpt["rng"])
                self.rng_restored = True
            if old_world != self.info.world_size:
                # the per-rank streams of the old run cannot be replayed: the unfinished epoch goes on
                # with fresh streams of the new ranks
                self.state.epoch_batches = 0
                self.epoch_loss_sum = 0.0
                if self.info.is_main:
                    log.warning(
                        "resuming a run of %d processes with %d: the global batch stays %d, but the ranks'"
                        " data streams differ from the original run's, so the result is not identical to "
                        "an uninterrupted run",
                        old_world,
                        self.info.world_size,
                        self.cfg.batch_size,
                    )
        where = f" step {self.state.epoch_steps}" if self.state.epoch_steps else ""
        log.info("resumed %s at epoch %d%s", self.job.run_dir, self.state.epoch, where)
        return final.exists() and self.state.epoch >= self.spec.epochs or self.state.stopped_early

    # ------------------------------------------------------------------ set-up
    def _rank_config(self) -> Configuration:
        b, n, r = self.cfg.batch_size, self.info.world_size, self.info.rank
        per_rank = b // n + (1 if r < b % n else 0)
        if per_rank < 1:
            raise PlanError(
                f"batch_size {b} cannot be split across {n} processes; use --nproc <= {b} or --set batch_size={n}"
            )
        return dataclasses.replace(self.cfg, batch_size=per_rank)

    def _loader(self, case_ids: list[str], *, train: bool, seed: int) -> Any:
        return self.factory(
            self.job.store_path,
            case_ids,
            self._rank_config(),
            train=train,
            seed=seed,
            augment=train,
            device=self.info.device,
            rank=self.info.rank,
            world_size=self.info.world_size,
            num_workers=self.job.num_workers,
            ds_scales=self.scales,
        )

    def _class_weights(self, batches: Any) -> torch.Tensor | None:
        if not self.spec.class_weighted_ce:
            return None
        if self.state.class_weights is None:
            k = self.job.labels.num_outputs
            counts = torch.zeros(k, dtype=torch.float64, device=self.info.device)
            for _ in range(min(10, self.spec.iters_per_epoch)):
                t = next(batches).target
                t = (t if isinstance(t, torch.Tensor) else t[0]).to(self.info.device).long()
                counts += torch.bincount(t[(t >= 0) & (t < k)].flatten(), minlength=k).double()
            D.all_reduce_sum(counts, self.info)
            self.state.class_weights = class_weights_from_counts(counts.cpu().numpy())
            log.info("class-weighted CE: weights %s", [round(w, 3) for w in self.state.class_weights])
        return torch.tensor(self.state.class_weights, dtype=torch.float32, device=self.info.device)

    def _losses(self, batches: Any) -> tuple[nn.Module, nn.Module]:
        return build_losses(
            self.job.labels,
            self.spec,
            len(self.scales),
            distributed=self.info.distributed,
            class_weights=self._class_weights(batches),
        )

    def _wrap(self) -> nn.Module:
        model: nn.Module = self.net
        if self.info.distributed:
            ids = [self.info.device] if self.info.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.spec.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    # ------------------------------------------------------------------ loop
    def run(self) -> str | None:
        """Train to the end (or early stop); returns a message instead when a stop signal came."""
        with self.monitor, _handlers(self.stop):
            finished = self.job.resume and self._try_resume()
            self.monitor.restore(self.state.epoch)
            if finished:
                log.info("%s already finished (epoch %d); nothing to resume", self.job.run_dir, self.state.epoch)
                if self.job.validate_cases and not self._validated():
                    log.info("the end-of-training validation of %s did not finish; running it", self.job.run_dir)
                    self._finish()
                return None
            if not self.rng_restored:
                _seed_all(self.spec.seed + 1 + self.info.rank + 7919 * self.state.epoch)
            if self.info.is_main:
                log.info(
                    "training %s fold %s: %d train / %d val cases, %d parameters, %d processes, device %s, "
                    "precision %s",
                    self.cfg.name,
                    self.job.fold,
                    len(self.job.train_ids),
                    len(self.job.val_ids),
                    count_parameters(self.net),
                    self.info.world_size,
                    self.info.device,
                    self.precision,
                )
            model = self._wrap()
            val_loader = self._loader(self.job.val_ids, train=False, seed=self.spec.seed + 1)
            try:
                interrupted = self._loop(model, val_loader)
            finally:
                _close(val_loader)
            if interrupted:
                self._save("latest")
                return self._interrupted_message()
            self._save("latest", "final")
            self._finish()
            return None

    def _interrupted_message(self) -> str:
        name = signal.Signals(self.stop.signum).name if self.stop.signum is not None else "a stop signal"
        where = (
            f"epoch {self.state.epoch}, step {self.state.epoch_steps} of {self.spec.iters_per_epoch}"
            if self.state.epoch_steps
            else f"the end of epoch {self.state.epoch - 1}"
        )
        msg = (
            f"training of {self.cfg.name} fold {self.job.fold} stopped by {name} at {where}; "
            f"{FoldDir(self.job.run_dir).checkpoint_latest} is written. Continue with `voxflow train "
            f"{self.job.work.root} -c {self.cfg.name} -f {self.job.fold} --resume` (any number of processes)."
        )
        log.warning("%s", msg)
        return msg

    def _loop(self, model: nn.Module, val_loader: Any) -> bool:
        """The epochs; True when a stop signal ended them early (state is then ready to save)."""
        losses: tuple[nn.Module, nn.Module] | None = None
        for epoch in range(self.state.epoch, self.spec.epochs):
            t0 = time.perf_counter()
            lr = lr_at(epoch, self.spec)
            set_lr(self.optimizer, lr)
            progress = EpochProgress(self.state.epoch_steps, self.epoch_loss_sum)
            # one loader per epoch, seeded by the epoch: a resumed run sees the data an uninterrupted one would
            loader = self._loader(self.job.train_ids, train=True, seed=self.spec.seed + 7919 * epoch)
            try:
                batches = _Counted(iter(loader))
                for _ in range(self.state.epoch_batches):  # replay up to where an interrupted epoch stopped
                    next(batches)
                losses = losses or self._losses(batches)
                progress = train_epoch(
                    model,
                    losses[0],
                    self.optimizer,
                    self.scaler,
                    batches,
                    n_iters=self.spec.iters_per_epoch,
                    info=self.info,
                    amp_dtype=self.amp_dtype,
                    grad_clip=self.spec.grad_clip,
                    desc=f"epoch {epoch}",
                    progress=progress,
                    stop_requested=self.stop.requested,
                )
            finally:
                _close(loader)
            if progress.stopped:
                self.state.epoch_steps, self.state.epoch_batches = progress.steps, batches.n
                self.epoch_loss_sum = progress.loss_sum
                return True
            self.state.epoch_steps = self.state.epoch_batches = 0
            self.epoch_loss_sum = 0.0
            train_loss = epoch_loss(progress, self.info)
            self.data_wait_fraction = progress.data_wait_fraction
            t_train = time.perf_counter() - t0
            val_loss, counts = validate(
                model,
                losses[1],
                iter(val_loader),
                n_iters=self.spec.val_iters,
                info=self.info,
                amp_dtype=self.amp_dtype,
                labels=self.job.labels,
            )
            dice = pseudo_dice(counts.cpu())
            self._after_epoch(epoch, lr, train_loss, val_loss, dice, t_train, time.perf_counter() - t0)
            if self._should_stop():
                log.info(
                    "early stopping after epoch %d: EMA pseudo-Dice did not improve for %d epochs",
                    epoch,
                    self.state.epochs_since_best,
                )
                self.state.stopped_early = True
                break
            if epoch + 1 < self.spec.epochs and D.any_rank(self.stop.requested(), self.info):
                return True
        return False

    def _after_epoch(
        self,
        epoch: int,
        lr: float,
        train_loss: float,
        val_loss: float,
        dice: list[float],
        t_train: float,
        t_epoch: float,
    ) -> None:
        finite = [d for d in dice if math.isfinite(d)]
        mean = float(np.mean(finite)) if finite else 0.0
        st = self.state
        st.ema_pseudo_dice = (
            mean if st.ema_pseudo_dice is None else (EMA_MOMENTUM * st.ema_pseudo_dice + (1 - EMA_MOMENTUM) * mean)
        )
        st.epoch = epoch + 1
        st.train_seconds += t_epoch
        improved = st.ema_pseudo_dice > st.best_ema
        if improved:
            st.best_ema, st.epochs_since_best = st.ema_pseudo_dice, 0
            self._save("best")
        else:
            st.epochs_since_best += 1
        if st.epoch % self.spec.checkpoint_every == 0:
            self._save("latest")
        self.monitor.record(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "pseudo_dice": [d if math.isfinite(d) else None for d in dice],
                "mean_pseudo_dice": mean,
                "ema_pseudo_dice": st.ema_pseudo_dice,
                "lr": lr,
                "epoch_seconds": t_epoch,
                "seconds_per_iter": t_train / self.spec.iters_per_epoch,
                "new_best": improved,
                "data_wait_fraction": self.data_wait_fraction,
            }
        )
        if self.info.is_main:
            log.info(
                "epoch %d: train loss %.4f, val loss %.4f, pseudo-Dice %s (EMA %.4f), lr %.2e, %.1f s",
                epoch,
                train_loss,
                val_loss,
                [round(d, 4) for d in dice],
                st.ema_pseudo_dice,
                lr,
                t_epoch,
            )

    def _should_stop(self) -> bool:
        patience = self.spec.early_stopping_patience
        return patience is not None and self.state.epochs_since_best >= patience

    def _validated(self) -> bool:
        """Whether the end-of-training validation wrote its summary (or there is nothing to predict from)."""
        return self.job.work.fold(self.cfg.name, self.job.fold).validation_summary.exists()

    def _param_spread(self) -> float:
        """Largest difference of any weight between ranks (0 when DDP kept them identical)."""
        if not self.info.distributed:
            return 0.0
        flat = torch.cat([p.detach().flatten().double() for p in self.net.parameters()])
        hi, lo = flat.clone(), -flat
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MAX)
        return float((hi + lo).max())

    def _finish(self) -> None:
        spread = self._param_spread()
        if spread > 0:
            log.warning("DDP ranks ended with different weights (max difference %.3g)", spread)
        if not self.info.is_main:
            return
        atomic_write_json(
            self.job.run_dir / "training_summary.json",
            {
                "configuration": self.cfg.name,
                "fold": str(self.job.fold),
                "epochs": self.state.epoch,
                "stopped_early": self.state.stopped_early,
                "best_ema_pseudo_dice": self.state.best_ema,
                "train_seconds": self.state.train_seconds,
                "world_size": self.info.world_size,
                "ddp_max_param_diff": spread,
                "n_parameters": count_parameters(self.net),
            },
        )
        if self.job.validate_cases:
            validate_fold(self.job.work, self.cfg.name, self.job.fold, self.job.val_ids, device=str(self.info.device))
