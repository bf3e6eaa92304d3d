"""Loss terms over two `StudentOutput`s (docs/method.md), each written once for both directions.

Every distillation target is detached and every mask is computed without gradient, so one
backward pass of the summed terms trains each student only on its learner side. Pixel terms are
averaged over valid (non-ignore) pixels, so no term grows with batch or image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ConfigError, MethodConfig
from train.data import IGNORE_INDEX
from train.metrics import class_map
from train.models import StudentOutput


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
    selection: str = "reliable",
    generator: torch.Generator | None = None,
    unlabeled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Region-wise BSD: in each k x k region of the stride-4 grid, the student whose mean CE (or entropy)
    there is lower by more than `margin` teaches the other its decoder feature; in regions of unlabelled
    images (`unlabeled`: B x H x W, their image pixels) the entropy decides, and regions with neither labels
    nor unlabelled pixels are skipped. `adapters` (CNN's, ViT's): learner-side maps from a student's feature
    to the other's width; without them the two features are compared channel by channel.
    `selection="random"`: as many regions in each direction, chosen at random among the counted ones."""
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
            if unlabeled is not None:  # no label there: the more confident student teaches
                unl = F.interpolate(unlabeled[:, None].float(), size=grid, mode="nearest")[:, 0] > 0
                loss_c = torch.where(unl, _entropy(cnn.logits), loss_c)
                loss_v = torch.where(unl, _entropy(vit.logits), loss_v)
                valid = torch.maximum(valid, unl.float())
        region_c, mass = _region_mean(loss_c, valid, region_size)
        region_v, _ = _region_mean(loss_v, valid, region_size)
        has_labels = mass > 0
        vit_teaches = has_labels & (region_v + margin < region_c)
        cnn_teaches = has_labels & (region_c + margin < region_v)
        if selection == "random":
            vit_teaches, cnn_teaches = shuffled(vit_teaches, cnn_teaches, has_labels, generator)
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


def shuffled(
    first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random-selection control: two disjoint masks over `valid` positions, chosen at random, with as
    many positions as `first` and `second` (two disjoint direction masks) have in the whole batch. No
    device sync: each valid position's rank in a random order decides."""
    scores = torch.rand(valid.shape, generator=generator, device=valid.device).masked_fill(~valid, 2.0)
    rank = scores.flatten().argsort().argsort().view(valid.shape)
    n_first, n_both = first.sum(), first.sum() + second.sum()
    return rank < n_first, (rank >= n_first) & (rank < n_both)


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
    selection: str = "reliable",
    generator: torch.Generator | None = None,
    unlabeled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel-wise BSD: at each labelled pixel the reliable student (correct, and, when both are, of CE
    lower by more than `margin`) teaches the other its distribution; where both are wrong nothing is
    transferred. At unlabelled pixels (`unlabeled`: B x H x W) a student's CE is that of its own class, so
    the more confident student, by more than `margin`, teaches. `norm`: each direction's KL is averaged
    over the pixels where it is active (`active`) or over all counted pixels (`valid`, DML's scale: a pixel
    weighs the same whatever the share). `selection="random"`: as many pixels in each direction, chosen at
    random among the counted ones.

    `ce`: the students' per-pixel CE when the caller has it already (the CE terms' own, see `pixel_ce`).
    """
    zc, zv = upsample_logits(cnn_logits, labels), upsample_logits(vit_logits, labels)
    with torch.no_grad():
        valid = labels != IGNORE_INDEX
        ce_c, ce_v = (c.detach() for c in ce) if ce is not None else (pixel_ce(zc, labels), pixel_ce(zv, labels))
        if unlabeled is not None:  # a student's CE of its own class: the margin on confidence decides
            valid = valid | unlabeled
            ce_c = torch.where(unlabeled, -zc.log_softmax(1).amax(1), ce_c)
            ce_v = torch.where(unlabeled, -zv.log_softmax(1).amax(1), ce_v)
        better_v, better_c = ce_v + margin < ce_c, ce_c + margin < ce_v
        if criterion == "ce":
            vit_teaches, cnn_teaches = valid & better_v, valid & better_c
        else:
            right_c, right_v = class_map(zc) == labels, class_map(zv) == labels
            if unlabeled is not None:  # no label to be wrong about: both count as right
                right_c, right_v = right_c | unlabeled, right_v | unlabeled
            vit_teaches = valid & right_v & (~right_c | better_v)
            cnn_teaches = valid & right_c & (~right_v | better_c)
        if selection == "random":
            vit_teaches, cnn_teaches = shuffled(vit_teaches, cnn_teaches, valid, generator)
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


def dml_loss(
    cnn_logits: torch.Tensor,
    vit_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    unlabeled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deep mutual learning: symmetric KL to the detached peer on every labelled (and unlabelled) pixel."""
    zc, zv = upsample_logits(cnn_logits, labels), upsample_logits(vit_logits, labels)
    valid = labels != IGNORE_INDEX
    if unlabeled is not None:
        valid = valid | unlabeled
    logp_c, logp_v = (zc / temperature).log_softmax(1), (zv / temperature).log_softmax(1)
    kl = _kl(logp_v, logp_c) + _kl(logp_c, logp_v)
    return temperature**2 * (kl * valid).sum() / valid.sum().clamp(min=1)


