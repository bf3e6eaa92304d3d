"""Loss terms over two `StudentOutput`s (docs/method.md), each written once for both directions.

Every distillation target is detached and every mask is computed without gradient, so one
backward pass of the summed terms trains each student only on its learner side. Pixel terms are
averaged over valid (non-ignore) pixels, so no term grows with batch or image size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.config import MethodConfig
from train.data import IGNORE_INDEX
from train.models import StudentOutput

# term -> its MethodConfig weight (every distillation term also follows the method's schedule)
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


def _cells(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """B x C x H x W -> B x C x gh x gw x (kh*kw): the positions of each kh x kw cell, zero-padded."""
    b, c, h, w = x.shape
    x = F.pad(x, (0, -w % kw, 0, -h % kh))
    gh, gw = x.shape[2] // kh, x.shape[3] // kw
    return x.view(b, c, gh, kh, gw, kw).permute(0, 1, 2, 4, 3, 5).reshape(b, c, gh, gw, kh * kw)


def feature_distance(
    learner: torch.Tensor, target: torch.Tensor, kind: str = "mse", cell: int | None = None, tau: float = 4.0
) -> torch.Tensor:
    """Distance of a learner's feature map to a detached target in each `cell` x `cell` cell of the
    grid (None: the whole map is one cell): B x gh x gw.

    mse / cosine: per position (over channels), averaged over the cell. cwd: channel-wise distribution
    distance (Shu et al., ICCV 2021): each channel is a softmax over the cell's positions at
    temperature `tau`, KL(target || learner) * tau^2, averaged over channels.
    """
    target = target.detach().float()
    learner = learner.float()
    kh, kw = (learner.shape[-2], learner.shape[-1]) if cell is None else (cell, cell)
    if kind == "cwd":
        inside = _cells(torch.ones_like(learner[:1, :1]), kh, kw) > 0
        logq = (_cells(learner, kh, kw) / tau).masked_fill(~inside, -math.inf).log_softmax(-1)
        logp = (_cells(target, kh, kw) / tau).masked_fill(~inside, -math.inf).log_softmax(-1)
        kl = torch.where(inside, logp.exp() * (logp - logq), 0.0).sum(-1)
        return tau**2 * kl.mean(1)
    if kind == "cosine":
        per_position = 1 - F.cosine_similarity(learner, target, dim=1)
    else:
        per_position = (learner - target).square().mean(1)
    return _region_mean(per_position, torch.ones_like(per_position), (kh, kw))[0]


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def hfd_loss(
    f_cnn: torch.Tensor,
    f_vit: torch.Tensor,
    cnn_to_vit: nn.Module,
    vit_to_cnn: nn.Module,
    distance: str = "mse",
    tau: float = 4.0,
) -> torch.Tensor:
    """Heterogeneous feature distillation: each student's projected low-level feature imitates the
    other's detached, channel-normalised feature."""
    to_vit = _resize(cnn_to_vit(f_cnn), f_vit)
    to_cnn = _resize(vit_to_cnn(f_vit), f_cnn)
    return (
        feature_distance(to_vit, channel_norm(f_vit), distance, tau=tau).mean()
        + feature_distance(to_cnn, channel_norm(f_cnn), distance, tau=tau).mean()
    )


