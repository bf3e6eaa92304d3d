"""The collaborative loss terms on hand-built tensors whose right answer is known."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from train.config import MethodConfig
from train.losses import (
    PRESETS,
    Objective,
    channel_norm,
    dml_loss,
    hfd_loss,
    pixel_bsd_loss,
    pixel_ce,
    region_bsd_loss,
)
from train.models import StudentOutput

K = 3  # classes


def confident(classes: torch.Tensor, margin: float = 4.0) -> torch.Tensor:
    """B x K x H x W logits that predict `classes` (B x H x W) with the given margin."""
    return nn.functional.one_hot(classes, K).permute(0, 3, 1, 2).float() * margin


def outputs(feat: torch.Tensor, logits: torch.Tensor) -> StudentOutput:
    return StudentOutput([feat], feat, logits)


def two_region_case():
    """A 1 x 4 x 8 grid, regions of 4x4: the CNN is right in the left region, the ViT in the right one."""
    labels = torch.ones(1, 4, 8, dtype=torch.long)
    wrong = torch.zeros_like(labels)
    left = torch.zeros(1, 4, 8, dtype=torch.bool)
    left[..., :4] = True
    cnn_pred, vit_pred = torch.where(left, labels, wrong), torch.where(left, wrong, labels)
    g = torch.Generator().manual_seed(0)
    feat_c = torch.randn(1, 6, 4, 8, generator=g, requires_grad=True)
    feat_v = torch.randn(1, 6, 4, 8, generator=g, requires_grad=True)
    return labels, left, outputs(feat_c, confident(cnn_pred)), outputs(feat_v, confident(vit_pred))


def floats(stats: dict) -> dict:
    return {k: float(v) for k, v in stats.items()}


def test_region_direction_follows_the_lower_ce_student():
    labels, _, cnn, vit = two_region_case()
    loss, stats = region_bsd_loss(cnn, vit, labels, region_size=4)
    assert floats(stats) == {"region_vit_to_cnn": 0.5, "region_cnn_to_vit": 0.5}
    loss.backward()
    grad_c, grad_v = cnn.feat.grad.abs().sum(1)[0], vit.feat.grad.abs().sum(1)[0]
    # The CNN learns only where the ViT teaches (right), the ViT only where the CNN teaches (left).
    assert grad_c[:, :4].sum() == 0 and grad_c[:, 4:].sum() > 0
    assert grad_v[:, 4:].sum() == 0 and grad_v[:, :4].sum() > 0


def test_region_without_labels_is_skipped():
    labels, _, cnn, vit = two_region_case()
    labels[..., 4:] = 255
    loss, stats = region_bsd_loss(cnn, vit, labels, region_size=4)
    assert floats(stats) == {"region_vit_to_cnn": 0.0, "region_cnn_to_vit": 1.0}
    loss.backward()
    assert cnn.feat.grad.abs().sum() == 0  # only the labelled left region transfers, CNN -> ViT


def test_region_entropy_criterion_uses_confidence():
    labels, _, cnn, vit = two_region_case()
    unsure = outputs(vit.feat, vit.logits * 0.1)  # same argmax, far less confident
    _, stats = region_bsd_loss(cnn, unsure, labels, region_size=4, criterion="entropy")
    assert stats["region_cnn_to_vit"] == 1.0


def test_region_loss_is_batch_and_grid_size_invariant():
    labels, _, cnn, vit = two_region_case()
    base, _ = region_bsd_loss(cnn, vit, labels, region_size=4)
    batch2 = [outputs(torch.cat([o.feat] * 2), torch.cat([o.logits] * 2)) for o in (cnn, vit)]
    doubled, _ = region_bsd_loss(*batch2, torch.cat([labels] * 2), region_size=4)
    torch.testing.assert_close(doubled, base)

    def up(x):
        return x.repeat_interleave(2, -1).repeat_interleave(2, -2)

    big = [outputs(up(o.feat), up(o.logits)) for o in (cnn, vit)]
    bigger, _ = region_bsd_loss(*big, up(labels), region_size=8)
    torch.testing.assert_close(bigger, base)


def pixel_case():
    """Pixels: 0 both right (CNN more sure), 1 only ViT right, 2 both wrong, 3 ignore."""
    labels = torch.tensor([[[1, 1, 1, 255]]])
    # K x W class scores, column i = pixel i: pixel 0 both predict 1 (CNN surer), 1 only the ViT, 2 neither.
    zc = torch.tensor([[0.0, 3, 2, 0], [5, 1, 0, 0], [0, 0, 5, 0]])
    zv = torch.tensor([[0.0, 0, 2, 0], [2, 4, 0, 0], [0, 0, 4, 0]])  # pixel 2: ViT wrong but less sure
    to_logits = lambda z: z[None, :, None, :].clone().requires_grad_(True)  # noqa: E731
    return labels, to_logits(zc), to_logits(zv)


def test_pixel_bsd_reliable_teacher_and_no_transfer_where_both_are_wrong():
    labels, zc, zv = pixel_case()
    assert (zc.argmax(1) == labels)[0, 0].tolist() == [True, False, False, False]
    loss, stats = pixel_bsd_loss(zc, zv, labels)
    assert floats(stats) == {"pixel_vit_to_cnn": pytest.approx(1 / 3), "pixel_cnn_to_vit": pytest.approx(1 / 3)}
    loss.backward()
    gc, gv = zc.grad.abs().sum(1)[0, 0], zv.grad.abs().sum(1)[0, 0]
    # Pixel 0: CNN teaches (only the ViT learns); pixel 1: ViT teaches; pixel 2 both wrong; 3 ignored.
    assert gc[0] == 0 and gv[0] > 0
    assert gc[1] > 0 and gv[1] == 0
    assert gc[2] == 0 and gv[2] == 0
    assert gc[3] == 0 and gv[3] == 0


def test_pixel_bsd_with_the_ce_terms_per_pixel_ce_is_the_same_loss():
    """The objective hands pixel BSD the CE terms' own per-pixel CE (with its graph) instead of a second
    pass: same directions, same value, and no gradient through the masks."""
    labels, zc, zv = pixel_case()
    own, own_stats = pixel_bsd_loss(zc, zv, labels)
    shared, shared_stats = pixel_bsd_loss(zc, zv, labels, ce=(pixel_ce(zc, labels), pixel_ce(zv, labels)))
    torch.testing.assert_close(shared, own)
    assert floats(shared_stats) == floats(own_stats)
    shared.backward()
    gc, gv = zc.grad.abs().sum(1)[0, 0], zv.grad.abs().sum(1)[0, 0]
    assert gc[0] == 0 and gv[1] == 0  # the teacher side of each pixel still gets nothing


def test_pixel_bsd_ce_criterion_teaches_everywhere_labelled():
    labels, zc, zv = pixel_case()
    _, stats = pixel_bsd_loss(zc, zv, labels, criterion="ce")
    assert floats(stats) == {"pixel_vit_to_cnn": pytest.approx(2 / 3), "pixel_cnn_to_vit": pytest.approx(1 / 3)}


def test_pixel_bsd_is_batch_and_size_invariant_and_scales_with_t_squared():
    labels, zc, zv = pixel_case()
    base, _ = pixel_bsd_loss(zc, zv, labels)
    doubled, _ = pixel_bsd_loss(torch.cat([zc] * 2), torch.cat([zv] * 2), torch.cat([labels] * 2))
    torch.testing.assert_close(doubled, base)
    tall, _ = pixel_bsd_loss(zc.repeat(1, 1, 5, 1), zv.repeat(1, 1, 5, 1), labels.repeat(1, 5, 1))
    torch.testing.assert_close(tall, base)
    same = zc.detach()
    zero, _ = pixel_bsd_loss(same, same.clone(), labels)
    assert zero.item() == pytest.approx(0.0, abs=1e-7)


def test_dml_is_symmetric_ignores_void_and_detaches_the_peer():
    labels, zc, zv = pixel_case()
    a = dml_loss(zc, zv, labels)
    torch.testing.assert_close(a, dml_loss(zv, zc, labels))
    a.backward()
    assert zc.grad[..., 3].abs().sum() == 0 and zv.grad[..., 3].abs().sum() == 0


def test_hfd_targets_are_detached_and_normalised():
    f_c = torch.randn(2, 4, 5, 5, requires_grad=True)
    f_v = torch.randn(2, 3, 3, 3, requires_grad=True)
    to_vit = nn.Conv2d(4, 3, 1)
    const = nn.Parameter(torch.zeros(1, 4, 1, 1))

    class Ignores(nn.Module):  # a ViT->CNN projector whose output does not depend on its input
        def forward(self, x):
            return const.expand(x.shape[0], -1, x.shape[2], x.shape[3])

    hfd_loss(f_c, f_v, to_vit, Ignores()).backward()
    assert f_c.grad.abs().sum() > 0
    assert f_v.grad is None or f_v.grad.abs().sum() == 0  # the ViT is reached only through its own projector
    n = channel_norm(torch.randn(2, 8, 3, 3) * 7 + 3)
    torch.testing.assert_close(n.mean(1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.square().mean(1), torch.ones(2, 3, 3), atol=1e-3, rtol=0)


def student_pair(labels_hw=(16, 16)):
    g = torch.Generator().manual_seed(1)
    h, w = labels_hw[0] // 4, labels_hw[1] // 4

    def student(ch):
        low = [torch.randn(2, c, h, w, generator=g, requires_grad=True) for c in ch]
        return StudentOutput(low, torch.randn(2, 8, h, w, generator=g), torch.randn(2, K, h, w, generator=g))

    labels = torch.randint(0, K, (2, *labels_hw), generator=g)
    return student([64, 128, 256, 512]), student([32, 64, 160, 256]), labels


@pytest.mark.parametrize("preset", list(PRESETS))
def test_objective_presets_name_their_terms(preset):
    cnn, vit, labels = student_pair()
    objective = Objective(MethodConfig(preset=preset), [64, 128, 256, 512], [32, 64, 160, 256])
    losses, stats = objective(cnn, vit, labels, progress=0.5)
    assert set(losses) == {"ce_cnn", "ce_vit", *PRESETS[preset]}
    assert all(torch.isfinite(v) for v in losses.values())
    assert ("region_bsd" in PRESETS[preset]) == ("region_cnn_to_vit" in stats)
    assert (len(objective.cnn_to_vit) > 0) == ("hfd" in PRESETS[preset])


def test_objective_warmup_ramps_distillation_only():
    cnn, vit, labels = student_pair()
    objective = Objective(MethodConfig(preset="full", warmup=0.1), [64, 128, 256, 512], [32, 64, 160, 256])
    start, _ = objective(cnn, vit, labels, progress=0.0)
    half, _ = objective(cnn, vit, labels, progress=0.05)
    full, _ = objective(cnn, vit, labels, progress=0.5)
    assert start["pixel_bsd"] == 0 and start["ce_cnn"] > 0
    torch.testing.assert_close(half["pixel_bsd"] * 2, full["pixel_bsd"])


def test_objective_explicit_terms_and_stage_list():
    objective = Objective(MethodConfig(terms=["hfd"], hfd_stages=[1, 2]), [64, 128, 256, 512], [32, 64, 160, 256])
    assert objective.terms == ["hfd"] and set(objective.cnn_to_vit) == {"1", "2"}
    assert objective.cnn_to_vit["2"][0].weight.shape == (64, 128, 1, 1)
    with pytest.raises(ValueError, match="stage 5 does not exist"):
        Objective(MethodConfig(terms=["hfd"], hfd_stages=[5]), [64, 128, 256, 512], [32, 64, 160, 256])


def test_compiled_terms_match_eager_and_compile_once_while_the_ramp_moves():
    """CUDA training compiles the terms (`compile_losses`); the ramp stays outside the compiled code."""
    import torch._dynamo

    cnn, vit, labels = student_pair()
    eager = Objective(MethodConfig(preset="full", warmup=0.1), [64, 128, 256, 512], [32, 64, 160, 256])
    compiled = copy.deepcopy(eager)
    compiled.compile_terms()
    for i, progress in enumerate((0.0, 0.03, 0.07, 0.5)):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got, got_stats = compiled(cnn, vit, labels, progress=progress)
        want, want_stats = eager(cnn, vit, labels, progress=progress)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_stats, want_stats)
    (grad,) = torch.autograd.grad(sum(got.values()), cnn.low[0])
    torch.testing.assert_close(grad, torch.autograd.grad(sum(want.values()), cnn.low[0])[0], rtol=1e-4, atol=1e-6)