def pseudo_label_loss(
    learner: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    threshold: float = 0.9,
    balance: str = "none",
    selection: str = "reliable",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels (cross teaching, self-training): the learner's CE to the teacher's class at the
    `valid` pixels where the teacher's probability reaches `threshold`, summed and divided by all valid
    pixels (few confident pixels, a small loss). `balance="class"`: each pseudo-class present gets the same
    total weight, so that the majority class does not teach the most (confirmation bias).
    `selection="random"`: as many pixels, chosen at random among the valid ones (the control).
    Returns the loss and the share of valid pixels taught."""
    with torch.no_grad():
        confidence, target = teacher.detach().float().softmax(1).max(1)
        keep = valid & (confidence >= threshold)
        if selection == "random":
            keep, _ = shuffled(keep, torch.zeros_like(keep), valid, generator)
        n_valid = valid.sum().clamp(min=1)
        weight = keep.float()
        if balance == "class":
            counts = torch.zeros(teacher.shape[1], device=keep.device).index_add_(0, target[keep], weight[keep])
            present = (counts > 0).sum().clamp(min=1)
            weight = weight * (keep.sum() / (present * counts.clamp(min=1)))[target]
    ce = F.cross_entropy(learner.float(), target, reduction="none")
    return (ce * weight).sum() / n_valid, keep.sum() / n_valid


def projector(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))


def _norm(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    return torch.stack([t.float().square().sum() for t in tensors if t is not None] or [torch.zeros(())]).sum().sqrt()


# --- the table of terms ----------------------------------------------------------------------------


class Unlabeled(NamedTuple):
    """The unlabelled images of a batch, its last `rows` rows (labels 255 there): where they hold image
    pixels (`mask`, B x H x W over the whole batch) and, per teacher source (`Term.teacher`), the teachers'
    logits on them (`train.teachers`); `live` comes from the step's own outputs when the teachers see what
    the learners see."""

    rows: int
    mask: torch.Tensor
    teachers: dict[str, tuple[torch.Tensor, torch.Tensor]]


class Pixels(NamedTuple):
    """What every pixel term shares in a step: both students' logits at label resolution and their CE; the
    unlabelled pixels and rows; each teacher source's logits on those rows at label resolution."""

    cnn: torch.Tensor
    vit: torch.Tensor
    ce_cnn: torch.Tensor
    ce_vit: torch.Tensor
    unlabeled: torch.Tensor | None = None
    rows: int = 0
    teachers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass(frozen=True)
class Term:
    """One distillation term, declared once: the config's checks, the objective, the diagnostics, the
    ablation and the docs' option list read this row. Adding a term is one row (and its test)."""

    name: str
    summary: str  # one line, for the docs and the ablation's report
    weight: str  # the MethodConfig field of its weight (the method's schedule multiplies it)
    options: tuple[str, ...]  # the MethodConfig fields it reads
    compute: Callable[[Objective, StudentOutput, StudentOutput, torch.Tensor, Pixels], tuple[torch.Tensor, dict]]
    acts_on: Callable[[StudentOutput, MethodConfig], list[torch.Tensor]]  # where its gradient ratio is measured
    stats: tuple[str, ...] = ()  # what it logs besides its value
    selective: bool = False  # it chooses where knowledge flows, so `method.selection` applies to it
    check: Callable[[MethodConfig, Geometry], str | None] = lambda cfg, geometry: None  # why it cannot apply
    # the teacher source whose logits on the unlabelled images it reads: live (the students), ema (their
    # moving averages), offline (a finished run's students, frozen); None: it reads the step's outputs only
    teacher: Callable[[MethodConfig], str | None] = lambda cfg: None


class Geometry(NamedTuple):
    """What the options are checked against: the training crop and the students' widths."""

    crop: tuple[int, int]
    decoder_channels: tuple[int, int]
    cnn_channels: list[int] | None = None  # encoder stages (None: not built yet, not checked)
    vit_channels: list[int] | None = None


def _hfd(obj: Objective, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, px: Pixels):
    c = obj.cfg
    loss = sum(
        hfd_loss(
            cnn.low[s - 1],
            vit.low[s - 1],
            obj.cnn_to_vit[str(s)],
            obj.vit_to_cnn[str(s)],
            c.hfd_distance,
            c.cwd_temperature,
        )
        for s in c.hfd_stages
    )
    return loss, {}


def _region_bsd(obj: Objective, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, px: Pixels):
    c = obj.cfg
    adapters = (obj.cnn_adapter, obj.vit_adapter) if obj.cnn_adapter is not None else None
    return region_bsd_loss(
        cnn,
        vit,
        labels,
        c.region_size,
        c.region_criterion,
        c.region_distance,
        c.region_margin,
        adapters,
        c.cwd_temperature,
        c.selection,
        obj.generator,
        px.unlabeled,
    )


def _pixel_bsd(obj: Objective, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, px: Pixels):
    c = obj.cfg
    return pixel_bsd_loss(
        px.cnn,
        px.vit,
        labels,
        c.temperature,
        c.pixel_criterion,
        (px.ce_cnn, px.ce_vit),
        c.pixel_margin,
        c.pixel_norm,
        c.selection,
        obj.generator,
        px.unlabeled,
    )


def _dml(obj: Objective, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, px: Pixels):
    return dml_loss(px.cnn, px.vit, labels, obj.cfg.temperature, px.unlabeled), {}


def _pseudo(name: str, crossed: bool):
    """A pseudo-label term: on the unlabelled rows each student learns the confident classes of its teacher
    from the term's source, the peer's (`crossed`) or its own."""

    def compute(obj: Objective, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, px: Pixels):
        c, rows = obj.cfg, px.rows
        if not rows:  # a fully labelled batch: nothing to teach (a zero in the graph)
            return px.cnn[:0].sum() + px.vit[:0].sum(), {}
        t_cnn, t_vit = px.teachers[TERMS[name].teacher(c)]
        for_cnn, for_vit = (t_vit, t_cnn) if crossed else (t_cnn, t_vit)
        valid = px.unlabeled[-rows:]
        options = (c.pseudo_threshold, c.pseudo_balance, c.selection, obj.generator)
        loss_c, kept_c = pseudo_label_loss(px.cnn[-rows:], for_cnn, valid, *options)
        loss_v, kept_v = pseudo_label_loss(px.vit[-rows:], for_vit, valid, *options)
        return loss_c + loss_v, {f"{name}_kept_cnn": kept_c, f"{name}_kept_vit": kept_v}

    return compute


def _teaching_only(
    student: str, cnn: StudentOutput, vit: StudentOutput, px: Pixels
) -> tuple[StudentOutput, StudentOutput, Pixels]:
    """The terms' inputs with `student`'s side detached: it teaches and learns nothing from its peer."""
    detached = lambda o: StudentOutput([t.detach() for t in o.low], o.feat.detach(), o.logits.detach())  # noqa: E731
    if student == "cnn":
        return detached(cnn), vit, px._replace(cnn=px.cnn.detach(), ce_cnn=px.ce_cnn.detach())
    return cnn, detached(vit), px._replace(vit=px.vit.detach(), ce_vit=px.ce_vit.detach())


def _check_hfd(cfg: MethodConfig, g: Geometry) -> str | None:
    if g.cnn_channels is None or g.vit_channels is None:
        return None
    stages = min(len(g.cnn_channels), len(g.vit_channels))
    if bad := [s for s in cfg.hfd_stages if not 1 <= s <= stages]:
        return f"method.hfd_stages: stage {bad[0]} does not exist (1..{stages})"
    return None


def _check_region_bsd(cfg: MethodConfig, g: Geometry) -> str | None:
    grid = [side // 4 for side in g.crop]
    if any(side % cfg.region_size for side in grid):
        return (
            f"method.region_size={cfg.region_size}: does not divide the {grid[0]}x{grid[1]} stride-4 feature map "
            f"of a {g.crop[0]}x{g.crop[1]} crop (pick a divisor of {grid[0]} and {grid[1]})"
        )
    if not cfg.region_adapter and g.decoder_channels[0] != g.decoder_channels[1]:
        return (
            "region-wise BSD without adapters compares the two decoder features channel by channel: "
            f"cnn.decoder_channels ({g.decoder_channels[0]}) must equal vit.decoder_channels "
            f"({g.decoder_channels[1]}), or set method.region_adapter=true"
        )
    return None


TERMS = {
    t.name: t
    for t in [
        Term(
            "hfd",
            "heterogeneous feature distillation: each student's projected encoder stage imitates the other's",
            "hfd_weight",
            ("hfd_stages", "hfd_distance", "hfd_decay", "cwd_temperature"),
            _hfd,
            lambda o, c: [o.low[s - 1] for s in c.hfd_stages],
            check=_check_hfd,
        ),
        Term(
            "region_bsd",
            "region-wise BSD: per region, the student of lower CE teaches the other its decoder feature",
            "region_weight",
            ("region_size", "region_criterion", "region_distance", "region_margin", "region_adapter", "selection"),
            _region_bsd,
            lambda o, c: [o.feat],
            ("region_vit_to_cnn", "region_cnn_to_vit"),
            selective=True,
            check=_check_region_bsd,
        ),
        Term(
            "pixel_bsd",
            "pixel-wise BSD: per pixel, the reliable student teaches the other its distribution",
            "pixel_weight",
            ("pixel_criterion", "pixel_margin", "pixel_norm", "temperature", "selection"),
            _pixel_bsd,
            lambda o, c: [o.logits],
            ("pixel_vit_to_cnn", "pixel_cnn_to_vit"),
            selective=True,
        ),
        Term(
            "dml",
            "deep mutual learning: symmetric KL to the peer on every labelled and unlabelled pixel",
            "dml_weight",
            ("temperature",),
            _dml,
            lambda o, c: [o.logits],
        ),
        Term(
            "cross",
            "cross teaching: on unlabelled images each student learns its peer's confident classes",
            "pseudo_weight",
            ("pseudo_threshold", "pseudo_balance", "cross_teacher", "ema_decay", "views", "selection"),
            _pseudo("cross", crossed=True),
            lambda o, c: [o.logits],
            ("cross_kept_cnn", "cross_kept_vit"),
            selective=True,
            teacher=lambda c: c.cross_teacher,
        ),
        Term(
            "self_training",
            "self-training: on unlabelled images each student learns its own moving average's confident classes",
            "pseudo_weight",
            ("pseudo_threshold", "pseudo_balance", "ema_decay", "views", "selection"),
            _pseudo("self_training", crossed=False),
            lambda o, c: [o.logits],
            ("self_training_kept_cnn", "self_training_kept_vit"),
            selective=True,
            teacher=lambda c: "ema",
        ),
        Term(
            "offline",
            "offline distillation: on unlabelled images each student learns the confident classes of a "
            "finished run's other student, frozen",
            "pseudo_weight",
            ("pseudo_threshold", "pseudo_balance", "offline_run", "views", "selection"),
            _pseudo("offline", crossed=True),
            lambda o, c: [o.logits],
            ("offline_kept_cnn", "offline_kept_vit"),
            selective=True,
            check=lambda c, g: None if c.offline_run else "method.offline_run: the offline term needs a finished run",
            teacher=lambda c: "offline",
        ),
    ]
}
# The method is `full`; the others are its ablations and the baselines a comparison needs (docs/method.md).
PRESETS = {
    "independent": [],
    "dml": ["dml"],
    "hfd": ["hfd"],
    "bsd": ["region_bsd", "pixel_bsd"],
    "cross": ["cross"],
    "full": ["hfd", "region_bsd", "pixel_bsd", "cross"],
    "self": ["self_training"],
    "offline": ["offline"],
}


def method_terms(cfg: MethodConfig, geometry: Geometry | None = None) -> list[str]:
    """The terms a method config trains, after every check that can fail at start (each names its field)."""
    if cfg.terms is None and cfg.preset not in PRESETS:
        raise ConfigError(f"method.preset={cfg.preset!r}: not one of {list(PRESETS)}")
    terms = list(cfg.terms) if cfg.terms is not None else PRESETS[cfg.preset]
    if unknown := [t for t in terms if t not in TERMS]:
        raise ConfigError(f"method.terms: {unknown[0]!r} is not one of {list(TERMS)}")
    if cfg.learners != "both" and not terms:
        raise ConfigError(
            f"method.learners={cfg.learners!r}: only the {cfg.learners} learns from its peer, and this "
            "method trains no distillation term (CE only)"
        )
    if cfg.selection == "random" and not any(TERMS[t].selective for t in terms):
        selective = [t.name for t in TERMS.values() if t.selective]
        raise ConfigError(
            f"method.selection=random: the control randomises a selective term ({', '.join(selective)}), "
            f"and this method trains none ({', '.join(terms) or 'CE only'})"
        )
    if cfg.views == "weak_strong" and not any(TERMS[t].teacher(cfg) for t in terms):
        readers = [t.name for t in TERMS.values() if t.teacher(cfg)]
        raise ConfigError(
            f"method.views=weak_strong: only a term that reads a teacher's view ({', '.join(readers)}) uses it, "
            f"and this method trains none ({', '.join(terms) or 'CE only'})"
        )
    for t in terms if geometry is not None else ():
        if problem := TERMS[t].check(cfg, geometry):
            raise ConfigError(problem)
    return terms


class Objective(nn.Module):
    """CE of both students plus the method's distillation terms (`TERMS`), as named, weighted terms.

    Holds the training-only modules of the learner sides: HFD projectors (`cnn_to_vit.*` follow the
    CNN's optimizer, `vit_to_cnn.*` the ViT's) and region-BSD adapters (`cnn_adapter`, `vit_adapter`).
    They are never part of a student's saved weights. `generator` draws the random-selection control.
    """

    def __init__(self, cfg: MethodConfig, geometry: Geometry, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.terms = method_terms(cfg, geometry)
        self.generator = torch.Generator().manual_seed(seed)
        self.cnn_to_vit, self.vit_to_cnn = nn.ModuleDict(), nn.ModuleDict()
        if "hfd" in self.terms:
            for s in cfg.hfd_stages:
                c, v = geometry.cnn_channels[s - 1], geometry.vit_channels[s - 1]
                self.cnn_to_vit[str(s)], self.vit_to_cnn[str(s)] = projector(c, v), projector(v, c)
        self.cnn_adapter = self.vit_adapter = None
        if "region_bsd" in self.terms and cfg.region_adapter:
            c, v = geometry.decoder_channels
            self.cnn_adapter, self.vit_adapter = projector(c, v), projector(v, c)
        # one-way distillation: the student that only teaches; its modules stay as built (out of its optimizer)
        self.teacher_only = {"cnn": "vit", "vit": "cnn"}.get(cfg.learners)
        if self.teacher_only:
            self.learner_modules(self.teacher_only).requires_grad_(False)

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

    @property
    def teacher_sources(self) -> set[str]:
        """The teacher sources whose logits on the unlabelled images the terms read (`Term.teacher`)."""
        return {source for t in self.terms if (source := TERMS[t].teacher(self.cfg))}

    def forward(
        self,
        cnn: StudentOutput,
        vit: StudentOutput,
        labels: torch.Tensor,
        progress: float,
        unlabeled: Unlabeled | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        losses, stats = self.unweighted(cnn, vit, labels, unlabeled)
        for name in self.terms:
            losses[name] = self.schedule(name, progress) * getattr(self.cfg, TERMS[name].weight) * losses[name]
        return losses, stats

    def unweighted(
        self, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, unlabeled: Unlabeled | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every term at weight 1: the tensor work of a step, with no per-step Python value in it, so that
        `compile_terms` compiles it once. Also logs `one_right`, the share of labelled pixels exactly one
        student gets right: what any selective transfer has to work with."""
        # Full-resolution logits and per-pixel CE once per step, shared by every pixel term.
        zc, zv = upsample_logits(cnn.logits, labels), upsample_logits(vit.logits, labels)
        px = Pixels(zc, zv, pixel_ce(zc, labels), pixel_ce(zv, labels))
        if unlabeled is not None and unlabeled.rows:
            rows, like = unlabeled.rows, labels[-unlabeled.rows :]
            teachers = {
                k: (upsample_logits(c, like), upsample_logits(v, like)) for k, (c, v) in unlabeled.teachers.items()
            }
            teachers.setdefault("live", (zc[-rows:].detach(), zv[-rows:].detach()))
            px = px._replace(unlabeled=unlabeled.mask, rows=rows, teachers=teachers)
        losses = {"ce_cnn": cross_entropy(zc, labels, px.ce_cnn), "ce_vit": cross_entropy(zv, labels, px.ce_vit)}
        with torch.no_grad():
            valid = labels != IGNORE_INDEX
            one_right = ((class_map(zc) == labels) ^ (class_map(zv) == labels)) & valid
            stats = {"one_right": one_right.sum() / valid.sum().clamp(min=1)}
        if self.teacher_only:
            cnn, vit, px = _teaching_only(self.teacher_only, cnn, vit, px)
        for name in self.terms:
            losses[name], term_stats = TERMS[name].compute(self, cnn, vit, labels, px)
            stats.update(term_stats)
        return losses, stats

    def grad_ratios(
        self, cnn: StudentOutput, vit: StudentOutput, losses: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """For each distillation term and student, |d term / d x| / |d CE / d x| at the tensor x of that
        student the term acts on (`Term.acts_on`), with the term at its current weight. Diagnostics: it
        keeps the graph, so call it before the backward pass, and not every step."""
        ratios = {}
        for student, out in (("cnn", cnn), ("vit", vit)):
            for name in self.terms:
                xs = TERMS[name].acts_on(out, self.cfg)
                grad = torch.autograd.grad(losses[name], xs, retain_graph=True, allow_unused=True)
                ce = torch.autograd.grad(losses[f"ce_{student}"], xs, retain_graph=True, allow_unused=True)
                ratios[f"ratio_{name}_{student}"] = (_norm(grad) / _norm(ce).clamp(min=1e-12)).detach()
        return ratios

    def compile_terms(self, backend: str = "inductor") -> None:
        """Fuse the terms' element-wise work at label and stride-4 resolution (GPU: some 20 ms a step at
        512x1024, batch 8, unfused). Parameter names, and so checkpoints, stay as they are."""
        # grad_ratios backpropagates the compiled graph more than once (retain_graph), which torch
        # refuses for a backward that donates its buffers (torch >= 2.5 donates by default)
        torch._functorch.config.donated_buffer = False
        self.unweighted = torch.compile(self.unweighted, backend=backend)
