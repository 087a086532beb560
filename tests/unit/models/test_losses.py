"""Each loss term of docs/method.md against values computed by hand."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.losses import (
    ALL_LEVEL_PAIRS,
    LevelPairs,
    calibration_loss,
    correct_errors,
    dense_ranks,
    kd_loss,
    platt_calibrate,
    quadruplet_categories,
    quadruplet_loss,
    task_bce,
)

pytestmark = pytest.mark.unit


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(tensor: torch.Tensor, expected: float) -> bool:
    return math.isclose(float(tensor.detach()), expected, rel_tol=1e-6, abs_tol=1e-7)


def test_categories_put_the_own_label_above_the_partner_label() -> None:
    own = torch.tensor([1.0, 1.0, 0.0, 0.0])
    partner = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert quadruplet_categories(own, partner).tolist() == [3, 2, 1, 0]


def test_quadruplet_loss_on_adjacent_levels_sums_one_bpr_term_per_level() -> None:
    r = torch.tensor([3.0, 1.0, 0.5, -1.0])
    c = torch.tensor([3, 2, 1, 0])
    expected = softplus(-(3.0 - 1.0)) + softplus(-(1.0 - 0.5)) + softplus(-(0.5 + 1.0))
    assert close(quadruplet_loss(r, c), expected)


def test_quadruplet_loss_averages_over_all_pairs_within_a_level() -> None:
    r = torch.tensor([2.0, 0.0, 1.0, -1.0])
    c = torch.tensor([1, 1, 0, 0])
    pairs = [(2.0, 1.0), (2.0, -1.0), (0.0, 1.0), (0.0, -1.0)]
    expected = sum(softplus(-(a - b)) for a, b in pairs) / 4
    assert close(quadruplet_loss(r, c), expected)


def test_quadruplet_loss_all_pairs_variant_uses_the_six_level_pairs() -> None:
    r = torch.tensor([3.0, 1.0, 0.5, -1.0])
    c = torch.tensor([3, 2, 1, 0])
    expected = sum(softplus(-(r[i] - r[j]).item()) for i in range(4) for j in range(i + 1, 4))
    assert close(quadruplet_loss(r, c, pairs="all"), expected)


def test_quadruplet_loss_margin_shifts_every_pair() -> None:
    r = torch.tensor([1.0, 0.0])
    c = torch.tensor([1, 0])
    assert close(quadruplet_loss(r, c, margin=0.5), softplus(0.5 - 1.0))


def test_empty_levels_contribute_nothing() -> None:
    r = torch.tensor([1.0, 2.0, 0.0], requires_grad=True)
    c = torch.tensor([3, 3, 0])  # levels 2 and 1 empty: no adjacent pair exists
    loss = quadruplet_loss(r, c)
    assert float(loss.detach()) == 0.0
    assert close(quadruplet_loss(r, c, pairs="all"), (softplus(-1.0) + softplus(-2.0)) / 2)


def test_same_user_variant_only_pairs_rows_of_one_user() -> None:
    r = torch.tensor([1.0, 0.0, 5.0, -5.0])
    c = torch.tensor([1, 0, 1, 0])
    users = torch.tensor([7, 7, 9, 9])
    expected = (softplus(-1.0) + softplus(-10.0)) / 2  # (0,1) and (2,3); cross-user pairs excluded
    assert close(quadruplet_loss(r, c, users=users), expected)


def _pair_frequencies(categories: list[int], high: int, low: int, users: list[int] | None = None,
                      draws: int = 60_000) -> dict[tuple[int, int], float]:
    sampler = LevelPairs(torch.tensor(categories), torch.tensor(users) if users is not None else None)
    a, b, exists = sampler.sample([(high, low)], draws, torch.Generator().manual_seed(3))
    assert exists.tolist() == [[True]]
    counts = Counter(zip(a.flatten().tolist(), b.flatten().tolist()))
    return {pair: n / draws for pair, n in counts.items()}


def test_level_pairs_are_uniform_over_every_pair_of_the_two_levels() -> None:
    categories = [3, 0, 3, 2, 2, 1, 2, 3]  # level 3: rows 0, 2, 7; level 2: rows 3, 4, 6
    frequencies = _pair_frequencies(categories, 3, 2)
    assert set(frequencies) == {(a, b) for a in (0, 2, 7) for b in (3, 4, 6)}
    assert all(abs(f - 1 / 9) < 0.01 for f in frequencies.values())  # 60k draws: std of a frequency ~0.0013


def test_same_user_pairs_are_uniform_over_the_pairs_of_each_user() -> None:
    # user 5: high rows 0, 1 x low rows 2  -> 2 pairs; user 9: high row 3 x low rows 4, 5, 6 -> 3 pairs;
    # user 7 has a high row and no low row: no pair. Every one of the 5 pairs is equally likely.
    categories = [1, 1, 0, 1, 0, 0, 0, 1]
    users = [5, 5, 5, 9, 9, 9, 9, 7]
    frequencies = _pair_frequencies(categories, 1, 0, users)
    assert set(frequencies) == {(0, 2), (1, 2), (3, 4), (3, 5), (3, 6)}
    assert all(abs(f - 1 / 5) < 0.01 for f in frequencies.values())


def test_users_with_large_hashes_are_told_apart() -> None:
    users = [2**62 + 1, 2**62 + 1, 2**62 + 2, 2**62 + 2]
    frequencies = _pair_frequencies([1, 0, 1, 0], 1, 0, users, draws=2000)
    assert set(frequencies) == {(0, 1), (2, 3)}


@pytest.mark.parametrize("max_pairs", [64, 4096])  # 100 x 100 pairs: sampled (> 16 x 64), exact (<= 16 x 4096)
def test_an_empty_level_gives_no_pair_and_no_loss(max_pairs: int) -> None:
    sampler = LevelPairs(torch.tensor([3, 3, 0, 0]))
    _, _, exists = sampler.sample([(2, 1), (3, 0)], 16, torch.Generator().manual_seed(0))
    assert exists.tolist() == [[False, True]]
    scores = torch.randn(100, requires_grad=True)
    categories = torch.tensor([3] * 50 + [0] * 50)  # levels 2 and 1 empty: no adjacent pair exists
    loss = quadruplet_loss(scores, categories, max_pairs_per_level=max_pairs,
                           generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(scores.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("max_pairs", [64, 4096])
def test_a_level_pair_without_a_shared_user_gives_no_loss(max_pairs: int) -> None:
    users = torch.arange(100)  # every row its own user: no same-user pair at all
    categories = torch.tensor([1, 0] * 50)
    loss = quadruplet_loss(torch.randn(100), categories, users=users, max_pairs_per_level=max_pairs,
                           generator=torch.Generator().manual_seed(0))
    assert float(loss) == 0.0


def test_the_exact_path_is_the_mean_over_every_pair_of_each_level_pair() -> None:
    generator = torch.Generator().manual_seed(6)
    scores = torch.randn(40, generator=generator)
    categories = torch.randint(0, 4, (40,), generator=generator)
    users = torch.randint(0, 3, (40,), generator=generator)
    for same_user in (None, users):
        expected = 0.0
        for high, low in ((1, 0), (2, 1), (3, 2)):
            terms = [softplus(-(scores[a] - scores[b]).item()) for a in range(40) for b in range(40)
                     if categories[a] == high and categories[b] == low
                     and (same_user is None or same_user[a] == same_user[b])]
            expected += sum(terms) / len(terms) if terms else 0.0
        assert close(quadruplet_loss(scores, categories, users=same_user), expected)


def test_the_sampled_loss_is_the_exact_mean_in_expectation() -> None:
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(120, generator=generator)
    categories = torch.randint(0, 4, (120,), generator=generator)
    users = torch.randint(0, 6, (120,), generator=generator)
    for same_user in (None, users):
        exact = float(quadruplet_loss(scores, categories, users=same_user))  # 120 x 120 pairs: the exact path
        sampled = [float(quadruplet_loss(scores, categories, users=same_user, max_pairs_per_level=512,
                                         generator=generator)) for _ in range(200)]
        assert abs(sum(sampled) / len(sampled) - exact) < 0.01 * exact


def test_dense_ranks_give_equal_values_equal_ranks() -> None:
    assert dense_ranks(torch.tensor([5, -3, 5, 2**62, -3])).tolist() == [1, 0, 1, 2, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_quadruplet_loss_never_synchronises_with_the_host_on_a_gpu() -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(4096, device=device, requires_grad=True)
    categories = torch.randint(0, 4, (4096,), device=device)
    users = torch.randint(0, 50, (4096,), device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for same_user in (None, users):
            quadruplet_loss(scores, categories, users=same_user, pairs="all", generator=generator).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_task_bce_is_per_task_mean_cross_entropy() -> None:
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    expected_0 = (-math.log(0.5) - math.log(1 - sigmoid(1.0))) / 2
    expected_1 = (-math.log(1 - sigmoid(2.0)) - math.log(1 - sigmoid(-1.0))) / 2
    out = task_bce(logits, labels)
    assert close(out[0], expected_0) and close(out[1], expected_1)


def test_platt_calibrate_is_a_positive_slope_and_a_bias() -> None:
    r = torch.tensor([[2.0, -1.0]])
    z = platt_calibrate(r, alpha=torch.tensor([math.log(math.e - 1.0), 0.0]), bias=torch.tensor([0.5, -0.25]))
    assert close(z[0, 0], 2.0 + 0.5)  # softplus(log(e-1)) = 1
    assert close(z[0, 1], -math.log(2.0) - 0.25)  # softplus(0) = log 2


def test_calibration_loss_is_bce_of_the_calibrated_logit() -> None:
    z = torch.tensor([1.5, -0.5])
    y = torch.tensor([1.0, 1.0])
    expected = (-math.log(sigmoid(1.5)) - math.log(sigmoid(-0.5))) / 2
    assert close(calibration_loss(z, y), expected)


def test_clamp_correction_moves_only_wrong_side_logits_to_the_margin() -> None:
    z = torch.tensor([-2.0, 3.0, 0.5, -4.0])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert correct_errors(z, y, "clamp", margin=0.0).tolist() == [0.0, 3.0, 0.0, -4.0]
    assert correct_errors(z, y, "clamp", margin=1.0).tolist() == [1.0, 3.0, -1.0, -4.0]


def test_mix_correction_mixes_probabilities_with_the_label() -> None:
    z = torch.tensor([0.0, 0.0])
    y = torch.tensor([1.0, 0.0])
    out = correct_errors(z, y, "mix", mix=0.5)
    assert close(out[0], math.log(3.0))  # 0.5 * 0.5 + 0.5 = 0.75
    assert close(out[1], -math.log(3.0))  # 0.25


def test_no_correction_is_the_identity() -> None:
    z = torch.tensor([-2.0, 3.0])
    assert torch.equal(correct_errors(z, torch.tensor([1.0, 0.0]), "none"), z)


def test_unknown_correction_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="error-correction mode"):
        correct_errors(torch.zeros(1), torch.zeros(1), "bogus")


def test_kd_loss_is_temperature_squared_soft_label_cross_entropy() -> None:
    s, z, t = torch.tensor([1.0]), torch.tensor([3.0]), 2.0
    p, q = sigmoid(1.0 / t), sigmoid(3.0 / t)
    expected = t * t * -(q * math.log(p) + (1 - q) * math.log(1 - p))
    assert close(kd_loss(s, z, temperature=t), expected)


def test_kd_loss_never_sends_gradient_to_the_teacher_logit() -> None:
    s = torch.tensor([0.3], requires_grad=True)
    z = torch.tensor([1.2], requires_grad=True)
    kd_loss(s, z).sum().backward()
    assert z.grad is None and s.grad is not None


logits = st.lists(st.floats(-60.0, 60.0, allow_nan=False), min_size=1, max_size=64)


@settings(max_examples=200, deadline=None)
@given(z=logits, data=st.data(), margin=st.floats(0.0, 5.0), mix=st.floats(0.5, 1.0))
def test_correction_never_leaves_a_soft_label_on_the_wrong_side(z: list[float], data, margin: float,
                                                                mix: float) -> None:
    y = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=len(z), max_size=len(z))))
    z_t = torch.tensor(z)
    for mode in ("clamp", "mix"):
        corrected = correct_errors(z_t, y, mode, margin=margin, mix=mix)
        assert bool((corrected[y == 1] >= 0).all()), mode
        assert bool((corrected[y == 0] <= 0).all()), mode
    clamped = correct_errors(z_t, y, "clamp", margin=margin)
    assert bool((clamped[y == 1] >= margin).all()) and bool((clamped[y == 0] <= -margin).all())


@settings(max_examples=200, deadline=None)
@given(z=logits, data=st.data(), margin=st.floats(0.0, 5.0), mix=st.floats(0.0, 1.0))
def test_every_mode_keeps_or_moves_the_soft_label_toward_the_truth(z: list[float], data, margin: float,
                                                                   mix: float) -> None:
    y = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=len(z), max_size=len(z))))
    z_t = torch.tensor(z)
    before = (torch.sigmoid(z_t) - y).abs()
    for mode in ("clamp", "mix", "none"):
        after = (torch.sigmoid(correct_errors(z_t, y, mode, margin=margin, mix=mix)) - y).abs()
        assert bool((after <= before + 1e-5).all()), mode  # 1e-5: logit(eps=1e-6) round trip in "mix"


def test_partner_weight_scales_only_the_pairs_the_partner_decides() -> None:
    import torch.nn.functional as F

    from models.losses import decided_by_partner

    scores = torch.tensor([0.3, -0.2, 0.5, 0.1])
    categories = torch.tensor([3, 2, 1, 0])  # one row per level: pairs (3,2), (2,1), (1,0)
    full = quadruplet_loss(scores, categories)
    own_only = quadruplet_loss(scores, categories, partner_weight=0.0)
    assert torch.allclose(own_only, F.softplus(-(scores[1] - scores[2])))  # (2, 1): the only pair about task k
    half = quadruplet_loss(scores, categories, partner_weight=0.5)
    assert torch.allclose(half, own_only + 0.5 * (full - own_only))
    assert [decided_by_partner(h, lo) for h, lo in ((3, 2), (2, 1), (1, 0), (3, 1), (2, 0))] == \
        [True, False, True, False, False]


def test_every_pair_at_once_equals_the_indexed_pairs() -> None:
    torch.manual_seed(1)
    scores, categories = torch.randn(40), torch.randint(0, 4, (40,))
    dense = quadruplet_loss(scores, categories, max_pairs_per_level=10_000)  # all pairs, as a matrix
    users = torch.zeros(40, dtype=torch.long)  # one user: same-user pairs are all pairs, built from indices
    indexed = quadruplet_loss(scores, categories, max_pairs_per_level=10_000, users=users)
    assert torch.allclose(dense, indexed)


@pytest.mark.parametrize("same_user", [False, True])
@pytest.mark.parametrize("size", [60, 3000])  # the exact path, the sampled one
def test_every_task_at_once_equals_one_task_at_a_time(same_user: bool, size: int) -> None:
    # The tasks' pairs come from one draw of rand(K, P, 2, n): the draws of each task and level pair in turn, so a
    # [B, K] call gives each task's loss of the [B] calls made in order with the same generator, to the last bit.
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(size, 3, generator=generator)
    categories = torch.randint(0, 4, (size, 3), generator=generator)
    users = torch.randint(0, 40, (size,), generator=generator) if same_user else None
    together = quadruplet_loss(scores, categories, users=users, pairs="all", max_pairs_per_level=128,
                               generator=torch.Generator().manual_seed(9))
    one_at_a_time = torch.Generator().manual_seed(9)
    alone = [quadruplet_loss(scores[:, k], categories[:, k], users=users, pairs="all", max_pairs_per_level=128,
                             generator=one_at_a_time) for k in range(3)]
    assert together.shape == (3,) and torch.equal(together, torch.stack(alone))


@pytest.mark.parametrize("same_user", [False, True])
def test_each_task_draws_its_pairs_from_its_own_levels(same_user: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    categories = torch.randint(0, 4, (500, 2), generator=generator)
    users = torch.randint(0, 5, (500,), generator=generator) if same_user else None
    a, b, exists = LevelPairs(categories, users).sample(ALL_LEVEL_PAIRS, 64, generator)
    assert a.shape == b.shape == (2, 6, 64) and bool(exists.all())
    for k in range(2):
        for p, (high, low) in enumerate(ALL_LEVEL_PAIRS):
            assert set(categories[a[k, p], k].tolist()) == {high} and set(categories[b[k, p], k].tolist()) == {low}
            if same_user:
                assert torch.equal(users[a[k, p]], users[b[k, p]])
