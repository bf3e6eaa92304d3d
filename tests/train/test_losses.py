"""The collaborative loss terms on hand-built tensors whose right answer is known."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from train.config import ConfigError, MethodConfig
from train.losses import (
    PRESETS,
    Geometry,
    Objective,
    channel_norm,
    dml_loss,
    feature_distance,
    hfd_loss,
    pixel_bsd_loss,
    pixel_ce,
    region_bsd_loss,
    shuffled,
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


def objective_of(cfg: MethodConfig) -> Objective:
    """The objective for `student_pair`'s students (ResNet-18 / MiT-B0 stage widths, 8-wide decoders)."""
    return Objective(cfg, geometry())


def geometry(cnn=(64, 128, 256, 512), vit=(32, 64, 160, 256), widths=(8, 8), crop=(64, 64)) -> Geometry:
    """A training geometry the default options fit (region_size 8 divides a 64x64 crop's 16x16 grid)."""
    return Geometry(crop, widths, list(cnn), list(vit))


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
    objective = objective_of(MethodConfig(preset=preset, offline_run="runs/peer"))
    losses, stats = objective(cnn, vit, labels, progress=0.5)
    assert set(losses) == {"ce_cnn", "ce_vit", *PRESETS[preset]}
    assert all(torch.isfinite(v) for v in losses.values())
    assert ("region_bsd" in PRESETS[preset]) == ("region_cnn_to_vit" in stats)
    assert (len(objective.cnn_to_vit) > 0) == ("hfd" in PRESETS[preset])


def test_objective_warmup_ramps_distillation_only():
    cnn, vit, labels = student_pair()
    objective = objective_of(MethodConfig(preset="full", start=0, warmup=0.1))
    start, _ = objective(cnn, vit, labels, progress=0.0)
    half, _ = objective(cnn, vit, labels, progress=0.05)
    full, _ = objective(cnn, vit, labels, progress=0.5)
    assert start["pixel_bsd"] == 0 and start["ce_cnn"] > 0
    torch.testing.assert_close(half["pixel_bsd"] * 2, full["pixel_bsd"])


def test_objective_explicit_terms_and_stage_list():
    objective = objective_of(MethodConfig(terms=["hfd"], hfd_stages=[1, 2]))
    assert objective.terms == ["hfd"] and set(objective.cnn_to_vit) == {"1", "2"}
    assert objective.cnn_to_vit["2"][0].weight.shape == (64, 128, 1, 1)
    with pytest.raises(ValueError, match="stage 5 does not exist"):
        objective_of(MethodConfig(terms=["hfd"], hfd_stages=[5]))


# CUDA training compiles the terms with inductor's Triton kernels. A CPU cannot run those; its inductor writes C++
# instead (~80 s of compiling with a cold cache), so these tests compile with aot_eager: the same dynamo capture,
# guards and AOT autograd (forward and backward graphs, buffer donation) that inductor starts from.
BACKEND = "aot_eager"


def test_compiled_terms_match_eager_and_compile_once_while_the_ramp_moves():
    """CUDA training compiles the terms (`compile_losses`); the ramp stays outside the compiled code."""
    import torch._dynamo

    cnn, vit, labels = student_pair()
    eager = objective_of(MethodConfig(preset="full", start=0, warmup=0.1))
    compiled = copy.deepcopy(eager)
    compiled.compile_terms(BACKEND)
    for i, progress in enumerate((0.0, 0.03, 0.07, 0.5)):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got, got_stats = compiled(cnn, vit, labels, progress=progress)
        want, want_stats = eager(cnn, vit, labels, progress=progress)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_stats, want_stats)
    (grad,) = torch.autograd.grad(sum(got.values()), cnn.low[0])
    torch.testing.assert_close(grad, torch.autograd.grad(sum(want.values()), cnn.low[0])[0], rtol=1e-4, atol=1e-6)


