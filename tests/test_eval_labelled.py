"""Labelled-data budgets: parsing, and subsets that are deterministic per seed, balanced and within budget."""
from __future__ import annotations

import numpy as np
import pytest

from d2v_train.eval.labelled import (
    Budget,
    class_balanced,
    fingerprint,
    label_balanced,
    round_robin,
    speaker_balanced,
)


def test_budgets_parse_durations_counts_and_all():
    assert Budget.parse("10m").seconds == 600 and Budget.parse("1h").seconds == 3600
    assert Budget.parse("90s").seconds == 90 and Budget.parse("1.5h").seconds == 5400
    assert Budget.parse("48").count == 48 and Budget.parse("48").seconds is None
    assert Budget.parse("all").everything and Budget.parse("ALL").everything
    for bad in ("", "0", "-3", "10 minutes", "1d", "m"):
        with pytest.raises(ValueError, match="--labelled"):
            Budget.parse(bad)
    with pytest.raises(ValueError, match="a count"):
        Budget.parse("10m", durations=False)


def _corpus(seed: int = 0):
    """5 speakers with 3-30 utterances of 1-10 s each; every seventh untranscribed."""
    rng = np.random.default_rng(seed)
    speakers = np.array([f"spk{s}" for s in range(5) for _ in range(int(rng.integers(3, 31)))], dtype=object)
    seconds = rng.uniform(1, 10, len(speakers))
    eligible = np.arange(len(speakers)) % 7 != 3
    return speakers, seconds, eligible


def test_round_robin_prefixes_are_balanced_and_every_row_appears_once():
    groups = np.array(list("aaaaaabbbc"), dtype=object)
    order = round_robin(groups, seed=4)
    assert sorted(order.tolist()) == list(range(10))
    first = groups[order[:3]].tolist()
    assert sorted(first) == ["a", "b", "c"]  # one of each before any second
    assert sorted(groups[order[3:5]].tolist()) == ["a", "b"]  # c has run out
    assert (order == round_robin(groups, seed=4)).all()
    assert not (order == round_robin(groups, seed=5)).all()


def test_a_duration_budget_is_filled_closely_without_going_over_and_balanced_over_speakers():
    speakers, seconds, eligible = _corpus()
    subset = speaker_balanced(speakers, seconds, eligible, Budget.parse("2m"), seed=0)
    assert subset.seconds <= 120 + 1e-6
    assert subset.seconds >= 120 - seconds[eligible].min()  # nothing left would have fitted... nearly
    assert eligible[subset.rows].all()  # untranscribed utterances are never drawn
    per_speaker = {s: int((speakers[subset.rows] == s).sum()) for s in set(speakers.tolist())}
    assert max(per_speaker.values()) - min(per_speaker.values()) <= 2  # every speaker took turns
    assert subset.groups == 5 and (np.diff(subset.rows) > 0).all()
    again = speaker_balanced(speakers, seconds, eligible, Budget.parse("2m"), seed=0)
    assert (again.rows == subset.rows).all()
    other = speaker_balanced(speakers, seconds, eligible, Budget.parse("2m"), seed=1)
    assert set(other.rows.tolist()) != set(subset.rows.tolist())


def test_a_count_budget_takes_speakers_in_turn_and_a_budget_beyond_the_split_takes_all_of_it():
    speakers, seconds, eligible = _corpus()
    subset = speaker_balanced(speakers, seconds, eligible, Budget.parse("10"), seed=2)
    assert subset.samples == 10 and sorted(np.unique(speakers[subset.rows], return_counts=True)[1]) == [2] * 5
    everything = speaker_balanced(speakers, seconds, eligible, Budget.parse("10h"), seed=2)
    assert everything.samples == int(eligible.sum())
    assert speaker_balanced(speakers, seconds, eligible, Budget.parse("all"), seed=2).samples == int(eligible.sum())
    with pytest.raises(ValueError, match="shorter than the shortest"):
        speaker_balanced(speakers, seconds, eligible, Budget.parse("0.5s"), seed=2)
    with pytest.raises(ValueError, match="no transcribed"):
        speaker_balanced(speakers, seconds, np.zeros(len(speakers), bool), Budget.parse("1m"), seed=2)