def _region_mean(x: torch.Tensor, weight: torch.Tensor, k: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of a B x H x W map over k x k cells, and the weight in each cell."""
    total = F.avg_pool2d((x * weight)[:, None], k, ceil_mode=True)[:, 0]
    mass = F.avg_pool2d(weight[:, None], k, ceil_mode=True)[:, 0]
    return total / mass.clamp(min=1e-12), mass


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def region_bsd_loss(
    cnn: StudentOutput,
    vit: StudentOutput,
    labels: torch.Tensor,
    region_size: int = 8,
    criterion: str = "ce",
    distance: str = "mse",
    margin: float = 0.0,
    adapters: tuple[nn.Module, nn.Module] | None = None,
    tau: float = 4.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Region-wise BSD: in each k x k region of the stride-4 grid, the student whose mean CE (or entropy)
    there is lower by more than `margin` teaches the other its decoder feature; regions without labels
    are skipped. `adapters` (CNN's, ViT's): learner-side maps from a student's feature to the other's
    width; without them the two features are compared channel by channel."""
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
        vit_teaches = has_labels & (region_v + margin < region_c)
        cnn_teaches = has_labels & (region_c + margin < region_v)
        regions = has_labels.sum().clamp(min=1)

    target_c, target_v = channel_norm(cnn.feat), channel_norm(vit.feat)
    learner_c, learner_v = (adapters[0](cnn.feat), adapters[1](vit.feat)) if adapters else (target_c, target_v)
    cnn_learns = feature_distance(learner_c, target_v, distance, region_size, tau)
    vit_learns = feature_distance(learner_v, target_c, distance, region_size, tau)
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
    margin: float = 0.0,
    norm: str = "active",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel-wise BSD: at each labelled pixel the reliable student (correct, and, when both are, of CE
    lower by more than `margin`) teaches the other its distribution; where both are wrong nothing is
    transferred. `norm`: each direction's KL is averaged over the pixels where it is active (`active`)
    or over all labelled pixels (`valid`, DML's scale: a pixel weighs the same whatever the share).

    `ce`: the students' per-pixel CE when the caller has it already (the CE terms' own, see `pixel_ce`).
    """
    zc, zv = upsample_logits(cnn_logits, labels), upsample_logits(vit_logits, labels)
    with torch.no_grad():
        valid = labels != IGNORE_INDEX
        ce_c, ce_v = (c.detach() for c in ce) if ce is not None else (pixel_ce(zc, labels), pixel_ce(zv, labels))
        better_v, better_c = ce_v + margin < ce_c, ce_c + margin < ce_v
        if criterion == "ce":
            vit_teaches, cnn_teaches = valid & better_v, valid & better_c
        else:
            right_c, right_v = zc.argmax(1) == labels, zv.argmax(1) == labels
            vit_teaches = valid & right_v & (~right_c | better_v)
            cnn_teaches = valid & right_c & (~right_v | better_c)
        n_valid = valid.sum().clamp(min=1)
    t2 = temperature**2
    logp_c, logp_v = (zc / temperature).log_softmax(1), (zv / temperature).log_softmax(1)
    per_c = vit_teaches.sum().clamp(min=1) if norm == "active" else n_valid
    per_v = cnn_teaches.sum().clamp(min=1) if norm == "active" else n_valid
    cnn_learns = (_kl(logp_v, logp_c) * vit_teaches).sum() / per_c
    vit_learns = (_kl(logp_c, logp_v) * cnn_teaches).sum() / per_v
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


def _norm(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    return torch.stack([t.float().square().sum() for t in tensors if t is not None] or [torch.zeros(())]).sum().sqrt()


class Objective(nn.Module):
    """CE of both students plus the method's distillation terms, as named, weighted terms.

    Holds the training-only modules of the learner sides: HFD projectors (`cnn_to_vit.*` follow the
    CNN's optimizer, `vit_to_cnn.*` the ViT's) and region-BSD adapters (`cnn_adapter`, `vit_adapter`).
    They are never part of a student's saved weights.
    """

    def __init__(
        self,
        cfg: MethodConfig,
        cnn_channels: list[int],
        vit_channels: list[int],
        decoder_channels: tuple[int, int] | None = None,
    ) -> None:
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
        self.cnn_adapter = self.vit_adapter = None
        if "region_bsd" in self.terms and cfg.region_adapter:
            if decoder_channels is None:
                raise ValueError("method.region_adapter needs the students' decoder widths")
            c, v = decoder_channels
            self.cnn_adapter, self.vit_adapter = projector(c, v), projector(v, c)

    def learner_modules(self, student: str) -> nn.ModuleList:
        """The training-only modules that `student` trains as a learner (they follow its optimizer)."""
        if student == "cnn":
            return nn.ModuleList([self.cnn_to_vit, *[m for m in (self.cnn_adapter,) if m is not None]])
        return nn.ModuleList([self.vit_to_cnn, *[m for m in (self.vit_adapter,) if m is not None]])

    def schedule(self, name: str, progress: float) -> float:
        """A distillation term's weight factor at `progress` (0-1) of training: 0 before `start`, a linear
        ramp over `warmup`, then 1 (HFD: then decaying to 0 at the end with `hfd_decay`)."""
        c = self.cfg
        if progress < c.start:
            return 0.0
        factor = min(1.0, (progress - c.start) / c.warmup) if c.warmup > 0 else 1.0
        if name == "hfd" and c.hfd_decay != "none":
            done = (progress - c.start) / (1 - c.start)
            factor *= 1 - done if c.hfd_decay == "linear" else 0.5 * (1 + math.cos(math.pi * done))
        return factor

    def forward(
        self, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, progress: float
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        losses, stats = self.unweighted(cnn, vit, labels)
        for name in self.terms:
            losses[name] = self.schedule(name, progress) * getattr(self.cfg, WEIGHTS[name]) * losses[name]
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
                    cnn.low[s - 1],
                    vit.low[s - 1],
                    self.cnn_to_vit[str(s)],
                    self.vit_to_cnn[str(s)],
                    c.hfd_distance,
                    c.cwd_temperature,
                )
                for s in c.hfd_stages
            )
        if "region_bsd" in self.terms:
            adapters = (self.cnn_adapter, self.vit_adapter) if self.cnn_adapter is not None else None
            losses["region_bsd"], s = region_bsd_loss(
                cnn,
                vit,
                labels,
                c.region_size,
                c.region_criterion,
                c.region_distance,
                c.region_margin,
                adapters,
                c.cwd_temperature,
            )
            stats.update(s)
        if "pixel_bsd" in self.terms:
            losses["pixel_bsd"], s = pixel_bsd_loss(
                zc, zv, labels, c.temperature, c.pixel_criterion, (ce_c, ce_v), c.pixel_margin, c.pixel_norm
            )
            stats.update(s)
        if "dml" in self.terms:
            losses["dml"] = dml_loss(zc, zv, labels, c.temperature)
        return losses, stats

    def grad_ratios(
        self, cnn: StudentOutput, vit: StudentOutput, losses: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """For each distillation term and student, |d term / d x| / |d CE / d x| at the tensor x of that
        student the term acts on (HFD: the distilled encoder stages; region BSD: the decoder feature;
        pixel BSD and DML: the logits), with the term at its current weight. Diagnostics: it keeps the
        graph, so call it before the backward pass, and not every step."""
        acts_on = {
            "hfd": lambda o: [o.low[s - 1] for s in self.cfg.hfd_stages],
            "region_bsd": lambda o: [o.feat],
            "pixel_bsd": lambda o: [o.logits],
            "dml": lambda o: [o.logits],
        }
        ratios = {}
        for student, out in (("cnn", cnn), ("vit", vit)):
            for name in self.terms:
                xs = acts_on[name](out)
                grad = torch.autograd.grad(losses[name], xs, retain_graph=True, allow_unused=True)
                ce = torch.autograd.grad(losses[f"ce_{student}"], xs, retain_graph=True, allow_unused=True)
                ratios[f"ratio_{name}_{student}"] = (_norm(grad) / _norm(ce).clamp(min=1e-12)).detach()
        return ratios

    def compile_terms(self) -> None:
        """Fuse the terms' element-wise work at label and stride-4 resolution (GPU: some 20 ms a step at
        512x1024, batch 8, unfused). Parameter names, and so checkpoints, stay as they are."""
        # grad_ratios backpropagates the compiled graph more than once (retain_graph), which torch
        # refuses for a backward that donates its buffers (torch >= 2.5 donates by default)
        torch._functorch.config.donated_buffer = False
        self.unweighted = torch.compile(self.unweighted)
