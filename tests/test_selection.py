"""Selection: Thompson sampling, best and retirement as pure functions (prompts/select.py), then over a real store."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from app.capture.store import CaptureStore
from app.config import TemplatesConfig
from prompts import select
from prompts import store as ts
from prompts.select import Arm


def test_thompson_prefers_the_better_arm_and_still_explores():
    rng = random.Random(7)
    arms = [Arm("good", 30, 10), Arm("bad", 10, 30), Arm("new", 0, 0)]
    picks = Counter(select.thompson(arms, rng) for _ in range(2000))
    assert picks["good"] > picks["new"] > picks["bad"]
    assert picks["new"] > 100  # an untried template keeps being tried
    assert select.thompson([], rng) is None


def test_thompson_is_repeatable_with_a_seed():
    arms = [Arm("a", 3, 3), Arm("b", 3, 3), Arm("c", 3, 3)]
    first = [select.thompson(arms, random.Random(s)) for s in range(50)]
    assert first == [select.thompson(arms, random.Random(s)) for s in range(50)]
    assert len(set(first)) == 3


def test_best_is_the_highest_posterior_mean_with_enough_trials():
    arms = [Arm("many", 70, 30), Arm("few-perfect", 5, 0), Arm("lots-worse", 600, 400)]
    assert select.best(arms, min_trials=20) == "many"  # 71/102 beats 601/1002; 5 trials are not enough
    assert select.best(arms, min_trials=1) == "few-perfect"  # 6/7
    assert select.best(arms, min_trials=2000) is None
    assert Arm("x", 0, 0).mean == 0.5 and Arm("x", 8, 0).mean == 0.9


def test_prob_best_sums_to_one_and_orders_the_arms():
    chances = select.prob_best([Arm("a", 50, 50), Arm("b", 60, 40), Arm("c", 5, 95)], random.Random(1), 4000)
    assert sum(chances.values()) == pytest.approx(1.0)
    assert chances["b"] > chances["a"] > chances["c"] and chances["c"] < 0.001


def test_to_retire_needs_trials_and_never_retires_the_leader():
    rng = random.Random(3)
    arms = [Arm("leader", 80, 20), Arm("loser", 20, 80), Arm("young-loser", 0, 5)]
    assert set(select.to_retire(arms, 20, 0.05, rng)) == {"loser"}  # young-loser has 5 < 20 trials
    assert select.to_retire([Arm("only", 0, 100)], 20, 0.05, rng) == {}
    tied = [Arm("a", 0, 100), Arm("b", 0, 100)]
    assert len(select.to_retire(tied, 20, 0.6, rng)) == 1  # one of two equals goes; the other always stays
    assert select.to_retire(arms, 20, 0.0, rng) == {}  # retire_below 0: never


# ---- over the store ---------------------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    with CaptureStore.open(f"sqlite:///{tmp_path / 'c.db'}") as opened:
        yield opened


def counted(store, route, text, successes, failures):
    row = ts.add_template(store, route, text)
    for ok in [True] * successes + [False] * failures:
        store.count_template_outcome(row.id, success=ok)
    return store.get_template(row.id)


def test_best_sample_and_retire_over_a_route(store):
    good = counted(store, "retrieval", "Good prompt.", 40, 10)
    bad = counted(store, "retrieval", "Bad prompt.", 5, 45)
    young = counted(store, "retrieval", "Young prompt.", 1, 1)
    counted(store, "processing", "Other route.", 100, 0)
    assert ts.best(store, "retrieval", min_trials=20).id == good.id
    assert ts.best(store, "retrieval", min_trials=100) is None
    assert ts.best(store, "retrieval").id == good.id  # the [templates] min_trials default (20)
    picks = Counter(ts.sample(store, "retrieval", random.Random(i)).id for i in range(300))
    assert set(picks) <= {good.id, bad.id, young.id} and picks[good.id] > picks[bad.id]

    retired = ts.retire_losers(store, "retrieval", random.Random(0), TemplatesConfig(min_trials=20, retire_below=0.05))
    assert [t.id for t in retired] == [bad.id] and "probability of being best" in retired[0].retired_reason
    assert {t.id for t in ts.live_templates(store, "retrieval")} == {good.id, young.id}
    assert ts.sample(store, "nobody", random.Random(0)) is None and ts.best(store, "nobody") is None


def test_choose_registers_the_base_file_and_samples(store):
    chosen = ts.choose(store, "retrieval", random.Random(0))
    assert chosen.id == "retrieval/base@1" and chosen.origin == "base"
    assert ts.choose(store, "not-an-agent", random.Random(0)) is None
    custom = ts.add_template(store, "not-an-agent", "A proxy route's prompt.")
    assert ts.choose(store, "not-an-agent", random.Random(0)) == custom
