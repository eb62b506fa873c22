"""benchmarks/class_frequency.py's figures on a tiny label set whose answers are known: species ranked by
training count (ties by species id, absent species left out), the head's, tail's and rare species'
shares of the draws, draws per epoch, and the distance to the target."""

import numpy as np
import pytest

from benchmarks.class_frequency import class_rank, draw_stats

#: Species 3: 4 samples, species 0 and 2: 2 each (a tie), species 1: none, species 4: 1.
LABELS = np.array([3, 0, 3, 2, 4, 3, 0, 3, 2])


def test_species_are_ranked_by_count_then_id_and_absent_ones_left_out():
    species, counts = class_rank(LABELS)
    assert species.tolist() == [3, 0, 2, 4]
    assert counts.tolist() == [4, 2, 2, 1]


def test_the_shares_follow_the_rank_not_the_species_id():
    # Two epochs: species 3 drawn 2 + 0, species 0 drawn 1 + 3, species 2 drawn 1 + 0, species 4 drawn 1 + 2.
    lists = [np.array([0, 5, 1, 3, 4]), np.array([6, 1, 6, 4, 4])]
    target = np.array([0.25, 0.0, 0.25, 0.25, 0.25])  # class-balanced over the 4 present species
    got = draw_stats(LABELS, lists, target, rare_below=2, top_share=0.25)
    assert got["draws"] == 10
    assert got["realised"] == pytest.approx([0.2, 0.4, 0.1, 0.3])  # by rank: species 3, 0, 2, 4
    assert got["target"] == pytest.approx([0.25] * 4)
    assert got["top_share"] == pytest.approx(0.2)  # species 3, rank 1, although 0 was drawn most
    assert got["bottom_share"] == pytest.approx(0.3)  # species 4
    assert got["rare_share"] == pytest.approx(0.3)  # fewer than 2 samples: species 4
    assert got["draws_per_epoch"] == pytest.approx({"min": 0.5, "median": 1.25, "max": 2.0})
    assert got["samples_seen"] == pytest.approx(6 / 9)  # ids 0, 1, 3, 4, 5, 6
    assert got["tv_to_target"] == pytest.approx(0.5 * (0.05 + 0.15 + 0.15 + 0.05))
    assert draw_stats(LABELS, lists, target, rare_below=1)["rare_share"] is None  # no species has < 1
