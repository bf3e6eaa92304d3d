"""The collaborative trainer: two students, one labelled batch stream (and one of unlabelled images where a term
reads them), one objective, the teachers of the pseudo-label terms, two optimizers.

`step()` reads like the method: forward both students, compute each loss term by name,
back-propagate their sum once, step each student's optimizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from train import distributed
from train.checkpoint import load_state, save_state, save_weights
from train.config import Config, ConfigError, OptimizerConfig, save_config, slot_config
from train.data import IGNORE_INDEX, DatasetError, SegmentationDataset, build_dataset
from train.data.unlabeled import LABELED_FILE, UnlabeledDataset, labeled_subset, unlabeled_images, write_labeled
from train.evaluate import eval_loader, evaluate, format_table
from train.losses import TERMS, Geometry, Objective, Unlabeled, method_terms
from train.models import build_student, locate
from train.run_dir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    STUDENTS,
    load_students,
    resolve_device,
    weights_file,
)
from train.teachers import Teachers

log = logging.getLogger(__name__)
# Progress-bar names of the direction shares: region (r) and pixel (p) BSD, ViT->CNN and CNN->ViT.
_SHORT = {
    "region_vit_to_cnn": "r_v2c",
    "region_cnn_to_vit": "r_c2v",
    "pixel_vit_to_cnn": "p_v2c",
    "pixel_cnn_to_vit": "p_c2v",
}
_LOSSES = {"loss", "ce_cnn", "ce_vit", *TERMS}  # what a step returns besides statistics
_BAR_INTERVAL = 10  # iterations between progress-bar updates (each reads the losses off the device)


class ResumableSampler(torch.utils.data.Sampler):
    """Endless shuffled stream of `(index, augmentation seed)` that can start at any iteration.

    Epoch e is a permutation drawn from (seed, e); each sample's augmentation seed is
    (seed, e, position). So the data seen from iteration i on is the same whether training ran
    straight through or was killed and resumed, and it does not depend on the worker count.
    With `world > 1`, rank r takes its slice of every global batch (distributed training). `stream` > 0
    draws another stream from the same seed (the unlabelled images beside the labelled ones).
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, start_iter: int = 0, rank: int = 0, world: int = 1, stream: int = 0
    ):
        self.size, self.batch_size, self.seed, self.stream = size, batch_size, seed, stream
        self.start_iter, self.rank, self.world = start_iter, rank, world
        self.global_batch = batch_size * world
        self.per_epoch = size // self.global_batch * self.global_batch
        if self.per_epoch == 0:
            what = "unlabelled images" if stream else "the training split has"
            raise DatasetError(f"{what} {size} images, fewer than one batch of {self.global_batch}")

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        position = self.start_iter * self.global_batch
        tail = (self.stream,) if self.stream else ()
        while True:
            epoch, offset = divmod(position, self.per_epoch)
            order = np.random.default_rng([self.seed, epoch, *tail]).permutation(self.size)
            for start in range(offset, self.per_epoch, self.global_batch):
                mine = start + self.rank * self.batch_size
                for slot in range(mine, mine + self.batch_size):
                    yield int(order[slot]), (self.seed, epoch, slot, *tail)
            position = (epoch + 1) * self.per_epoch


class Batch(NamedTuple):
    """A training batch: the labelled images, then the learners' view of `rows` unlabelled ones (labels 255
    there, `unlabeled` marking their image pixels, B x H x W); `weak`: the teachers' view of those, where
    the learners see a strong one."""

    images: torch.Tensor
    labels: torch.Tensor
    unlabeled: torch.Tensor | None = None
    weak: torch.Tensor | None = None
    rows: int = 0