def test_compiled_terms_backpropagate_after_the_gradient_ratios():
    """A log step on CUDA: `grad_ratios` backpropagates the compiled terms with retain_graph, then the
    step's backward runs (torch >= 2.5 refused this while the compiled backward donated its buffers)."""
    cnn, vit, labels = student_pair()
    cnn, vit = (StudentOutput(o.low, o.feat.requires_grad_(), o.logits.requires_grad_()) for o in (cnn, vit))
    objective = objective_of(MethodConfig(preset="full", start=0, warmup=0))
    objective.compile_terms(BACKEND)
    # torch 2.11's CUDA graphs donated buffers here and raised in grad_ratios (H100, 2026-11-26); this
    # CPU's torch does not donate in this graph, so the setting itself is checked too
    assert torch._functorch.config.donated_buffer is False
    losses, _ = objective(cnn, vit, labels, progress=0.5)
    assert objective.grad_ratios(cnn, vit, losses)["ratio_pixel_bsd_cnn"] > 0
    sum(losses.values()).backward()
    assert cnn.logits.grad is not None and cnn.logits.grad.abs().sum() > 0


# --- method options -----------------------------------------------------------------------------


def test_region_margin_suppresses_a_transfer_between_near_equal_students():
    labels, left, cnn, vit = two_region_case()
    # The ViT is right in the right region but barely surer than the CNN there: margin 0 transfers it,
    # a margin of 1 nat does not; the CNN's clear lead on the left still transfers.
    vit = outputs(vit.feat, torch.where(left[:, None], vit.logits, cnn.logits + confident(labels, 0.5)))
    _, plain = region_bsd_loss(cnn, vit, labels, region_size=4)
    loss, strict = region_bsd_loss(cnn, vit, labels, region_size=4, margin=1.0)
    assert floats(plain) == {"region_vit_to_cnn": 0.5, "region_cnn_to_vit": 0.5}
    assert floats(strict) == {"region_vit_to_cnn": 0.0, "region_cnn_to_vit": 0.5}
    loss.backward()
    assert cnn.feat.grad.abs().sum() == 0 and vit.feat.grad.abs().sum() > 0


def test_region_adapters_train_only_the_learner_side():
    """Each adapter maps its own student's feature to the other's width; in a region a student teaches,
    neither its feature nor its adapter gets gradient."""
    labels, _, cnn, vit = two_region_case()
    vit = outputs(torch.randn(1, 10, 4, 8, requires_grad=True), vit.logits)  # another width: adapters bridge it
    cnn_adapter, vit_adapter = nn.Conv2d(6, 10, 1), nn.Conv2d(10, 6, 1)
    loss, _ = region_bsd_loss(cnn, vit, labels, region_size=4, adapters=(cnn_adapter, vit_adapter))
    loss.backward()
    grad_c, grad_v = cnn.feat.grad.abs().sum(1)[0], vit.feat.grad.abs().sum(1)[0]
    assert grad_c[:, :4].sum() == 0 and grad_c[:, 4:].sum() > 0  # the CNN learns where the ViT teaches (right)
    assert grad_v[:, 4:].sum() == 0 and grad_v[:, :4].sum() > 0
    assert cnn_adapter.weight.grad.abs().sum() > 0 and vit_adapter.weight.grad.abs().sum() > 0
    # Only the right region transfers ViT -> CNN: the ViT's adapter then gets nothing.
    labels[..., :4] = 255
    cnn_adapter.zero_grad(), vit_adapter.zero_grad()
    region_bsd_loss(cnn, vit, labels, region_size=4, adapters=(cnn_adapter, vit_adapter))[0].backward()
    assert cnn_adapter.weight.grad.abs().sum() > 0 and vit_adapter.weight.grad.abs().sum() == 0


def test_feature_distances_are_zero_for_equal_maps_and_local_to_their_cells():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 8, 8, generator=g)
    b = a.clone()
    b[..., :4, :4] += torch.randn(2, 5, 4, 4, generator=g)  # differs in the top-left 4x4 cell only
    for kind in ("mse", "cosine", "cwd"):
        assert feature_distance(a, a, kind, cell=4).abs().max() < 1e-6
        d = feature_distance(b, a, kind, cell=4)
        assert d.shape == (2, 2, 2) and (d[:, 0, 0] > 1e-3).all()
        assert d[:, 0, 1:].abs().max() < 1e-6 and d[:, 1].abs().max() < 1e-6
        assert feature_distance(b, a, kind).shape == (2, 1, 1)  # no cell: the whole map
    # cwd: a spatial softmax per channel, blind to a per-channel offset; a cell that does not divide the
    # map is padded and the padding takes no probability.
    torch.testing.assert_close(feature_distance(a + torch.randn(1, 5, 1, 1, generator=g), a, "cwd", 4), d * 0)
    odd = feature_distance(b[..., :7, :7], a[..., :7, :7], "cwd", cell=4)
    assert odd.shape == (2, 2, 2) and torch.isfinite(odd).all() and odd[:, 1, 1].abs().max() < 1e-6


