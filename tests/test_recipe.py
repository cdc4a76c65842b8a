"""`side_by_side`: the demo's and `bench attack`'s runs in processes that share the CPU cores."""

from __future__ import annotations

import os

from fimmia_hf.recipe import side_by_side


def _who_runs(value: int) -> tuple[int, int, int]:
    import torch

    return value, os.getpid(), torch.get_num_threads()


def test_side_by_side_runs_the_calls_in_other_processes_and_keeps_their_order() -> None:
    got = side_by_side(_who_runs, [{"value": v} for v in range(3)], jobs=2)
    assert [value for value, _, _ in got] == [0, 1, 2]
    assert os.getpid() not in {pid for _, pid, _ in got}
    assert {threads for _, _, threads in got} == {max(1, (os.cpu_count() or 1) // 2)}  # the cores are shared


def test_side_by_side_with_one_job_runs_here_one_call_after_the_other() -> None:
    assert [pid for _, pid, _ in side_by_side(_who_runs, [{"value": 0}, {"value": 1}], jobs=1)] == [os.getpid()] * 2
