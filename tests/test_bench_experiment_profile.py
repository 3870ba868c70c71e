"""bench/experiment.py's profile: each part's wall and CPU seconds, and the rest of the run by subtraction."""

from __future__ import annotations

import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from experiment import Profile  # bench/ is not a package: on the path above


def test_split_leaves_the_rest_of_the_total_and_skips_parts_within_others():
    profile = Profile()
    profile.seconds = {"training": 3.0, "sampling (within training)": 1.0, "evaluation": 2.0}
    profile.cpu = {"training": 5.0, "sampling (within training)": 2.0, "evaluation": 3.5}
    wall, cpu = profile.split(10.0, 12.0, "rest", within=("sampling (within training)",))
    assert wall == {"training": 3.0, "sampling (within training)": 1.0, "evaluation": 2.0, "rest": 5.0}  # 10-3-2
    assert cpu["rest"] == 3.5  # 12 - 5 - 3.5
    assert profile.split(10.0, 12.0, "rest")[0]["rest"] == 4.0  # nothing within another: 10 - 3 - 1 - 2


def test_wrap_times_every_call_under_its_part_and_returns_the_result():
    module = types.SimpleNamespace(train=lambda steps: steps * 2)
    profile = Profile()
    profile.wrap(module, "train", "training")
    assert module.train(3) == 6 and module.train(steps=4) == 8
    assert set(profile.seconds) == set(profile.cpu) == {"training"}
    assert profile.seconds["training"] >= 0.0 and profile.cpu["training"] >= 0.0