def test_pixel_margin_suppresses_transfer_between_two_right_students_only():
    labels, zc, zv = pixel_case()
    _, stats = pixel_bsd_loss(zc, zv, labels, margin=10.0)
    # Pixel 0 (both right, CNN surer) no longer transfers; pixel 1 (only the ViT right) still does.
    assert floats(stats) == {"pixel_vit_to_cnn": pytest.approx(1 / 3), "pixel_cnn_to_vit": 0.0}


def test_pixel_valid_normalisation_is_invariant_to_the_share_of_active_pixels():
    """Under `valid` a transferring pixel weighs the same whatever else transfers; under `active` its
    weight is 1 / (pixels of that direction)."""
    labels = torch.tensor([[[1, 1, 1, 1]]])
    zc = torch.tensor([[2.0, 2, 2, 2], [0, 0, 0, 0]])[None, :, None, :]  # the CNN is wrong everywhere
    zv_one = torch.tensor([[0.0, 2, 2, 2], [3, 0, 0, 0]])[None, :, None, :]  # the ViT right at pixel 0
    zv_two = torch.tensor([[0.0, 0, 2, 2], [3, 3, 0, 0]])[None, :, None, :]  # ... and at pixel 1

    def grad_at_pixel0(zv, norm):
        z = zc.clone().requires_grad_(True)
        pixel_bsd_loss(z, zv, labels, norm=norm)[0].backward()
        return z.grad[..., 0]

    torch.testing.assert_close(grad_at_pixel0(zv_one, "valid"), grad_at_pixel0(zv_two, "valid"))
    torch.testing.assert_close(grad_at_pixel0(zv_one, "active"), 2 * grad_at_pixel0(zv_two, "active"))
    torch.testing.assert_close(grad_at_pixel0(zv_one, "active"), 4 * grad_at_pixel0(zv_one, "valid"))


def test_schedule_starts_late_ramps_and_decays_hfd():
    cfg = MethodConfig(preset="full", start=0.2, warmup=0.2, hfd_decay="linear")
    objective = objective_of(cfg)
    assert objective.schedule("pixel_bsd", 0.1) == 0 and objective.schedule("hfd", 0.19) == 0
    assert objective.schedule("pixel_bsd", 0.3) == pytest.approx(0.5)
    assert objective.schedule("pixel_bsd", 0.9) == 1.0
    assert objective.schedule("hfd", 0.6) == pytest.approx(0.5)  # half-way through distillation (0.2 -> 1)
    assert objective.schedule("hfd", 1.0) == pytest.approx(0.0)
    cosine = Objective(MethodConfig(preset="hfd", start=0, warmup=0, hfd_decay="cosine"), geometry([64, 128], [32, 64]))
    assert cosine.schedule("hfd", 0.5) == pytest.approx(0.5) and cosine.schedule("hfd", 0.25) > 0.75


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"start": 1.0}, r"method.start=1.0: distillation must start before the end of training"),
        ({"region_margin": -0.1}, r"method.region_margin=-0.1: must be >= 0"),
        ({"pixel_margin": -1.0}, r"method.pixel_margin=-1.0: must be >= 0"),
        ({"warmup": 1.5}, r"method.warmup=1.5"),
        ({"temperature": 0.0}, r"method.temperature=0.0: must be > 0"),
    ],
)
def test_options_that_cannot_apply_fail_naming_the_field(override, message):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        MethodConfig(**override)


def test_objective_region_adapters_bridge_widths_and_follow_the_learner():
    cnn, vit, labels = student_pair()
    vit = StudentOutput(vit.low, torch.randn(2, 12, 4, 4), vit.logits)  # decoder widths 8 and 12
    cfg = MethodConfig(preset="bsd", region_adapter=True)
    objective = Objective(cfg, geometry(widths=(8, 12)))
    losses, _ = objective(cnn, vit, labels, progress=0.5)
    assert torch.isfinite(losses["region_bsd"])
    assert objective.cnn_adapter[0].weight.shape == (12, 8, 1, 1)
    cnn_side = {id(p) for p in objective.learner_modules("cnn").parameters()}
    assert {id(p) for p in objective.cnn_adapter.parameters()} <= cnn_side
    assert not {id(p) for p in objective.vit_adapter.parameters()} & cnn_side


