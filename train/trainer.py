"""The collaborative trainer: two students, one batch stream, one objective, two optimizers.

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

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from train.checkpoint import load_state, save_state, save_weights
from train.config import Config, OptimizerConfig, save_config
from train.data import DatasetError, SegmentationDataset, build_dataset
from train.evaluate import eval_loader, evaluate, format_table
from train.losses import Objective
from train.models import build_student
from train.run_dir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    STUDENTS,
    load_students,
    resolve_device,
    weights_file,
)

log = logging.getLogger(__name__)
# Progress-bar names of the direction shares: region (r) and pixel (p) BSD, ViT->CNN and CNN->ViT.
_SHORT = {
    "region_vit_to_cnn": "r_v2c",
    "region_cnn_to_vit": "r_c2v",
    "pixel_vit_to_cnn": "p_v2c",
    "pixel_cnn_to_vit": "p_c2v",
}


class ResumableSampler(torch.utils.data.Sampler):
    """Endless shuffled stream of `(index, augmentation seed)` that can start at any iteration.

    Epoch e is a permutation drawn from (seed, e); each sample's augmentation seed is
    (seed, e, position). So the data seen from iteration i on is the same whether training ran
    straight through or was killed and resumed, and it does not depend on the worker count.
    With `world > 1`, rank r takes its slice of every global batch (distributed training).
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_iter: int = 0, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_iter, self.rank, self.world = start_iter, rank, world
        self.global_batch = batch_size * world
        self.per_epoch = size // self.global_batch * self.global_batch
        if self.per_epoch == 0:
            raise DatasetError(f"the training split has {size} images, fewer than one batch of {self.global_batch}")

    def __iter__(self) -> Iterator[tuple[int, tuple[int, int, int]]]:
        position = self.start_iter * self.global_batch
        while True:
            epoch, offset = divmod(position, self.per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            for start in range(offset, self.per_epoch, self.global_batch):
                mine = start + self.rank * self.batch_size
                for slot in range(mine, mine + self.batch_size):
                    yield int(order[slot]), (self.seed, epoch, slot)
            position = (epoch + 1) * self.per_epoch


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
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = resolve_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(cfg.seed)

        self.train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
        self.eval_set = build_dataset(cfg.data, cfg.data.eval_split, train=False)
        self._record_classes(self.train_set)
        if cfg.data.verify:
            log.info("checking every mask of %s and %s", self.train_set.name, self.eval_set.name)
            self.train_set.verify()
            self.eval_set.verify()

        k = cfg.data.num_classes
        self.students = nn.ModuleDict({name: build_student(getattr(cfg, name), k) for name in STUDENTS})
        channels = {name: m.encoder.feature_info.channels() for name, m in self.students.items()}
        self.objective = Objective(cfg.method, channels["cnn"], channels["vit"])
        for module in (self.students, self.objective):  # the projectors run on the students' features
            module.to(self.device)
            if self.cuda and cfg.channels_last:
                module.to(memory_format=torch.channels_last)
        projectors = {"cnn": self.objective.cnn_to_vit, "vit": self.objective.vit_to_cnn}
        self.optimizers = {
            name: build_optimizer(self.students[name], getattr(cfg, name).optimizer, projectors[name])
            for name in STUDENTS
        }
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if self.cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.iteration = 0
        self.best = {name: {"miou": -1.0, "iteration": 0} for name in STUDENTS}
        if resume:
            self.load_checkpoint()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / CONFIG_FILE)

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
        return torch.autocast("cuda", dtype=self.amp_dtype)

    # --- one training step -------------------------------------------------------------------

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        for name, optimizer in self.optimizers.items():
            factor = lr_factor(self.iteration, self.cfg.iterations, getattr(self.cfg, name).optimizer)
            for group in optimizer.param_groups:
                group["lr"] = getattr(self.cfg, name).optimizer.lr * group["lr_mult"] * factor

        with self.autocast():
            cnn, vit = self.students["cnn"](images), self.students["vit"](images)
            losses, stats = self.objective(cnn, vit, labels, progress=self.iteration / self.cfg.iterations)
        total = sum(losses.values())

        self.scaler.scale(total).backward()
        for optimizer in self.optimizers.values():
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        return {"loss": total.item(), **{k: v.item() for k, v in losses.items()}, **stats}

    # --- the loop ------------------------------------------------------------------------------

    def train_loader(self) -> torch.utils.data.DataLoader:
        d = self.cfg.data
        sampler = ResumableSampler(len(self.train_set), d.batch_size, self.cfg.seed, self.iteration)
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=d.batch_size,
            sampler=sampler,
            num_workers=d.num_workers,
            pin_memory=self.cuda,
            drop_last=True,
            persistent_workers=d.num_workers > 0,
            # Its own generator: a loader draws a base seed when iterated, which must not move the
            # global RNG (dropout) differently in a resumed run.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def fit(self) -> dict:
        cfg = self.cfg
        writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.iteration or None)
        batches = iter(self.train_loader())
        show_bar = sys.stderr.isatty()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not show_bar, dynamic_ncols=True)
        started, start_iter = time.perf_counter(), self.iteration
        self.students.train()
        self.objective.train()
        while self.iteration < cfg.iterations:
            images, labels = next(batches)
            images = images.to(self.device, non_blocking=True)
            if self.cuda and cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logs = self.step(images, labels.to(self.device, non_blocking=True))
            lrs = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
            bar.update(1)
            bar.set_postfix(
                loss=f"{logs['loss']:.3f}",
                lr_cnn=f"{lrs['cnn']:.1e}",
                lr_vit=f"{lrs['vit']:.1e}",
                **{_SHORT[k]: f"{v:.2f}" for k, v in logs.items() if k in _SHORT},  # who teaches whom
            )
            it = self.iteration
            if it % cfg.log_interval == 0 or it == cfg.iterations:
                for key, value in logs.items():
                    writer.add_scalar(f"train/{key}", value, it)
                for name, lr in lrs.items():
                    writer.add_scalar(f"lr/{name}", lr, it)
                if not show_bar:
                    rate = (it - start_iter) / (time.perf_counter() - started)
                    eta = (cfg.iterations - it) / rate if rate > 0 else float("nan")
                    log.info("it %d/%d  loss %.4f  %.2f it/s  eta %.0fs", it, cfg.iterations, logs["loss"], rate, eta)
            if it % cfg.eval_interval == 0 or it == cfg.iterations:
                self.evaluate_and_keep_best(writer)
            if it % cfg.checkpoint_interval == 0 or it == cfg.iterations:
                self.save_checkpoint()
        bar.close()
        writer.close()
        return self.final_metrics()

    def evaluate_and_keep_best(self, writer: SummaryWriter) -> dict:
        d = self.cfg.data
        loader = eval_loader(self.eval_set, d.eval_batch_size, d.num_workers, d.eval_max_images)
        results = evaluate(
            dict(self.students), loader, d.num_classes, self.device, self.cfg.eval, d.crop_size, self.autocast
        )
        for model, r in results.items():
            writer.add_scalar(f"val/{model}/miou", r["miou"], self.iteration)
            writer.add_scalar(f"val/{model}/acc", r["acc"], self.iteration)
        summary = "  ".join(f"{m} {100 * r['miou']:.2f}" for m, r in results.items())
        log.info("it %d  val mIoU  %s", self.iteration, summary)
        for name in STUDENTS:
            if results[name]["miou"] > self.best[name]["miou"]:
                self.best[name] = {"miou": results[name]["miou"], "iteration": self.iteration}
                info = {"student": name, "arch": getattr(self.cfg, name).arch, **self.best[name]}
                save_weights(self.students[name], weights_file(self.run_dir, name), info)
        return results

    def final_metrics(self) -> dict:
        """Evaluate the best weights of both students (and their ensemble) on the full eval split."""
        d = self.cfg.data
        best = {name: m.to(self.device) for name, m in load_students(self.run_dir, self.cfg).items()}
        loader = eval_loader(self.eval_set, d.eval_batch_size, d.num_workers)
        results = evaluate(best, loader, d.num_classes, self.device, self.cfg.eval, d.crop_size, self.autocast)
        for name in STUDENTS:
            results[name]["iteration"] = self.best[name]["iteration"]
        metrics = {"dataset": d.root, "split": d.eval_split, "iteration": self.iteration, **results}
        (self.run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        log.info("best weights on %s:%s\n%s", d.root, d.eval_split, format_table(results, d.class_names))
        return metrics

    # --- resumable state ----------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        state = {
            "iteration": self.iteration,
            "best": self.best,
            "students": {name: m.state_dict() for name, m in self.students.items()},
            "objective": self.objective.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
        }
        if self.cuda:
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        save_state(state, self.run_dir / CHECKPOINT_FILE)

    def load_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: no checkpoint at {path}")
        state = load_state(path)
        self.objective.load_state_dict(state["objective"])
        for name in STUDENTS:
            self.students[name].load_state_dict(state["students"][name])
            self.optimizers[name].load_state_dict(state["optimizers"][name])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.cuda and "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.iteration, self.best = state["iteration"], state["best"]
        log.info("resumed %s at iteration %d", self.run_dir, self.iteration)
