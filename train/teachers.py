"""The models that label unlabelled images for the pseudo-label terms (`train.losses.Term.teacher`): the live
students, each student's moving average (`ema`) and a finished run's students, frozen (`offline`)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from train.config import ConfigError, MethodConfig
from train.run_dir import load_run_config, load_students


class Teachers(nn.Module):
    """Only the moving averages are state (they go into the checkpoint); the offline students are read again
    from their run dir on a resume. `weak_views`: the teachers see the weak view of each unlabelled crop
    while the learners see the strong one, so even the live students run once more, without gradient."""

    def __init__(
        self, sources: set[str], students: nn.ModuleDict, cfg: MethodConfig, num_classes: int, weak_views: bool
    ) -> None:
        super().__init__()
        self.sources, self.decay, self.weak_views = sources, cfg.ema_decay, weak_views
        self.ema = None
        if "ema" in sources:
            self.ema = copy.deepcopy(students).requires_grad_(False).eval()
        self._offline = {}  # not a submodule: kept out of the checkpoint
        if "offline" in sources:
            self._offline = self._frozen_run(Path(cfg.offline_run), num_classes, next(students.parameters()).device)

    @staticmethod
    def _frozen_run(run_dir: Path, num_classes: int, device: torch.device) -> dict[str, nn.Module]:
        where = f"method.offline_run={str(run_dir)!r}"
        try:
            cfg = load_run_config(run_dir)
            if cfg.data.num_classes != num_classes:
                raise ConfigError(f"its students know {cfg.data.num_classes} classes, this dataset {num_classes}")
            students = load_students(run_dir, cfg)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
        return {name: model.requires_grad_(False).to(device) for name, model in students.items()}

    @torch.no_grad()
    def update(self, students: nn.ModuleDict) -> None:
        """One step of the moving averages: parameters by `ema_decay`, BatchNorm statistics copied."""
        if self.ema is None:
            return
        for average, student in zip(self.ema.parameters(), students.parameters(), strict=True):
            average.lerp_(student.detach(), 1 - self.decay)
        for average, student in zip(self.ema.buffers(), students.buffers(), strict=True):
            average.copy_(student)

    @torch.no_grad()
    def predict(self, students: nn.ModuleDict, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each source's logits (cnn, vit slot) on the teachers' view of the unlabelled images. `live` on the
        learners' own view is left to the objective, which has those outputs already."""
        models = {"live": students, "ema": self.ema, "offline": self._offline}
        out = {}
        for source in sorted(self.sources):
            if source == "live" and not self.weak_views:
                continue
            pair = models[source]
            if source != "live":
                for model in pair.values():
                    model.eval()
            out[source] = (pair["cnn"](images).logits, pair["vit"](images).logits)
        return out
