"""Gradient flow exactly as docs/method.md says: which loss term reaches which parameters.

The paper's flow is tested under the ``paper`` preset; the switches of "Beyond the paper" (a teacher that
refines the task on a stopped backbone, the default) have tests of their own at the end.
"""

from __future__ import annotations

import pytest
import torch

from models.config import PRESETS, ModelConfig
from models.crossdistil import CrossDistilModel, crossdistil_loss
from models.features import FeatureSpec, encode_rows

pytestmark = pytest.mark.unit

TASKS = ("click", "long_view")


def small_config(**overrides) -> ModelConfig:
    base = dict(
        tasks=TASKS, features=FeatureSpec(categorical=("user_id", "item_id"), numeric=("watch",), hash_buckets=2**10),
        hidden_dims=(16,), tower_dims=(8,), num_experts=2, seed=3, rung="crossdistil", **PRESETS["paper"],
    )
    base.update(overrides)
    return ModelConfig(**base)


def batch_with_all_categories(n: int = 32):
    rows = [
        {"user_id": f"u{i % 4}", "item_id": f"i{i}", "features": {"watch": 10 * i},
         "labels": {"click": (i // 2) % 2, "long_view": i % 2}}
        for i in range(n)
    ]
    return encode_rows(rows, small_config().features, TASKS)


def grads_of(term: str, **overrides) -> tuple[CrossDistilModel, set[str], set[str]]:
    """Backward one loss term alone; return the model, params with a gradient, params without."""
    torch.manual_seed(0)
    model = CrossDistilModel(small_config(**overrides))
    batch = batch_with_all_categories()
    total, terms = crossdistil_loss(model, model(batch), batch, torch.Generator().manual_seed(0))
    loss = total if term == "total" else terms[term].sum()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    without = {n for n, p in model.named_parameters() if p.grad is None}
    return model, with_grad, without


def group(names: set[str], prefix: str) -> set[str]:
    return {n for n in names if n.startswith(prefix)}


@pytest.mark.parametrize("term", ["bce", "kd"])
def test_bce_and_kd_reach_students_backbone_and_embeddings_only(term: str) -> None:
    model, with_grad, without = grads_of(term)
    names = {n for n, _ in model.named_parameters()}
    assert group(names, "student_towers") <= with_grad
    assert group(names, "backbone") <= with_grad
    assert "embedding.weight" in with_grad
    assert group(names, "teacher_towers") <= without and group(names, "teacher_towers")
    assert {"calibrator_alpha", "calibrator_bias"} <= without


def test_aux_loss_reaches_teachers_and_backbone_but_not_students_or_calibrators() -> None:
    model, with_grad, without = grads_of("aux")
    names = {n for n, _ in model.named_parameters()}
    assert group(names, "teacher_towers") <= with_grad
    assert group(names, "backbone") <= with_grad
    assert group(names, "student_towers") <= without
    assert {"calibrator_alpha", "calibrator_bias"} <= without


def test_calibration_loss_moves_only_the_calibrators() -> None:
    model, with_grad, _ = grads_of("cal")
    assert with_grad == {"calibrator_alpha", "calibrator_bias"}
    assert bool((model.calibrator_alpha.grad != 0).all()) and bool((model.calibrator_bias.grad != 0).all())


def test_in_mmoe_student_losses_skip_the_teacher_gates_and_aux_skips_the_student_gates() -> None:
    _, with_grad, without = grads_of("bce", backbone="mmoe")
    assert {"backbone.gates.0.weight", "backbone.gates.1.weight"} <= with_grad
    assert {"backbone.gates.2.weight", "backbone.gates.3.weight"} <= without
    _, with_grad, without = grads_of("aux", backbone="mmoe")
    assert {"backbone.gates.2.weight", "backbone.gates.3.weight"} <= with_grad
    assert {"backbone.gates.0.weight", "backbone.gates.1.weight"} <= without


def test_uncalibrated_kd_rung_still_leaves_the_teacher_alone() -> None:
    model, _, without = grads_of("kd", rung="kd")
    assert group({n for n, _ in model.named_parameters()}, "teacher_towers") <= without


def test_direct_kd_does_not_update_the_partner_student() -> None:
    torch.manual_seed(0)
    model = CrossDistilModel(small_config(rung="direct_kd"))
    batch = batch_with_all_categories()
    _, terms = crossdistil_loss(model, model(batch), batch)
    terms["kd"][0].backward()  # student "click" distilled from student "long_view"
    assert all(p.grad is not None for p in model.student_towers[0].parameters())
    # The term of task 0 is one column of a [B, K] computation: task 1's tower gets an exact zero, no more.
    assert all(p.grad is None or not p.grad.any() for p in model.student_towers[1].parameters())


def test_a_kd_only_update_leaves_teachers_and_calibrators_unchanged() -> None:
    torch.manual_seed(0)
    model = CrossDistilModel(small_config(sparse_embeddings=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    batch = batch_with_all_categories()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        _, terms = crossdistil_loss(model, model(batch), batch)
        terms["kd"].sum().backward()
        optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if name.startswith("teacher_towers") or name.startswith("calibrator"):
            assert not changed, name
    assert not torch.equal(before["student_towers.0.1.weight"], model.student_towers[0][1].weight.detach())


def test_total_loss_reaches_every_parameter_on_the_full_rung() -> None:
    _, _, without = grads_of("total", backbone="ple")
    assert without == set()


TRUST = PRESETS["trust"]


def test_a_stopped_backbone_keeps_the_teachers_out_of_backbone_and_embeddings() -> None:
    model, with_grad, without = grads_of("aux", **TRUST)
    names = {n for n, _ in model.named_parameters()}
    assert group(names, "teacher_towers") <= with_grad
    assert group(names, "backbone") <= without and "embedding.weight" in without


def test_teacher_backbone_grad_scales_the_teachers_gradient_into_the_backbone() -> None:
    def backbone_grad(scale: float) -> torch.Tensor:
        model, _, _ = grads_of("aux", teacher_backbone_grad=scale)
        return model.backbone.bottom[0].weight.grad.clone()

    assert torch.allclose(backbone_grad(0.25), 0.25 * backbone_grad(1.0), atol=1e-7)


def test_the_teachers_own_bce_reaches_the_teachers_only_on_a_stopped_backbone() -> None:
    model, with_grad, _ = grads_of("teacher_bce", **TRUST)
    assert with_grad == group({n for n, _ in model.named_parameters()}, "teacher_towers")


def test_teacher_bce_is_in_the_total_with_its_weight() -> None:
    torch.manual_seed(0)
    model = CrossDistilModel(small_config(**{**TRUST, "teacher_task_weight": 0.5}))
    batch = batch_with_all_categories()
    total, terms = crossdistil_loss(model, model(batch), batch, torch.Generator().manual_seed(0))
    expected = terms["bce"].sum() + terms["kd"].sum() + terms["aux"].sum() + terms["cal"].sum() \
        + 0.5 * terms["teacher_bce"].sum()
    assert torch.allclose(total, expected)


def test_kd_scale_multiplies_alpha_per_task() -> None:
    torch.manual_seed(0)
    model = CrossDistilModel(small_config(**TRUST))
    batch = batch_with_all_categories()
    outputs = model(batch)
    full, terms = crossdistil_loss(model, outputs, batch, torch.Generator().manual_seed(0))
    gated, _ = crossdistil_loss(model, outputs, batch, torch.Generator().manual_seed(0), torch.tensor([0.0, 1.0]))
    assert torch.allclose(full - gated, terms["kd"][0])


def test_a_label_aware_teacher_reads_the_partners_label_and_the_student_does_not() -> None:
    torch.manual_seed(0)
    model = CrossDistilModel(small_config(**{**TRUST, "teacher_partner_input": True}))
    batch = batch_with_all_categories()
    flipped = batch_with_all_categories()
    flipped.labels[:, 1] = 1.0 - flipped.labels[:, 1]  # long_view: the partner of click
    a, b = model(batch), model(flipped)
    assert torch.equal(a.student_logits, b.student_logits)
    assert not torch.equal(a.teacher_scores[:, 0], b.teacher_scores[:, 0])
    assert torch.equal(a.teacher_scores[:, 1], b.teacher_scores[:, 1])  # click labels unchanged


def test_a_residual_teacher_starts_as_its_student_and_its_losses_never_move_the_student() -> None:
    torch.manual_seed(0)
    model = CrossDistilModel(small_config(**{**TRUST, "teacher_residual": True}))
    batch = batch_with_all_categories()
    outputs = model(batch)
    assert torch.equal(outputs.teacher_scores, outputs.student_logits.detach())
    for term in ("aux", "teacher_bce"):
        _, with_grad, _ = grads_of(term, **{**TRUST, "teacher_residual": True})
        assert with_grad == group({n for n, _ in model.named_parameters()}, "teacher_towers")


@pytest.mark.parametrize("backbone", ["shared_bottom", "mmoe", "ple", "cross_stitch"])
def test_a_seed_starts_the_students_of_every_rung_where_it_starts_mtl(backbone: str) -> None:
    """Paired differences to mtl measure the method, not initialisation: the teachers' gates and experts that the
    gated backbones build among the students' own do not move the students' initial weights."""
    def initial(rung: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(11)
        return CrossDistilModel(small_config(backbone=backbone, rung=rung)).state_dict()

    plain = initial("mtl")
    for rung in ("aux", "crossdistil", "direct_kd"):
        state = initial(rung)
        for name, value in plain.items():
            assert torch.equal(state[name], value), f"{rung}: {name}"
