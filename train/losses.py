"""Loss terms over two `StudentOutput`s (METHOD.md §3-6), each written once for both directions.

Every distillation target is detached and every mask is computed without gradient, so one
backward pass of the summed terms trains each student only on its learner side. Pixel terms are
averaged over valid (non-ignore) pixels, so no term grows with batch or image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.config import MethodConfig
from train.data import IGNORE_INDEX
from train.models import StudentOutput

# term -> its MethodConfig weight (every distillation term also ramps up over method.warmup)
WEIGHTS = {"hfd": "hfd_weight", "region_bsd": "region_weight", "pixel_bsd": "pixel_weight", "dml": "dml_weight"}
PRESETS = {
    "independent": [],
    "dml": ["dml"],
    "hfd": ["hfd"],
    "bsd": ["region_bsd", "pixel_bsd"],
    "full": ["hfd", "region_bsd", "pixel_bsd"],
}


def upsample_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits at label resolution, in fp32 (losses and metrics never downsample labels)."""
    if logits.shape[-2:] == labels.shape[-2:]:
        return logits.float()
    return F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)


def pixel_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel CE (B x H x W) at label resolution, 0 at ignore pixels."""
    return F.cross_entropy(upsample_logits(logits, labels), labels, ignore_index=IGNORE_INDEX, reduction="none")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, per_pixel: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over labelled pixels; 0 (with a graph) when a batch has none."""
    per_pixel = pixel_ce(logits, labels) if per_pixel is None else per_pixel
    return per_pixel.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


def channel_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Parameter-free normalisation over channels at each position: a ViT token and a post-ReLU CNN
    activation become comparable."""
    x = x.float()
    x = x - x.mean(1, keepdim=True)
    return x * torch.rsqrt(x.square().mean(1, keepdim=True) + eps)


def _distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position distance (B x H x W) between two B x C x H x W maps."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=1)
    return (a - b).square().mean(1)


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def hfd_loss(
    f_cnn: torch.Tensor, f_vit: torch.Tensor, cnn_to_vit: nn.Module, vit_to_cnn: nn.Module, distance: str = "mse"
) -> torch.Tensor:
    """Heterogeneous feature distillation: each student's projected low-level feature imitates the
    other's detached, channel-normalised feature."""
    to_vit = _resize(cnn_to_vit(f_cnn), f_vit).float()
    to_cnn = _resize(vit_to_cnn(f_vit), f_cnn).float()
    return (
        _distance(to_vit, channel_norm(f_vit).detach(), distance).mean()
        + _distance(to_cnn, channel_norm(f_cnn).detach(), distance).mean()
    )