def lr_factor(iteration: int, total: int, cfg: OptimizerConfig) -> float:
    """Linear warm-up from 0, times poly decay to 0 at `total`."""
    warm = min(1.0, (iteration + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
    return warm * (1.0 - iteration / total) ** cfg.poly_power


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """Encoder and decoder groups (decoder lr x head_lr_mult); AdamW skips decay on norms and biases.
    `extra` (training-only projectors fed by this student) is trained like a decoder."""
    groups = []
    parts = [(model.encoder, 1.0), (model.decoder, cfg.head_lr_mult)]
    if extra is not None:
        parts.append((extra, cfg.head_lr_mult))
    for module, mult in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            continue
        if cfg.name == "adamw":
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            groups += [
                {"params": decay, "lr_mult": mult, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "lr_mult": mult, "weight_decay": 0.0},
            ]
        else:
            groups.append({"params": params, "lr_mult": mult, "weight_decay": cfg.weight_decay})
    # Fused kernels (CPU and CUDA): on the 2-core CPU the optimizer steps run 2-3x faster than the loop.
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


class Collaboration(nn.Module):
    """Both students and the objective as one module, so that DistributedDataParallel wraps the two
    students and the projectors together (one bucketed gradient all-reduce per step)."""

    def __init__(self, students: nn.ModuleDict, objective: Objective) -> None:
        super().__init__()
        self.students, self.objective = students, objective

    def forward(self, images: torch.Tensor, labels: torch.Tensor, progress: float, unlabeled: Unlabeled | None):
        cnn, vit = self.students["cnn"](images), self.students["vit"](images)
        losses, stats = self.objective(cnn, vit, labels, progress, unlabeled)
        return losses, stats, (cnn, vit)


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere oneDNN emulates it, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 or fp16 on CUDA; on a CPU bf16 only, and only where it is native."""
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.bfloat16 if amp == "bf16" and cpu_has_bf16() else None


class TrainingDiverged(RuntimeError):
    """A loss went NaN or infinite: the run stops before a checkpoint keeps such weights."""


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = distributed.current()
        self.device = resolve_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        if self.dist.enabled and self.cuda:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.slots = {name: slot_config(cfg, name) for name in STUDENTS}  # what each slot holds (method.pair)
        self.unlabeled_batch = max(1, round(cfg.data.batch_size * cfg.data.unlabeled_ratio))
        for field, size in (
            ("batch_size", cfg.data.batch_size),
            ("batch_size x unlabeled_ratio", self.unlabeled_batch),
        ):
            if size % self.dist.world:
                raise ConfigError(
                    f"data.{field}={size} (the global batch) does not split evenly over {self.dist.world} processes"
                )
        widths = (self.slots["cnn"].decoder_channels, self.slots["vit"].decoder_channels)
        terms = method_terms(cfg.method, Geometry(tuple(cfg.data.crop_size), widths))  # fails before data is read
        torch.manual_seed(cfg.seed)
        if self.cuda:  # TF32 matmuls for fp32 (cuDNN's convolutions use TF32 by default already)
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = True

        # Initial weights first (a hub download, a file check): a missing one fails before any data is read.
        # A resumed run takes every weight from its checkpoint.
        init = {name: None if resume else locate(self.slots[name], name) for name in STUDENTS}
        self.amp_dtype = amp_dtype(cfg.amp, self.device)
        self._load_data(resume, reads_unlabeled=bool(terms))
        self._describe(init, resume)
        self._build_models(init)
        self.optimizers = {
            name: build_optimizer(self.students[name], self.slots[name].optimizer, self.objective.learner_modules(name))
            for name in STUDENTS
        }
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.iteration, self.saved_at = 0, None
        self.best = {name: {"miou": -1.0, "iteration": 0} for name in STUDENTS}
        if resume:
            self.load_checkpoint()
            self.saved_at = self.iteration
        self.model: nn.Module = Collaboration(self.students, self.objective)
        if self.dist.enabled:
            self.model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.cuda else None)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / CONFIG_FILE)
            if cfg.data.labeled is not None:
                write_labeled(self.split, self.labeled, cfg.data.root, self.run_dir)

    def _load_data(self, resume: bool, reads_unlabeled: bool) -> None:
        """The splits, the dataset's classes recorded in the config, the labelled subset (a resumed run's own
        record) and the unlabelled images where a term reads them, and (data.verify) every mask read once."""
        data = self.cfg.data
        self.split = build_dataset(data, data.train_split, train=True)
        self.eval_set = build_dataset(data, data.eval_split, train=False)
        self.test_set = build_dataset(data, data.test_split, train=False) if data.test_split else None
        self._record_classes(self.split)
        recorded = self.run_dir / LABELED_FILE if resume and data.labeled is not None else None
        self.labeled = labeled_subset(self.split, data, recorded)
        self.train_set = self.split.subset(self.labeled)
        self.unlabeled_set = None
        if reads_unlabeled and (pool := unlabeled_images(self.split, self.labeled, data)):
            strong = self.cfg.method.views == "weak_strong"
            self.unlabeled_set = UnlabeledDataset(pool, self.split.transform, strong, f"{data.root}:unlabeled")
        elif data.unlabeled is not None or len(self.labeled) < len(self.split):
            log.info("the method trains no distillation term: the unlabelled images are not read")
        if data.verify:
            splits = [s for s in (self.train_set, self.eval_set, self.test_set) if s is not None]
            log.info("checking every mask of %s", ", ".join(s.name for s in splits))
            for split in splits:
                split.verify()

    def _build_models(self, init: dict) -> None:
        """Both students and the objective (with its training-only modules), on the device; the teachers of
        the pseudo-label terms beside them."""
        cfg, k = self.cfg, self.cfg.data.num_classes
        # Each slot's own student first, from the stream every arm of a seed shares (the same initial weights);
        # with method.pair, the partner of the named student then takes the other slot, from a stream of its own.
        own = [n for n in STUDENTS if cfg.method.pair in ("mixed", n)]
        students = nn.ModuleDict(
            {n: build_student(getattr(cfg, n), k, init[n] if n in own else None) for n in STUDENTS}
        )
        for partner in (n for n in STUDENTS if n not in own):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 3)
                students[partner] = build_student(self.slots[partner], k, init[partner])
        channels = {name: m.encoder.feature_info.channels() for name, m in students.items()}
        widths = (self.slots["cnn"].decoder_channels, self.slots["vit"].decoder_channels)
        geometry = Geometry(tuple(cfg.data.crop_size), widths, channels["cnn"], channels["vit"])
        # The objective's own modules draw from a generator of their own, so every method arm of one seed
        # trains with the same random stream (dropout) as `independent`: paired comparisons stay paired.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            objective = Objective(cfg.method, geometry, seed=cfg.seed + 2)
        if self.dist.enabled and self.cuda:  # a few images per GPU: batch statistics over all of them
            students = nn.SyncBatchNorm.convert_sync_batchnorm(students)
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        self.students, self.objective = students, objective
        for module in (self.students, self.objective):  # the projectors run on the students' features
            module.to(self.device)
            if self.cuda and cfg.channels_last:
                module.to(memory_format=torch.channels_last)
        if self.cuda and cfg.compile_losses:
            self.objective.compile_terms()
        with torch.random.fork_rng(devices=[]):  # an offline run's students are built: the stream stays paired
            weak = cfg.method.views == "weak_strong"
            self.teachers = Teachers(objective.teacher_sources, students, cfg.method, k, weak).to(self.device)

    def _record_classes(self, dataset: SegmentationDataset) -> None:
        data = self.cfg.data
        if data.num_classes not in (None, dataset.classes.num_classes):
            raise DatasetError(
                f"config says data.num_classes={data.num_classes}, the dataset has {dataset.classes.num_classes}"
            )
        data.num_classes = dataset.classes.num_classes
        data.class_names = dataset.classes.names
        data.palette = dataset.classes.palette

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- one training step -------------------------------------------------------------------

    def step(self, batch: Batch, diagnose: bool = False) -> dict[str, torch.Tensor]:
        """One optimisation step; returns detached scalar tensors (read them only when logging: on a
        GPU every `.item()` waits for the step to finish). `diagnose` adds each distillation term's
        gradient-norm ratio to CE (`Objective.grad_ratios`: extra backward passes, for log steps)."""
        for name, optimizer in self.optimizers.items():
            factor = lr_factor(self.iteration, self.cfg.iterations, self.slots[name].optimizer)
            for group in optimizer.param_groups:
                group["lr"] = self.slots[name].optimizer.lr * group["lr_mult"] * factor

        progress = self.iteration / self.cfg.iterations
        with self.autocast():
            unlabeled = None
            if batch.rows:
                seen = batch.weak if batch.weak is not None else batch.images[-batch.rows :]
                unlabeled = Unlabeled(batch.rows, batch.unlabeled, self.teachers.predict(self.students, seen))
            losses, stats, outputs = self.model(batch.images, batch.labels, progress, unlabeled)
        total = sum(losses.values())
        if diagnose and len(losses) > 2:
            stats = {**stats, **self.objective.grad_ratios(*outputs, losses)}

        self.scaler.scale(total).backward()
        norms = {}
        for name, optimizer in self.optimizers.items():
            clip = self.slots[name].optimizer.grad_clip
            if clip > 0:
                self.scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
                params = [p for group in optimizer.param_groups for p in group["params"]]
                norms[f"grad_norm_{name}"] = torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.teachers.update(self.students)
        self.iteration += 1
        return {"loss": total.detach(), **{k: v.detach() for k, v in losses.items()}, **stats, **norms}

    def _describe(self, init: dict, resume: bool) -> None:
        """What a long run is about to train on, before its first step."""
        cfg = self.cfg
        splits = [s for s in (self.split, self.eval_set, self.test_set) if s is not None]
        counts = ", ".join(f"{s.name.rsplit(':', 1)[-1]} {len(s)}" for s in splits)
        if len(self.train_set) < len(self.split):
            counts += f"; {len(self.train_set)} of the train split labelled"
        if self.unlabeled_set is not None:
            counts += f", {len(self.unlabeled_set)} unlabelled ({self.unlabeled_batch} a batch)"
        where = torch.cuda.get_device_name(self.device) if self.cuda else f"{torch.get_num_threads()} threads"
        precision = f"autocast {str(self.amp_dtype).removeprefix('torch.')}" if self.amp_dtype else "fp32"
        log.info("device %s (%s), %s, torch %s", self.device, where, precision, torch.__version__)
        log.info("dataset %s (%s): %s images", cfg.data.root, cfg.data.format, counts)
        log.info("%d classes: %s", cfg.data.num_classes, ", ".join(cfg.data.class_names))
        for name in STUDENTS:
            student = self.slots[name]
            source = "from the checkpoint" if resume else f"encoder from {init[name]}" if init[name] else "random init"
            log.info("%s: %s on %s, %s", name, student.arch, student.backbone, source)

    # --- the loop ------------------------------------------------------------------------------

    def train_loader(self) -> torch.utils.data.DataLoader:
        d = self.cfg.data
        per_rank = d.batch_size // self.dist.world
        sampler = ResumableSampler(
            len(self.train_set), per_rank, self.cfg.seed, self.iteration, self.dist.rank, self.dist.world
        )
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=per_rank,
            sampler=sampler,
            num_workers=d.num_workers,
            pin_memory=self.cuda,
            drop_last=True,
            persistent_workers=d.num_workers > 0,
            # Its own generator: a loader draws a base seed when iterated, which must not move the
            # global RNG (dropout) differently in a resumed run.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def unlabeled_loader(self) -> torch.utils.data.DataLoader:
        """The unlabelled images' own endless stream (sampler stream 1), resumable like the labelled one."""
        per_rank = self.unlabeled_batch // self.dist.world
        sampler = ResumableSampler(
            len(self.unlabeled_set), per_rank, self.cfg.seed, self.iteration, self.dist.rank, self.dist.world, stream=1
        )
        d = self.cfg.data
        return torch.utils.data.DataLoader(
            self.unlabeled_set,
            batch_size=per_rank,
            sampler=sampler,
            num_workers=d.num_workers,
            pin_memory=self.cuda,
            drop_last=True,
            persistent_workers=d.num_workers > 0,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def batch(self, labeled: tuple[torch.Tensor, torch.Tensor], unlabeled: tuple | None) -> Batch:
        """One batch on the device: the labelled images, then the learners' view of the unlabelled ones."""
        device, channels_last = self.device, self.cuda and self.cfg.channels_last
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        layout = lambda x: x.contiguous(memory_format=torch.channels_last) if channels_last else x  # noqa: E731
        images, labels = move(labeled[0]), move(labeled[1])
        if unlabeled is None:
            return Batch(layout(images), labels)
        *views, pixels = (move(t) for t in unlabeled)
        weak, strong = (views[0], views[1]) if len(views) == 2 else (None, views[0])
        rows = strong.shape[0]
        images = torch.cat([images, strong])
        mask = torch.cat([torch.zeros_like(labels, dtype=torch.bool), pixels])
        labels = torch.cat([labels, torch.full_like(labels[:1].expand(rows, -1, -1), IGNORE_INDEX)])
        return Batch(layout(images), labels, mask, None if weak is None else layout(weak), rows)

    def fit(self) -> dict:
        writer = (
            SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.iteration or None)
            if self.dist.is_main
            else None
        )
        try:  # a run that stops (diverged, interrupted, a bad batch) still flushes what it logged
            self._train(writer)
        finally:
            if writer is not None:
                writer.close()
        return self.final_metrics()

    def _train(self, writer: SummaryWriter | None) -> None:
        cfg, main = self.cfg, self.dist.is_main
        batches = iter(self.train_loader())
        unlabeled = iter(self.unlabeled_loader()) if self.unlabeled_set is not None else None
        show_bar = main and sys.stderr.isatty()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not show_bar, dynamic_ncols=True)
        started, start_iter = time.perf_counter(), self.iteration
        self.model.train()
        while self.iteration < cfg.iterations:
            batch = self.batch(next(batches), next(unlabeled) if unlabeled is not None else None)
            it = self.iteration + 1
            diagnose = main and it % cfg.log_interval == 0
            logs = self.step(batch, diagnose)
            bar.update(1)
            log_now = it % cfg.log_interval == 0 or it == cfg.iterations
            if log_now or it % cfg.checkpoint_interval == 0:  # before a checkpoint could keep NaN weights
                self._stop_if_diverged(logs)
            if main and (log_now or (show_bar and it % _BAR_INTERVAL == 0)):
                self._report(logs, writer, bar, log_now, show_bar, (it - start_iter) / (time.perf_counter() - started))
            if it % cfg.eval_interval == 0 or it == cfg.iterations:
                self.evaluate_and_keep_best(writer)
            if it % cfg.checkpoint_interval == 0 or it == cfg.iterations:
                self.save_checkpoint()
        bar.close()

    def _stop_if_diverged(self, logs: dict) -> None:
        """A non-finite loss never recovers: stop with what to change instead of training NaN weights."""
        bad = {k: float(v) for k, v in logs.items() if k in _LOSSES and not torch.isfinite(v)}
        if len(bad) > 1:
            bad.pop("loss", None)  # the sum: its parts say which student
        if not bad:
            return
        kept = (
            f"The checkpoint of iteration {self.saved_at} is intact: continue from it with a steadier recipe, "
            f"e.g. `python -m train --resume {self.run_dir} amp=none`"
            if self.saved_at is not None
            else "No checkpoint was saved yet: train again with a steadier recipe, e.g. amp=none"
        )
        raise TrainingDiverged(
            f"training diverged at iteration {self.iteration}: "
            + ", ".join(f"{k} is {v}" for k, v in bad.items())
            + f". {kept}, a lower <student>.optimizer.lr or <student>.optimizer.grad_clip=1 "
            "(bf16 autocast diverged where fp32 did not: SegFormer from random init at 256x256 on a GPU)"
        )

    def _report(self, logs: dict, writer: SummaryWriter, bar: tqdm, log_now: bool, show_bar: bool, rate: float):
        """Progress bar (loss, learning rates, who teaches whom) and, every log_interval, TensorBoard."""
        it, cfg = self.iteration, self.cfg
        values = {k: float(v) for k, v in logs.items()}  # one device sync, only here
        lrs = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
        bar.set_postfix(
            loss=f"{values['loss']:.3f}",
            lr_cnn=f"{lrs['cnn']:.1e}",
            lr_vit=f"{lrs['vit']:.1e}",
            **{_SHORT[k]: f"{v:.2f}" for k, v in values.items() if k in _SHORT},
            refresh=False,
        )
        if not log_now:
            return
        for key, value in values.items():
            writer.add_scalar(f"train/{key}", value, it)
        for name, lr in lrs.items():
            writer.add_scalar(f"lr/{name}", lr, it)
        if not show_bar:
            eta = (cfg.iterations - it) / rate if rate > 0 else float("nan")
            log.info("it %d/%d  loss %.4f  %.2f it/s  eta %.0fs", it, cfg.iterations, values["loss"], rate, eta)

    def _sync_buffers(self) -> None:
        """BatchNorm running statistics drift apart between ranks (each sees its own images); evaluate
        and save rank 0's, which DistributedDataParallel also broadcasts at every forward."""
        if self.dist.enabled:
            for buffer in self.students.buffers():
                torch.distributed.broadcast(buffer, 0)

    def _eval_loader(self, max_images: int | None = None, dataset=None) -> torch.utils.data.DataLoader:
        d = self.cfg.data
        dataset = self.eval_set if dataset is None else dataset
        return eval_loader(dataset, d.eval_batch_size, d.num_workers, max_images, self.dist.rank, self.dist.world)

    def evaluate_and_keep_best(self, writer: SummaryWriter | None) -> dict:
        """Every rank evaluates its share of the eval split; the confusion matrices are summed."""
        d = self.cfg.data
        self._sync_buffers()
        loader = self._eval_loader(d.eval_max_images)
        results = evaluate(dict(self.students), loader, d.num_classes, self.device, self.cfg.eval, d.crop_size)
        improved = [name for name in STUDENTS if results[name]["miou"] > self.best[name]["miou"]]
        for name in improved:
            self.best[name] = {"miou": results[name]["miou"], "iteration": self.iteration}
        if not self.dist.is_main:
            return results
        for model, r in results.items():
            writer.add_scalar(f"val/{model}/miou", r["miou"], self.iteration)
            writer.add_scalar(f"val/{model}/acc", r["acc"], self.iteration)
        summary = "  ".join(f"{m} {100 * r['miou']:.2f}" for m, r in results.items())
        log.info("it %d  val mIoU  %s", self.iteration, summary)
        for name in improved:
            info = {"student": name, "arch": self.slots[name].arch, **self.best[name]}
            save_weights(self.students[name], weights_file(self.run_dir, name), info)
        return results

    def final_metrics(self) -> dict:
        """Evaluate the best weights of both students (and their ensemble) on the full eval split. With a
        test split (`data.test_split`), also the best weights (chosen on the eval split) and the last
        ones on it: the held-out numbers to report."""
        d = self.cfg.data
        distributed.barrier()  # rank 0 has written the best weights
        best = {name: m.to(self.device) for name, m in load_students(self.run_dir, self.cfg).items()}

        def run(students: dict, loader) -> dict:
            return evaluate(students, loader, d.num_classes, self.device, self.cfg.eval, d.crop_size)

        results = run(best, self._eval_loader())
        for name in STUDENTS:
            results[name]["iteration"] = self.best[name]["iteration"]
        metrics = {"dataset": d.root, "split": d.eval_split, "iteration": self.iteration, **results}
        if self.test_set is not None:
            self._sync_buffers()
            test = self._eval_loader(dataset=self.test_set)
            metrics["test"] = {"split": d.test_split, "best": run(best, test), "last": run(dict(self.students), test)}
        if self.dist.is_main:
            (self.run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
            log.info("best weights on %s:%s\n%s", d.root, d.eval_split, format_table(results, d.class_names))
            if "test" in metrics:
                log.info("on %s, best (by %s) and last weights:", d.test_split, d.eval_split)
                for which in ("best", "last"):
                    log.info("%s\n%s", which, format_table(metrics["test"][which], d.class_names))
        return metrics

    # --- resumable state ----------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        self._sync_buffers()
        if not self.dist.is_main:
            return
        state = {
            "iteration": self.iteration,
            "best": self.best,
            "students": {name: m.state_dict() for name, m in self.students.items()},
            "objective": self.objective.state_dict(),
            "teachers": self.teachers.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "selection": self.objective.generator.get_state()},
        }
        if self.cuda:
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        save_state(state, self.run_dir / CHECKPOINT_FILE)
        self.saved_at = self.iteration

    def load_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: no checkpoint at {path}")
        state = load_state(path)
        self.objective.load_state_dict(state["objective"])
        self.teachers.load_state_dict(state.get("teachers", {}))
        for name in STUDENTS:
            self.students[name].load_state_dict(state["students"][name])
            self.optimizers[name].load_state_dict(state["optimizers"][name])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "selection" in state["rng"]:
            self.objective.generator.set_state(state["rng"]["selection"])
        if self.cuda and "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.iteration, self.best = state["iteration"], state["best"]
        log.info("resumed %s at iteration %d", self.run_dir, self.iteration)