def test_grad_ratios_scale_with_the_weight_and_vanish_without_transfer():
    cnn, vit, labels = student_pair()
    cnn = StudentOutput(cnn.low, cnn.feat.requires_grad_(), cnn.logits.requires_grad_())
    vit = StudentOutput(vit.low, vit.feat.requires_grad_(), vit.logits.requires_grad_())
    ratios = {}
    for weight in (1.0, 2.0):
        cfg = MethodConfig(preset="full", pixel_weight=weight, warmup=0)
        objective = objective_of(cfg)
        losses, _ = objective(cnn, vit, labels, progress=0.5)
        ratios[weight] = objective.grad_ratios(cnn, vit, losses)
    assert set(ratios[1.0]) == {f"ratio_{t}_{s}" for t in PRESETS["full"] for s in ("cnn", "vit")}
    for student in ("cnn", "vit"):
        assert ratios[1.0][f"ratio_pixel_bsd_{student}"] > 0
        key = f"ratio_pixel_bsd_{student}"
        torch.testing.assert_close(ratios[2.0][key], 2 * ratios[1.0][key])
    # Both students wrong everywhere: pixel BSD transfers nothing, and its ratio says so.
    wrong = (labels + 1) % K
    flat = [StudentOutput(o.low, o.feat, confident(wrong).requires_grad_()) for o in (cnn, vit)]
    objective = Objective(MethodConfig(terms=["pixel_bsd"], warmup=0), geometry([64], [32]))
    losses, _ = objective(*flat, labels, progress=0.5)
    assert objective.grad_ratios(*flat, losses)["ratio_pixel_bsd_cnn"] == 0


@pytest.mark.parametrize("learners", ["both", "cnn", "vit"])
def test_one_way_learners_leave_the_teacher_without_gradient_from_any_term(learners):
    """learners=vit: the CNN teaches in every term and learns nothing from the ViT (its CE still trains it);
    the terms and their selection are those of the two-way method."""
    cnn, vit, _ = student_pair()
    # image 0 is class 1 and only the CNN is right there, image 1 class 2 and only the ViT: every term
    # transfers in both directions
    labels = torch.tensor([1, 2])[:, None, None].expand(2, 16, 16).contiguous()
    right, wrong = confident(labels[:, ::4, ::4]), confident(torch.zeros(2, 4, 4, dtype=torch.long))
    first = torch.tensor([True, False])[:, None, None, None]
    cnn = StudentOutput(cnn.low, cnn.feat.requires_grad_(), torch.where(first, right, wrong).requires_grad_())
    vit = StudentOutput(vit.low, vit.feat.requires_grad_(), torch.where(first, wrong, right).requires_grad_())
    torch.manual_seed(0)  # the same projectors and adapters for both objectives
    objective = objective_of(MethodConfig(preset="full", start=0, warmup=0, learners=learners))
    losses, stats = objective(cnn, vit, labels, progress=0.5)
    torch.manual_seed(0)
    two_way, two_way_stats = objective_of(MethodConfig(preset="full", start=0, warmup=0))(cnn, vit, labels, 0.5)
    torch.testing.assert_close(losses, two_way)
    torch.testing.assert_close(stats, two_way_stats)
    assert all(stats[f"{kind}_{way}"] > 0 for kind in ("region", "pixel") for way in ("vit_to_cnn", "cnn_to_vit"))
    for name, out in (("cnn", cnn), ("vit", vit)):
        learns = learners in ("both", name)
        for term in ("hfd", "region_bsd", "pixel_bsd"):  # full's terms on labelled images (cross: few labels)
            xs = [*out.low, out.feat, out.logits]
            grads = torch.autograd.grad(losses[term], xs, retain_graph=True, allow_unused=True)
            assert (sum(g.abs().sum() for g in grads if g is not None) > 0) == learns, (name, term)
        own = list(objective.learner_modules(name).parameters())
        assert own and all(p.requires_grad == learns for p in own), name  # a teacher's projectors train neither
    assert torch.autograd.grad(losses["ce_cnn"], cnn.logits)[0].abs().sum() > 0


