"""Online count features: exact counts of the rows seen before, lazy forgetting equal to eager forgetting, never a
row's own label, saved and served with the model."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch

import models.wide
from models.config import LEGACY_VALUES, ModelConfig
from models.counts import DEFAULT_COUNT_FEATURES, CountFeatures
from models.features import FeatureSpec, encode_rows
from models.learner import Learner, ServingModel

pytestmark = pytest.mark.unit

TASKS = ("click", "long_view")
SPEC = FeatureSpec(categorical=("user_id", "item_id", "hour"), numeric=("watch",), hash_buckets=2**10)


def stream(seed: int, batches: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (rows [B, 3] with few distinct users and items, so rows repeat within and across batches, labels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        rows = torch.stack([torch.randint(0, 6, (size,), generator=g), torch.randint(100, 104, (size,), generator=g),
                            torch.randint(200, 224, (size,), generator=g)], dim=1)
        out.append((rows, (torch.rand(size, 2, generator=g) < 0.4).float()))
    return out


def reference(seen: list[tuple[torch.Tensor, torch.Tensor]], query: torch.Tensor, columns: tuple[int, ...],
              smoothing: float, half_life: int = 0) -> torch.Tensor:
    """The inputs by the module's definition, from the rows seen so far, each weighted by 2^(-rows after it / H)."""
    n_total = sum(len(labels) for _, labels in seen)
    counts: dict[tuple[int, int], list[float]] = {}
    totals = [0.0, 0.0, 0.0]
    done = 0
    for rows, labels in seen:
        done += len(labels)
        kept = 0.5 ** ((n_total - done) / half_life) if half_life else 1.0
        for r in range(len(labels)):
            values = [kept, kept * float(labels[r, 0]), kept * float(labels[r, 1])]
            totals = [t + v for t, v in zip(totals, values)]
            for c in columns:
                acc = counts.setdefault((c, int(rows[r, c])), [0.0, 0.0, 0.0])
                counts[(c, int(rows[r, c]))] = [a + v for a, v in zip(acc, values)]
    prior = [(totals[1] + 1) / (totals[0] + 2), (totals[2] + 1) / (totals[0] + 2)]
    out = []
    for row in query:
        features = []
        for c in columns:
            n, p0, p1 = counts.get((c, int(row[c])), [0.0, 0.0, 0.0])
            features += [math.log1p(n) / 5] + [4 * ((p + smoothing * q) / (n + smoothing) - q)
                                                for p, q in zip((p0, p1), prior)]
        out.append(features)
    return torch.tensor(out)


@pytest.mark.parametrize("half_life", [0, 40])
def test_the_inputs_are_the_counts_of_the_rows_seen_before_forgetting_lazily_as_if_eagerly(half_life: int) -> None:
    counts = CountFeatures(SPEC, tasks=2, fields=("user_id", "item_id"), smoothing=3.0, half_life=half_life)
    batches = stream(0, 12)
    for i, (rows, labels) in enumerate(batches):
        expected = reference(batches[:i], rows, (0, 1), 3.0, half_life)
        torch.testing.assert_close(counts(rows), expected, rtol=1e-5, atol=1e-5)  # before this batch's labels
        counts.add(rows, labels)
    assert int(counts.clock) == 12 * 16
    untouched = torch.tensor([[5, 103, 200]])  # read long after its last update: aged at reading time
    torch.testing.assert_close(counts(untouched), reference(batches, untouched, (0, 1), 3.0, half_life),
                               rtol=1e-5, atol=1e-5)


def test_a_cross_counts_each_pair_of_values_apart() -> None:
    """``"user_id*hour"``: the inputs of the cross are the counts keyed by the (user, hour) pair, after the single
    fields' inputs whatever the order given; a cross of a field the spec lacks is left out like a field."""
    spec = FeatureSpec(categorical=SPEC.categorical, numeric=SPEC.numeric, hash_buckets=2**16)  # no collisions
    counts = CountFeatures(spec, tasks=2, fields=("user_id*hour", "item_id", "user_id*tab"), smoothing=2.0)
    assert counts.fields == ("item_id", "user_id*hour") and counts.width == 6
    batches = stream(2, 10)
    pair_of = {}  # the stream's (user, hour) pairs and the rows they are counted in: one row per pair
    for rows, _ in batches:
        crossed = counts._flat_rows(rows).view(len(rows), 2)[:, 1] - spec.hash_buckets
        for (user, hour), row in zip(rows[:, [0, 2]].tolist(), crossed.tolist()):
            assert pair_of.setdefault((user, hour), row) == row
    assert len(set(pair_of.values())) == len(pair_of) > 60
    keyed = [(torch.stack([rows[:, 1], rows[:, 0] * 1000 + rows[:, 2]], dim=1), labels) for rows, labels in batches]
    for i, (rows, labels) in enumerate(batches):
        expected = reference(keyed[:i], keyed[i][0], (0, 1), 2.0)
        torch.testing.assert_close(counts(rows), expected, rtol=1e-5, atol=1e-5)
        counts.add(rows, labels)
    with pytest.raises(ValueError, match="count_features: expected FIELD\\*FIELD"):
        config(count_features="user_id, user_id*")


