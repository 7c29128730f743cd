"""Ranking comparison between two datasets: ranks, gains, Kendall tau, pair verdicts."""
import json
import os

import pytest
from conftest import tool_usage_error

from dev.benchmark.accuracy import summarize
from dev.benchmark.ranking import compare_rankings, ranking_figure, run_ranking_comparison

# seeds' box AP per row on two datasets, chosen so that every verdict occurs
EASY = {"student": [30.0, 31.0], "a": [35.0, 36.0], "b": [37.0, 38.0], "c": [40.0, 41.0]}
HARD = {"student": [20.0, 21.0], "a": [26.0, 27.0], "b": [25.0, 26.5], "c": [24.0, 24.5]}


def _result(aps):
    runs = [{"name": name, "config": f"{name}.yaml", "opts": [], "seed": seed,
             "wall_seconds": 1.0, "results": {"bbox": {m: ap for m in
                                                        ("AP", "AP50", "APs", "APm", "APl")}}}
            for name, seeds in aps.items() for seed, ap in enumerate(seeds)]
    return {"opts": [], "runs": runs, "summary": summarize(runs)}


def _write(tmp_path, name, aps):
    path = tmp_path / name
    path.write_text(json.dumps(_result(aps)))
    return str(path)


def test_ranks_gains_tau_and_pair_verdicts_by_hand():
    comparison = compare_rankings([("easy", _result(EASY)), ("hard", _result(HARD))], "student")
    rows = {r["name"]: r for r in comparison["rows"]}
    assert [rows[n]["easy"]["rank"] for n in ("c", "b", "a", "student")] == [1, 2, 3, 4]
    assert [rows[n]["hard"]["rank"] for n in ("a", "b", "c", "student")] == [1, 2, 3, 4]
    assert rows["a"]["easy"]["gain"] == 5.0 and rows["c"]["hard"]["gain"] == 3.75
    # 6 pairs of means: the 3 with the student concordant, a-b, a-c, b-c discordant
    assert comparison["kendall_tau"] == 0.0
    verdicts = {tuple(p["pair"]): p["verdict"] for p in comparison["pairs"]}
    assert verdicts == {("student", "a"): "holds", ("student", "b"): "holds",
                        ("student", "c"): "holds", ("a", "b"): "unresolved",  # 26.5 > 26
                        ("a", "c"): "flips", ("b", "c"): "flips"}
    assert comparison["pair_counts"] == {"holds": 3, "flips": 2, "unresolved": 1}


def test_tau_among_the_methods_leaves_out_the_rows_whose_place_is_never_in_question():
    comparison = compare_rankings([("easy", _result(EASY)), ("hard", _result(HARD))], "student",
                                  methods=["c", "a", "b"])
    # means a 35.5 / 26.5, b 37.5 / 25.75, c 40.5 / 24.25: all 3 pairs discordant
    assert comparison["methods"] == {"rows": ["a", "b", "c"], "kendall_tau": -1.0,
                                     "p_value": pytest.approx(0.3333, abs=1e-4)}
    assert comparison["kendall_tau"] == 0.0  # over all rows, unchanged
    assert "methods" not in compare_rankings(
        [("easy", _result(EASY)), ("hard", _result(HARD))], "student")


@pytest.mark.parametrize("methods", [["a", "b"], ["a", "b", "teacher"]])
def test_methods_must_be_three_rows(methods):
    with pytest.raises(ValueError, match="give at least 3 of the rows"):
        compare_rankings([("easy", _result(EASY)), ("hard", _result(HARD))], "student",
                         methods=methods)


def test_same_order_everywhere_is_tau_one():
    shifted = {name: [ap - 10.0 for ap in seeds] for name, seeds in EASY.items()}
    comparison = compare_rankings([("easy", _result(EASY)), ("hard", _result(shifted))],
                                  "student")
    assert comparison["kendall_tau"] == 1.0
    assert comparison["pair_counts"] == {"holds": 6, "flips": 0, "unresolved": 0}


def test_slope_chart_draws_each_rows_mean_gain_on_both_datasets():
    comparison = compare_rankings([("easy", _result(EASY)), ("hard", _result(HARD))], "student")
    lines = {line.get_label(): list(line.get_ydata())
             for line in ranking_figure(comparison).axes[0].get_lines()
             if not line.get_label().startswith("_")}
    assert lines == {"student": [0.0, 0.0], "a": [5.0, 6.0], "b": [7.0, 5.25],
                     "c": [10.0, 3.75]}


def test_writes_json_markdown_and_png(tmp_path):
    easy, hard = _write(tmp_path, "e.json", EASY), _write(tmp_path, "h.json", HARD)
    run_ranking_comparison([("easy", easy), ("hard", hard)], "student", str(tmp_path / "r.json"),
                           str(tmp_path / "r.md"), str(tmp_path / "r.png"), ["a", "b", "c"])
    assert json.loads((tmp_path / "r.json").read_text())["pair_counts"]["flips"] == 2
    text = (tmp_path / "r.md").read_text()
    assert "| c       | 40.50 (1)        | +10.00      |" in text
    assert "- flips: a is below c on easy, above on hard" in text
    assert "- unresolved: a is below b on easy, level with it on hard" in text
    assert "Among a, b, c: Kendall tau -1.0 (p = 0.3333, 3 rows)." in text
    assert (tmp_path / "r.png").stat().st_size > 0


@pytest.mark.parametrize("case, message", [
    ("missing", "No such file"),
    ("rows", "The results have different rows: only in easy: ['c'], only in hard: []"),
    ("baseline", "--baseline 'teacher' is not a row"),
    ("label", "is not LABEL=JSON")])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, message, capsys):
    easy = _write(tmp_path, "e.json", EASY)
    hard = _write(tmp_path, "h.json", {n: s for n, s in HARD.items() if n != "c"}
                  if case == "rows" else HARD)
    inputs = {"missing": [f"easy={easy}", f"hard={tmp_path / 'nope.json'}"],
              "label": [easy, f"hard={hard}"]}.get(case, [f"easy={easy}", f"hard={hard}"])
    error = tool_usage_error("benchmark", [
        "ranking", "--inputs", *inputs,
        "--baseline", "teacher" if case == "baseline" else "student",
        "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")], capsys)
    assert message in error
    assert sorted(os.listdir(tmp_path)) == ["e.json", "h.json"]
