"""tools/benchmark.py scaling-training / scaling-search: the speed-up and efficiency
arithmetic against hand-computed values, and the result files it writes."""
import json
import os
import sys

import pytest

from dev.benchmark.scaling import _efficiency, _run_together, _write_search, training_arms


def test_training_arms_use_every_core_each_way():
    assert training_arms(2) == [dict(processes=1, machines=1, threads=1),
                                dict(processes=1, machines=1, threads=2),
                                dict(processes=2, machines=1, threads=1),
                                dict(processes=1, machines=2, threads=1)]


def test_efficiency_is_the_rate_per_core_relative_to_the_first_arm():
    arms = [{"rate": 10.0, "n": 1}, {"rate": 15.0, "n": 2}, {"rate": 30.0, "n": 3}]
    _efficiency(arms, "rate", lambda arm: arm["n"])
    # hand-computed: speed-up 15/10, 30/10; per core (15/2)/(10/1), (30/3)/(10/1)
    assert [a["cores"] for a in arms] == [1, 2, 3]
    assert [a["speedup"] for a in arms] == pytest.approx([1.0, 1.5, 3.0])
    assert [a["efficiency"] for a in arms] == pytest.approx([1.0, 0.75, 1.0])


def test_the_search_result_is_written_as_json_table_and_plot(tmp_path):
    result = {"config": "configs/x_search.yaml", "trials": 6, "cores": 2, "proxy_iters": 100,
              "arms": [{"workers": 1, "threads": 2, "trials": 7, "wall_seconds": 360.0,
                        "trials_per_hour": 70.0},
                       {"workers": 2, "threads": 1, "trials": 7, "wall_seconds": 252.0,
                        "trials_per_hour": 100.0}]}
    paths = [str(tmp_path / name) for name in ("s.json", "s.md", "s.png")]
    _write_search(result, *paths)
    written = json.loads((tmp_path / "s.json").read_text())
    # both arms use the 2 cores: efficiency = speed-up = 100 / 70
    assert written["arms"][1]["efficiency"] == pytest.approx(100 / 70)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in (tmp_path / "s.md").read_text().splitlines() if line.startswith("|")]
    assert rows[0][4:] == ["wall s", "trials / hour", "speed-up", "efficiency"]
    assert rows[2:] == [["1", "2", "2", "7", "360", "70", "1", "1"],
                        ["2", "1", "2", "7", "252", "100", "1.43", "1.43"]]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_processes_run_together_each_into_its_log_and_a_failure_is_named(tmp_path):
    say = [sys.executable, "-c", "import os; print(os.environ['WHO'])"]
    logs = [str(tmp_path / f"{who}.txt") for who in ("a", "b")]
    _run_together([(say, dict(os.environ, WHO=who), log) for who, log in zip("ab", logs)],
                  "two")
    assert [open(log).read() for log in logs] == ["a\n", "b\n"]
    with pytest.raises(RuntimeError, match=r"^broken: exit codes \[0, 3\]"):
        _run_together([(say, dict(os.environ, WHO="a"), logs[0]),
                       ([sys.executable, "-c", "exit(3)"], dict(os.environ), logs[1])],
                      "broken")