def test_a_cross_may_lean_on_its_field_with_its_own_smoothing() -> None:
    """``cross_prior="field"``: a cross's rate is smoothed towards its first counted field's rate (the user's for
    ``user_id*hour``; the stream's for ``item_id*hour``, whose fields are not counted alone) with ``cross_smoothing``,
    and read as the difference from it; the single fields are as before."""
    spec = FeatureSpec(categorical=SPEC.categorical, numeric=SPEC.numeric, hash_buckets=2**16)
    a, a_cross = 2.0, 7.0
    counts = CountFeatures(spec, tasks=2, fields=("user_id", "user_id*hour", "item_id*hour"), smoothing=a,
                           cross_smoothing=a_cross, cross_prior="field")
    assert counts.cross_parents == (0, -1) and counts.width == 9
    keys = [lambda r: ("u", int(r[0])), lambda r: ("uh", int(r[0]), int(r[2])), lambda r: ("ih", int(r[1]), int(r[2]))]
    seen: dict[tuple, list[float]] = {}
    totals = [0.0, 0.0, 0.0]
    for rows, labels in stream(3, 12):
        prior = [(totals[1] + 1) / (totals[0] + 2), (totals[2] + 1) / (totals[0] + 2)]
        expected = []
        for row in rows:
            (nu, *pu), (nc, *pc), (ni, *pi) = (seen.get(key(row), [0.0, 0.0, 0.0]) for key in keys)
            user = [(p + a * q) / (nu + a) for p, q in zip(pu, prior)]
            by_hour = [(p + a_cross * u) / (nc + a_cross) for p, u in zip(pc, user)]
            by_item = [(p + a_cross * q) / (ni + a_cross) for p, q in zip(pi, prior)]
            expected.append([math.log1p(nu) / 5] + [4 * (u - q) for u, q in zip(user, prior)]
                            + [math.log1p(nc) / 5] + [4 * (c - u) for c, u in zip(by_hour, user)]
                            + [math.log1p(ni) / 5] + [4 * (c - q) for c, q in zip(by_item, prior)])
        torch.testing.assert_close(counts(rows), torch.tensor(expected), rtol=1e-5, atol=1e-5)
        counts.add(rows, labels)
        for row, label in zip(rows, labels.tolist()):
            totals = [t + v for t, v in zip(totals, [1.0, *label])]
            for key in keys:
                seen[key(row)] = [s + v for s, v in zip(seen.get(key(row), [0.0, 0.0, 0.0]), [1.0, *label])]
    # a pair never seen reads 0 beside a known user: the user's level is in the user's inputs alone
    fresh = torch.tensor([[int(rows[0, 0]), 999, 9999]])
    assert counts(fresh)[0, 3:].abs().max() < 1e-6 and counts(fresh)[0, 1:3].abs().max() > 0.01
    with pytest.raises(ValueError, match="count_cross_prior"):
        config(count_cross_prior="user")
    with pytest.raises(ValueError, match="count_cross_smoothing"):
        config(count_cross_smoothing=-1.0)


def test_the_crosses_own_smoothing_alone_keeps_the_streams_prior() -> None:
    """``cross_smoothing`` without ``cross_prior="field"`` changes the crosses' a alone; with neither, the inputs
    are those of one smoothing for all (the path of before, to the last bit)."""
    spec = FeatureSpec(categorical=SPEC.categorical, numeric=SPEC.numeric, hash_buckets=2**16)
    fields = ("user_id", "user_id*hour")
    plain, same, own = (CountFeatures(spec, 2, fields, smoothing=3.0, cross_smoothing=c) for c in (None, 3.0, 9.0))
    singles = CountFeatures(spec, 2, ("user_id",), smoothing=3.0)
    crossed = CountFeatures(spec, 2, ("user_id*hour",), smoothing=9.0)
    for rows, labels in stream(4, 6):
        assert torch.equal(plain(rows), same(rows))
        torch.testing.assert_close(own(rows), torch.cat([singles(rows), crossed(rows)], dim=1), rtol=0, atol=1e-6)
        for module in (plain, same, own, singles, crossed):
            module.add(rows, labels)


