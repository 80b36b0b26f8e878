"""Template selection as plain functions over (id, successes, failures): Thompson sampling, the best template, and
which templates to retire. `prompts/store.py` applies them to a route's live templates.

Each template's success rate has the posterior Beta(successes + 1, failures + 1) (a uniform prior). Sampling one
draw per template and taking the highest explores a template in proportion to its chance of being the best, so a
new template gets tried and a bad one fades without a fixed split.

    >>> import random
    >>> thompson([Arm("a", 90, 10), Arm("b", 10, 90)], random.Random(0))
    'a'
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Arm:
    id: str
    successes: int
    failures: int

    @property
    def trials(self) -> int:
        return self.successes + self.failures

    @property
    def mean(self) -> float:
        """The posterior mean of the success rate, (s + 1) / (s + f + 2)."""
        return (self.successes + 1) / (self.trials + 2)

    def draw(self, rng: random.Random) -> float:
        return rng.betavariate(self.successes + 1, self.failures + 1)


def thompson(arms: Sequence[Arm], rng: random.Random) -> str | None:
    """One Thompson-sampling pick: the id whose Beta draw is highest (None when there are no arms)."""
    if not arms:
        return None
    return max(arms, key=lambda arm: arm.draw(rng)).id


def best(arms: Sequence[Arm], min_trials: int) -> str | None:
    """The id with the highest posterior mean among arms with at least `min_trials` outcomes (ties: the first)."""
    ready = [arm for arm in arms if arm.trials >= min_trials]
    return max(ready, key=lambda arm: arm.mean).id if ready else None


def prob_best(arms: Sequence[Arm], rng: random.Random, draws: int = 2000) -> dict[str, float]:
    """Monte Carlo estimate of each arm's probability of having the highest success rate."""
    wins = dict.fromkeys((arm.id for arm in arms), 0)
    if not arms:
        return {}
    for _ in range(draws):
        wins[max(arms, key=lambda arm: arm.draw(rng)).id] += 1
    return {arm_id: count / draws for arm_id, count in wins.items()}


def to_retire(arms: Sequence[Arm], min_trials: int, retire_below: float, rng: random.Random,
              draws: int = 2000) -> dict[str, float]:
    """`{id: probability of being best}` for the arms to retire: those with `min_trials` outcomes whose probability
    is under `retire_below`. The arm most likely to be best is never among them, so a route keeps one template."""
    if len(arms) < 2 or retire_below <= 0:
        return {}
    chances = prob_best(arms, rng, draws)
    leader = max(arms, key=lambda arm: (chances[arm.id], arm.mean)).id
    return {arm.id: chances[arm.id] for arm in arms
            if arm.id != leader and arm.trials >= min_trials and chances[arm.id] < retire_below}