def test_smaller_budgets_are_not_required_to_nest_but_are_deterministic():
    speakers, seconds, eligible = _corpus(3)
    small = speaker_balanced(speakers, seconds, eligible, Budget.parse("30s"), seed=0)
    large = speaker_balanced(speakers, seconds, eligible, Budget.parse("3m"), seed=0)
    assert small.seconds < large.seconds and small.samples < large.samples


def test_class_balanced_subsets_take_k_per_class_or_a_fraction_of_each():
    labels = np.repeat(np.arange(4), [10, 20, 5, 40])
    k = class_balanced(labels, seed=0, per_class=3)
    assert np.bincount(labels[k.rows]).tolist() == [3, 3, 3, 3] and k.budget == "3/class" and k.groups == 4
    f = class_balanced(labels, seed=0, fraction=0.1)
    assert np.bincount(labels[f.rows]).tolist() == [1, 2, 1, 4]  # at least one of each class
    assert (class_balanced(labels, seed=0, per_class=3).rows == k.rows).all()
    assert not (class_balanced(labels, seed=1, per_class=3).rows == k.rows).all()
    assert class_balanced(labels, seed=0, per_class=8).samples == 8 + 8 + 5 + 8  # a small class gives all it has
    for bad in ({"per_class": 0}, {"fraction": 0.0}, {"fraction": 1.5}, {}):
        with pytest.raises(ValueError):
            class_balanced(labels, seed=0, **bad)


def test_label_balanced_text_subsets():
    labels = np.array([0] * 30 + [1] * 6)
    subset = label_balanced(labels, 10, seed=0)
    assert np.bincount(labels[subset.rows]).tolist() == [5, 5]
    assert label_balanced(labels, 20, seed=0).samples == 20
    assert np.bincount(labels[label_balanced(labels, 20, seed=0).rows]).tolist() == [14, 6]
    with pytest.raises(ValueError, match="--train-limit"):
        label_balanced(labels, 0, seed=0)


def test_fingerprints_depend_on_the_set_of_keys_only():
    assert fingerprint(["b", "a"]) == fingerprint(["a", "b"]) != fingerprint(["a", "c"])


def test_curve_budgets_map_to_each_tasks_option_and_bad_ones_are_refused_before_any_run():
    from d2v_train.eval.curve_run import budget_options

    assert budget_options("speech-ctc", "10m") == ["--labelled", "10m"]
    assert budget_options("speech-ctc", "all") == []
    assert budget_options("image-probe", "4") == ["--labels-per-class", "4"]
    assert budget_options("image-finetune", "10%") == ["--label-fraction", "0.1"]
    assert budget_options("text-cls", "64") == ["--train-limit", "64"]
    for task, bad in (("speech-ctc", "lots"), ("image-probe", "5m"), ("image-probe", "0%"), ("text-cls", "1h")):
        with pytest.raises(ValueError, match="--budgets"):
            budget_options(task, bad)


def test_two_checkpoints_with_the_same_label_are_told_apart():
    from d2v_train.eval.curve_run import Run, distinct_labels
    from tests.test_eval_report import _budgeted

    runs = [Run("a/checkpoints", 0, "1m", 0, (), "x"), Run("b/checkpoints", 1, "1m", 0, (), "y"),
            Run("random", 2, "1m", 0, (), "z")]
    results = [_budgeted("step 1000", "1m", 60, 0, 0.5), _budgeted("step 1000", "1m", 60, 0, 0.6),
               _budgeted("random", "1m", 60, 0, 0.7)]
    changed = distinct_labels(runs, results)
    assert [r.label for r in results] == ["step 1000 #1", "step 1000 #2", "random"] and len(changed) == 2