def test_padding_rows_count_for_nothing_and_the_clock_counts_rows() -> None:
    padded, plain = (CountFeatures(SPEC, 2, ("user_id",), half_life=10) for _ in range(2))
    rows, labels = stream(1, 1)[0]
    plain.add(rows[:10], labels[:10])
    padded.add(rows, labels, weights=torch.tensor([1.0] * 10 + [0.0] * 6))
    every_row = torch.arange(SPEC.hash_buckets).unsqueeze(1)  # (a padding row's stamp may move: it reads the same)
    torch.testing.assert_close(padded(every_row), plain(every_row))
    torch.testing.assert_close(padded.totals, plain.totals)
    assert int(padded.clock) == int(plain.clock) == 10


def test_absent_fields_are_left_out_and_no_fields_means_the_model_of_before() -> None:
    counts = CountFeatures(SPEC, 2, ("user_id", "tab", "item_id"))
    assert counts.fields == ("user_id", "item_id") and counts.columns == (0, 1) and counts.width == 6
    without = Learner(config(count_features=()))
    assert without.model.counts is None and not any(k.startswith("counts.") for k in without.model.state_dict())
    assert config(count_features="user_id, item_id").count_features == ("user_id", "item_id")
    for bad in ({"count_smoothing": 0.0}, {"count_half_life": -1}):
        with pytest.raises(ValueError, match="count_"):
            config(**bad)


def test_a_field_a_user_named_that_the_data_lacks_is_warned_about_once_and_the_defaults_are_not(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.wide, "_warned_absent", set())  # what earlier tests were warned about
    with caplog.at_level(logging.WARNING, logger="models.counts"):
        CountFeatures(SPEC, 2, DEFAULT_COUNT_FEATURES)  # tab, video_type and music_type are not fields of SPEC
        assert not caplog.records
        for _ in range(2):  # a grid builds a model per run: said once
            CountFeatures(SPEC, 2, ("usr_id", "item_id", "usr_id*hour", "user_id*tab"))
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith("count_features: ['usr_id', 'usr_id*hour'] name(s) no categorical feature of the data "
                              "(user_id, item_id, hour)")


def config(**overrides) -> ModelConfig:
    base = dict(tasks=TASKS, features=SPEC, hidden_dims=(8,), tower_dims=(4,), seed=3, rung="mtl")
    return ModelConfig(**{**base, **overrides})


def rows(start: int, n: int = 32, flip: bool = False) -> list[dict]:
    return [{"user_id": f"u{i % 5}", "item_id": f"i{i % 7}", "features": {"hour": i % 24, "watch": i % 3},
             "labels": {"click": int((i % 5 < 2) != flip), "long_view": int((i % 7 < 2) != flip)}}
            for i in range(start, start + n)]


def test_a_prediction_never_sees_its_own_label_and_the_next_one_sees_it() -> None:
    learners = [Learner(config()), Learner(config())]
    for learner in learners:
        learner.step(encode_rows(rows(0), SPEC, TASKS))
    same = [learner.step(encode_rows(rows(32, flip=flip), SPEC, TASKS))[1] for learner, flip in
            zip(learners, (False, True))]
    for task in TASKS:  # labels differ, predictions of that step do not
        assert torch.equal(same[0][task], same[1][task])
    after = [learner.model.counts(encode_rows(rows(64), SPEC, TASKS).categorical) for learner in learners]
    assert not torch.equal(after[0], after[1])  # the next batch reads them


def test_counts_survive_a_checkpoint_and_serve_as_the_learner_predicts() -> None:
    learner = Learner(config(count_half_life=50))
    for i in range(4):
        learner.step(encode_rows(rows(32 * i), SPEC, TASKS))
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    resumed = Learner.from_state_dict(torch.load(buffer, weights_only=True))
    for i in range(4, 6):
        assert learner.step(encode_rows(rows(32 * i), SPEC, TASKS))[0] == \
            resumed.step(encode_rows(rows(32 * i), SPEC, TASKS))[0]
    tensors, metadata = learner.serving_state()
    assert {"counts.table", "counts.totals", "counts.clock", "counts.stamp"} <= set(tensors)
    b = encode_rows(rows(500), SPEC, TASKS)
    served = ServingModel.from_serving_state(tensors, metadata).score(b)
    for task in TASKS:
        assert torch.equal(served[task], learner.predict(b)[task])


def test_a_checkpoint_from_before_the_counts_loads_without_them() -> None:
    old = Learner(config(count_features=()))
    state = old.state_dict()
    for key in ("count_features", "count_smoothing", "count_half_life"):
        state["config"].pop(key)
    assert LEGACY_VALUES["count_features"] == [] and Learner.from_state_dict(state).model.counts is None
