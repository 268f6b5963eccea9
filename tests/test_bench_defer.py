"""The logic of `python -m bench.defer` that decides its figure, on made-up answers (no server, no timing): which
sample a round requests and when the server counts as answering without the request's adapters."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.defer import applied_at, consulted, pick, stale_for


def _answer(sent: float, adapters: str | None, status: int | None = 200) -> dict:
    return {"sent": sent, "done": sent + 0.05, "status": status,
            "adapters": None if adapters is None else [adapters]}


def test_consulted_reads_the_space_separated_adapters_of_every_prediction() -> None:
    assert consulted({"adapters": ["1 4 7", "4 9"]}) == {1, 4, 7, 9}
    assert consulted({"status": None, "error": "refused"}) == set()


def test_applied_after_the_last_stale_answer_from_any_worker() -> None:
    answers = [_answer(1.0, "3 5 8"), _answer(1.1, "0 2 5"),  # one worker has applied it...
               _answer(1.2, "3 5 8"),  # ...the other not yet
               _answer(1.25, None, status=None),  # a failed request says nothing either way
               _answer(1.3, "0 2 5"), _answer(1.4, "0 2 5")]
    defer = stale_for({"kind": "defer", "adapters": [3, 6]})
    assert applied_at(answers, defer) == pytest.approx(1.35)
    assert applied_at(answers[:3], defer) is None  # the last answer is still stale
    assert applied_at(answers, stale_for({"kind": "defer", "adapters": [7]})) == pytest.approx(1.05)  # never stale


def test_after_a_batch_stale_is_the_old_version_or_any_quarantine() -> None:
    stale = stale_for({"kind": "batch", "version_before": "3"})
    assert stale({"version": "3", "quarantine": ""})
    assert stale({"version": "4", "quarantine": "1,5"})
    assert not stale({"version": "4", "quarantine": ""})


def test_pick_takes_a_sample_of_the_probes_adapters_adding_the_fewest_to_the_quarantine() -> None:
    routing = pd.DataFrame({"sample_id": ["a", "b", "c", "d"],
                            "adapters": [[2, 3, 4], [2, 5, 6], [7, 8, 9], [2, 5, 7]]})
    assert pick(routing, {2}, {5, 6}, set(), seed=0) == ("b", [2, 5, 6])
    assert pick(routing, {2}, {5, 6}, {"b"}, seed=0) == ("d", [2, 5, 7])
    assert pick(routing, {8}, set(), set(), seed=0) == ("c", [7, 8, 9])
    with pytest.raises(RuntimeError, match="no unrequested train sample"):
        pick(routing, {8}, set(), {"c"}, seed=0)