def _region_mean(x: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of a B x H x W map over k x k cells, and the weight in each cell."""
    total = F.avg_pool2d((x * weight)[:, None], k, ceil_mode=True)[:, 0]
    mass = F.avg_pool2d(weight[:, None], k, ceil_mode=True)[:, 0]
    return total / mass.clamp(min=1e-12), mass


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def region_bsd_loss(
    cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, region_size: int = 8, criterion: str = "ce"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Region-wise BSD: in each k x k region of the stride-4 grid, the student with the lower mean CE
    (or entropy) there teaches the other its decoder feature; regions without labels are skipped."""
    grid = cnn.feat.shape[-2:]
    with torch.no_grad():
        small = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long()
        valid = (small != IGNORE_INDEX).float()
        if criterion == "entropy":  # label-free confidence: every region counts
            valid = torch.ones_like(valid)
            loss_c, loss_v = _entropy(cnn.logits), _entropy(vit.logits)
        else:
            target = small.masked_fill(small == IGNORE_INDEX, 0)
            loss_c = F.cross_entropy(cnn.logits.float(), target, reduction="none")
            loss_v = F.cross_entropy(vit.logits.float(), target, reduction="none")
        region_c, mass = _region_mean(loss_c, valid, region_size)
        region_v, _ = _region_mean(loss_v, valid, region_size)
        has_labels = mass > 0
        vit_teaches = has_labels & (region_v < region_c)
        cnn_teaches = has_labels & (region_c < region_v)
        regions = has_labels.sum().clamp(min=1)

    norm_c, norm_v = channel_norm(cnn.feat), channel_norm(vit.feat)
    ones = torch.ones_like(norm_c[:, 0])
    cnn_learns, _ = _region_mean(_distance(norm_c, norm_v.detach(), "mse"), ones, region_size)
    vit_learns, _ = _region_mean(_distance(norm_v, norm_c.detach(), "mse"), ones, region_size)
    loss = ((cnn_learns * vit_teaches).sum() + (vit_learns * cnn_teaches).sum()) / regions
    stats = {
        "region_vit_to_cnn": vit_teaches.sum() / regions,
        "region_cnn_to_vit": cnn_teaches.sum() / regions,
    }
    return loss, stats


def _kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL(teacher || student) from log-probabilities over dim 1, teacher detached."""
    p = teacher_logp.detach()
    return (p.exp() * (p - student_logp)).sum(1)


def pixel_bsd_loss(
    cnn_logits: torch.Tensor,
    vit_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    criterion: str = "correct_then_ce",
    ce: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel-wise BSD: at each labelled pixel the reliable student (correct, and of lower CE when both
    are) teaches the other its distribution; where both are wrong nothing is transferred.

    `ce`: the students' per-pixel CE when the caller has it already (the CE terms' own, see `pixel_ce`).
    """
    zc, zv = upsample_logits(cnn_logits, labels), upsample_logits(vit_logits, labels)
    with torch.no_grad():
        valid = labels != IGNORE_INDEX
        ce_c, ce_v = (c.detach() for c in ce) if ce is not None else (pixel_ce(zc, labels), pixel_ce(zv, labels))
        if criterion == "ce":
            vit_teaches, cnn_teaches = valid & (ce_v < ce_c), valid & (ce_c < ce_v)
        else:
            right_c, right_v = zc.argmax(1) == labels, zv.argmax(1) == labels
            vit_teaches = valid & right_v & (~right_c | (ce_v < ce_c))
            cnn_teaches = valid & right_c & (~right_v | (ce_c < ce_v))
        n_valid = valid.sum().clamp(min=1)
    t2 = temperature**2
    logp_c, logp_v = (zc / temperature).log_softmax(1), (zv / temperature).log_softmax(1)
    cnn_learns = (_kl(logp_v, logp_c) * vit_teaches).sum() / vit_teaches.sum().clamp(min=1)
    vit_learns = (_kl(logp_c, logp_v) * cnn_teaches).sum() / cnn_teaches.sum().clamp(min=1)
    stats = {
        "pixel_vit_to_cnn": vit_teaches.sum() / n_valid,
        "pixel_cnn_to_vit": cnn_teaches.sum() / n_valid,
    }
    return t2 * (cnn_learns + vit_learns), stats


def dml_loss(cnn_logits: torch.Tensor, vit_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """Deep mutual learning: symmetric KL to the detached peer on every labelled pixel."""
    zc, zv = upsample_logits(cnn_logits, labels), upsample_logits(vit_logits, labels)
    valid = labels != IGNORE_INDEX
    logp_c, logp_v = (zc / temperature).log_softmax(1), (zv / temperature).log_softmax(1)
    kl = _kl(logp_v, logp_c) + _kl(logp_c, logp_v)
    return temperature**2 * (kl * valid).sum() / valid.sum().clamp(min=1)


def projector(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))


class Objective(nn.Module):
    """CE of both students plus the method's distillation terms, as named, weighted terms.

    Holds the training-only HFD projectors (`cnn_to_vit.*` follow the CNN's optimizer, `vit_to_cnn.*`
    the ViT's); they are never part of a student's saved weights.
    """

    def __init__(self, cfg: MethodConfig, cnn_channels: list[int], vit_channels: list[int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.terms = list(cfg.terms) if cfg.terms is not None else PRESETS[cfg.preset]
        self.cnn_to_vit, self.vit_to_cnn = nn.ModuleDict(), nn.ModuleDict()
        if "hfd" in self.terms:
            for s in cfg.hfd_stages:
                if not 1 <= s <= min(len(cnn_channels), len(vit_channels)):
                    raise ValueError(f"method.hfd_stages: stage {s} does not exist (1..{len(vit_channels)})")
                self.cnn_to_vit[str(s)] = projector(cnn_channels[s - 1], vit_channels[s - 1])
                self.vit_to_cnn[str(s)] = projector(vit_channels[s - 1], cnn_channels[s - 1])

    def ramp(self, progress: float) -> float:
        return min(1.0, progress / self.cfg.warmup) if self.cfg.warmup > 0 else 1.0

    def forward(
        self, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, progress: float
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        losses, stats = self.unweighted(cnn, vit, labels)
        ramp = self.ramp(progress)
        for name in self.terms:
            losses[name] = ramp * getattr(self.cfg, WEIGHTS[name]) * losses[name]
        return losses, stats

    def unweighted(
        self, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every term at weight 1: the tensor work of a step, with no per-step Python value in it, so that
        `compile_terms` compiles it once."""
        c = self.cfg
        # Full-resolution logits and per-pixel CE once per step, shared by every pixel term.
        zc, zv = upsample_logits(cnn.logits, labels), upsample_logits(vit.logits, labels)
        ce_c, ce_v = pixel_ce(zc, labels), pixel_ce(zv, labels)
        losses = {"ce_cnn": cross_entropy(zc, labels, ce_c), "ce_vit": cross_entropy(zv, labels, ce_v)}
        stats: dict[str, torch.Tensor] = {}
        if "hfd" in self.terms:
            losses["hfd"] = sum(
                hfd_loss(
                    cnn.low[s - 1], vit.low[s - 1], self.cnn_to_vit[str(s)], self.vit_to_cnn[str(s)], c.hfd_distance
                )
                for s in c.hfd_stages
            )
        if "region_bsd" in self.terms:
            losses["region_bsd"], s = region_bsd_loss(cnn, vit, labels, c.region_size, c.region_criterion)
            stats.update(s)
        if "pixel_bsd" in self.terms:
            losses["pixel_bsd"], s = pixel_bsd_loss(zc, zv, labels, c.temperature, c.pixel_criterion, ce=(ce_c, ce_v))
            stats.update(s)
        if "dml" in self.terms:
            losses["dml"] = dml_loss(zc, zv, labels, c.temperature)
        return losses, stats

    def compile_terms(self) -> None:
        """Fuse the terms' element-wise work at label and stride-4 resolution (GPU: some 20 ms a step at
        512x1024, batch 8, unfused). Parameter names, and so checkpoints, stay as they are."""
        self.unweighted = torch.compile(self.unweighted)