def test_random_selection_transfers_the_same_shares_elsewhere():
    """The control: as many regions / pixels in each direction as the reliable choice, at random places."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (2, 32, 32), generator=g)
    labels[:, :4] = 255  # unlabelled rows are never chosen
    zc, zv = torch.randn(2, K, 32, 32, generator=g), torch.randn(2, K, 32, 32, generator=g)
    _, reliable = pixel_bsd_loss(zc, zv, labels)
    draws = [pixel_bsd_loss(zc, zv, labels, selection="random", generator=g)[1] for _ in range(2)]
    for stats in draws:
        assert floats(stats) == pytest.approx(floats(reliable))
    # where the reliable CNN->ViT pixels are is not where the random ones are
    masks = []
    for seed in (1, 2):
        valid = labels != 255
        right_c, right_v = zc.argmax(1) == labels, zv.argmax(1) == labels
        first, second = valid & right_v & ~right_c, valid & right_c & ~right_v
        a, b = shuffled(first, second, valid, torch.Generator().manual_seed(seed))
        assert a.sum() == first.sum() and b.sum() == second.sum() and not (a & b).any()
        assert not (a & ~valid).any() and not (b & ~valid).any()
        masks.append(a)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], first)

    labels, _, cnn, vit = two_region_case()
    _, reliable = region_bsd_loss(cnn, vit, labels, region_size=4)
    _, control = region_bsd_loss(cnn, vit, labels, region_size=4, selection="random", generator=g)
    assert floats(control) == floats(reliable) == {"region_vit_to_cnn": 0.5, "region_cnn_to_vit": 0.5}


@pytest.mark.parametrize(
    ("method", "crop", "message"),
    [
        ({"preset": "bsd", "region_size": 3}, (64, 64), r"method.region_size=3: does not divide the 16x16"),
        ({"preset": "dml", "selection": "random"}, (64, 64), r"method.selection=random: .* trains none \(dml\)"),
        ({"preset": "independent", "learners": "vit"}, (64, 64), r"method.learners='vit': .* no distillation term"),
        ({"preset": "strong"}, (64, 64), r"method.preset='strong': not one of"),
        ({"terms": ["hfd", "kd"]}, (64, 64), r"method.terms: 'kd' is not one of"),
        ({"preset": "hfd", "hfd_stages": [5]}, (64, 64), r"method.hfd_stages: stage 5 does not exist"),
    ],
)
def test_method_options_that_cannot_apply_fail_at_start_naming_the_field(method, crop, message):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        Objective(MethodConfig(**method), geometry(crop=crop))


def test_a_term_registered_once_reaches_the_checks_the_objective_the_diagnostics_and_the_ablation(monkeypatch):
    """Adding a term is one row of TERMS: nothing else needs to know its name."""
    import dataclasses

    from benchmarks.ablation import arm_overrides
    from train.losses import TERMS, Term

    def logit_l2(obj, cnn, vit, labels, px):
        return (px.cnn - px.vit.detach()).square().mean() + (px.vit - px.cnn.detach()).square().mean(), {"l2_seen": 1}

    row = Term("logit_l2", "logits pulled together", "dml_weight", ("temperature",), logit_l2, lambda o, c: [o.logits])
    monkeypatch.setitem(TERMS, "logit_l2", row)
    assert arm_overrides("logit_l2", {}) == ["method.terms=[logit_l2]"]
    cnn, vit, labels = student_pair()
    cnn = StudentOutput(cnn.low, cnn.feat, cnn.logits.requires_grad_())
    vit = StudentOutput(vit.low, vit.feat, vit.logits.requires_grad_())
    objective = Objective(MethodConfig(terms=["logit_l2"], warmup=0, start=0), geometry())
    losses, stats = objective(cnn, vit, labels, progress=0.5)
    assert set(losses) == {"ce_cnn", "ce_vit", "logit_l2"} and stats["l2_seen"] == 1
    assert set(objective.grad_ratios(cnn, vit, losses)) == {"ratio_logit_l2_cnn", "ratio_logit_l2_vit"}
    monkeypatch.setitem(TERMS, "logit_l2", dataclasses.replace(row, check=lambda cfg, g: "method.logit_l2: no"))
    with pytest.raises(ConfigError, match=r"method\.logit_l2: no"):
        Objective(MethodConfig(terms=["logit_l2"]), geometry())


def test_the_docs_list_every_term_and_every_method_option():
    import dataclasses

    from tests.conftest import REPO
    from train.losses import PRESETS, TERMS

    doc = (REPO / "docs/method.md").read_text()
    for name in [*TERMS, *PRESETS]:
        assert f"`{name}`" in doc, name
    for option in (f.name for f in dataclasses.fields(MethodConfig)):
        assert f"method.{option}" in doc, option
