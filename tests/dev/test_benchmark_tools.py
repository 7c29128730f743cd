"""Benchmark bookkeeping: per-variant summaries of accuracy runs, run-time log parsing."""
import os

import pytest
from conftest import CONFIGS, tool_usage_error

from dev.benchmark.accuracy import markdown_table, summarize


def _run(name, seed, ap):
    metrics = {m: ap for m in ("AP", "AP50", "APs", "APm", "APl")}
    return {"name": name, "config": "c.yaml", "opts": [], "seed": seed, "wall_seconds": 10.0 * seed,
            "results": {"bbox": metrics}}


def test_summary_groups_runs_by_variant_with_mean_and_spread():
    runs = [_run("c", 0, 30.0), _run("c", 1, 31.0), _run("c@rho0.1", 0, 28.0)]
    rows = {row["name"]: row for row in summarize(runs)}
    assert rows["c"]["bbox/AP"] == 30.5 and rows["c"]["bbox/AP_spread"] == 1.0
    assert rows["c"]["seeds"] == [0, 1] and rows["c"]["wall_seconds_mean"] == 5.0
    assert rows["c@rho0.1"]["bbox/AP"] == 28.0 and rows["c@rho0.1"]["bbox/AP_spread"] == 0.0
    table = markdown_table(summarize(runs))
    assert "| c@rho0.1 " in table and "30.5" in table


def test_finished_only_tabulates_recorded_runs_and_trains_nothing(tmp_path):
    import json

    from dev.benchmark.accuracy import run_accuracy_benchmark

    done = tmp_path / "runs" / "c" / "seed0"
    done.mkdir(parents=True)
    (done / "benchmark_run.json").write_text(json.dumps(dict(_run("c", 0, 30.0), config="c.yaml")))
    summary = run_accuracy_benchmark(["c.yaml"], [0, 1], str(tmp_path / "runs"),
                                     str(tmp_path / "t.json"), str(tmp_path / "t.md"),
                                     finished_only=True, plot_path=str(tmp_path / "t.png"))
    assert [(row["name"], row["seeds"]) for row in summary] == [("c", [0])]
    assert not (tmp_path / "runs" / "c" / "seed1").exists()
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_chart_draws_each_reference_ap_as_a_labelled_line():
    from dev.benchmark.accuracy_plot import accuracy_figure

    runs = [_run("student", 0, 30.0), _run("student", 1, 31.0), _run("recipe", 0, 45.0)]
    seed_aps = {"student": [30.0, 31.0], "recipe": [45.0]}
    fig = accuracy_figure(summarize(runs), seed_aps, [("R-50/2 teacher", 42.92), ("R-34/2", 43.79)])
    ax = fig.axes[0]
    lines = {line.get_label(): line.get_xdata() for line in ax.get_lines()
             if line.get_linestyle() == "--"}
    assert {label: list(x) for label, x in lines.items()} == {
        "R-50/2 teacher (42.92)": [42.92, 42.92], "R-34/2 (43.79)": [43.79, 43.79]}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
    assert ax.get_xlim() == (25.0, 48.0)  # 5 below the lowest seed, 3 above the highest mean
    assert accuracy_figure(summarize(runs), seed_aps).axes[0].get_legend() is None


def test_accuracy_chart_of_runs_that_detected_nothing_spans_the_finite_aps():
    """COCOeval gives AP NaN to a model without detections (a few iterations' training)."""
    from dev.benchmark.accuracy_plot import accuracy_figure

    nan = float("nan")
    runs = [_run("untrained", 0, nan), _run("untrained", 1, nan), _run("recipe", 0, 45.0)]
    seed_aps = {"untrained": [nan, nan], "recipe": [45.0]}
    assert accuracy_figure(summarize(runs), seed_aps).axes[0].get_xlim() == (40.0, 48.0)
    nothing = accuracy_figure(summarize(runs[:2]), {"untrained": [nan, nan]})
    assert nothing.axes[0].get_xlim() == (0.0, 100.0)


@pytest.mark.parametrize("reference", ["42.92", "teacher=high", "teacher"])
def test_a_reference_that_is_not_label_equals_ap_is_one_line_before_anything_runs(
        tmp_path, reference, capsys):
    error = tool_usage_error("benchmark", [
        "accuracy", "--configs", "c.yaml", "--output", str(tmp_path), "--json",
        str(tmp_path / "t.json"), "--markdown", str(tmp_path / "t.md"), "--reference", reference],
        capsys)
    assert f"{reference!r} is not LABEL=AP" in error
    assert os.listdir(tmp_path) == []


def test_prototype_refresh_share_comes_from_the_runs_metrics(tmp_path):
    import json

    from dev.benchmark.accuracy import prototype_refresh_seconds

    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in [
        {"iteration": 0, "prototypes/total_seconds": 50.0},
        {"iteration": 19, "total_loss": 3.0},
        {"iteration": 125, "prototypes/total_seconds": 66.0}]))
    assert prototype_refresh_seconds(str(tmp_path)) == 66.0
    assert prototype_refresh_seconds(str(tmp_path / "absent")) is None
    runs = [dict(_run("gk", 1, 30.0), prototype_refresh_seconds=66.0),  # wall 10 s
            dict(_run("gk", 2, 31.0), prototype_refresh_seconds=2.0),   # wall 20 s
            _run("mgd", 1, 29.0)]
    rows = {row["name"]: row for row in summarize(runs)}
    assert rows["gk"]["prototype_refresh_fraction"] == pytest.approx((6.6 + 0.1) / 2)
    assert "prototype_refresh_fraction" not in rows["mgd"]
    assert "prototype refresh % of wall" in markdown_table(summarize(runs))


def test_steady_step_time_is_the_last_windowed_time_in_metrics_json():
    from dev.benchmark.run_time import steady_step_seconds

    lines = ['{"iteration": 19, "time": 1.24, "total_loss": 3.1}',
             '{"iteration": 39, "time": 0.78, "total_loss": 2.0}',
             '{"bbox/AP": 12.5, "iteration": 39}']
    assert steady_step_seconds(lines) == 0.78
    with pytest.raises(ValueError, match="logging period"):
        steady_step_seconds(['{"bbox/AP": 12.5, "iteration": 9}'])


def test_benchmark_processes_get_the_same_training_batches(tiny_digitsdet, tmp_path):
    """The sampler's shuffle seed and the resize augmentation draw from NumPy: a benchmark
    process whose NumPy state differs (another process) must still see the same batches."""
    import numpy as np
    from conftest import tiny_training_cfg

    from dev.benchmark.batches import seeded_training_batches

    cfg = tiny_training_cfg("DigitsDet/retinanet_R18_student.yaml", str(tmp_path))

    def signature(batches):
        return [[(x["file_name"], tuple(x["image"].shape)) for x in batch] for batch in batches]

    np.random.seed(1)
    first = signature(seeded_training_batches(cfg, 4))
    np.random.seed(2)
    second = signature(seeded_training_batches(cfg, 4))
    assert first == second
    assert len({name for batch in first for name, _ in batch}) > 2  # not one repeated image


def _finished_run(run_dir, config_file, saved_overrides):
    """A finished benchmark run whose saved config.yaml is ``config_file`` + overrides."""
    import json

    from d2kd.config import load_config

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(load_config(config_file, saved_overrides).dump())
    (run_dir / "benchmark_run.json").write_text(
        json.dumps(dict(_run("gk", 0, 38.0), config=config_file)))


def test_finished_run_of_an_edited_config_is_an_error_before_anything_trains(tmp_path):
    from d2kd.config import ConfigError
    from dev.benchmark.accuracy import run_accuracy_benchmark

    base = os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_from_R50_gk.yaml")
    config = tmp_path / "my_gk.yaml"

    def write_config(feature_weight):
        config.write_text(f"_BASE_: {base}\nDISTILL:\n  GLOBAL_KNOWLEDGE:\n"
                          f"    FEATURE_WEIGHT: {feature_weight}\n")

    write_config(0.5)
    _finished_run(tmp_path / "runs" / "my_gk" / "seed0", str(config), ["SEED", "0"])
    write_config(0.25)  # the config file is edited after the run
    with pytest.raises(ConfigError,
                       match=r"DISTILL\.GLOBAL_KNOWLEDGE\.FEATURE_WEIGHT: 0\.5 -> 0\.25"):
        run_accuracy_benchmark([str(config)], [0, 1], str(tmp_path / "runs"),
                               str(tmp_path / "t.json"), str(tmp_path / "t.md"))
    assert not (tmp_path / "runs" / "my_gk" / "seed1").exists()
    # the same run is the result of the variant that sets the old value
    summary = run_accuracy_benchmark([str(config)], [0], str(tmp_path / "runs"),
                                     str(tmp_path / "t.json"), str(tmp_path / "t.md"),
                                     ["DISTILL.GLOBAL_KNOWLEDGE.FEATURE_WEIGHT", "0.5"],
                                     finished_only=True)
    assert [row["bbox/AP"] for row in summary] == [38.0]


def test_a_run_made_in_another_checkout_matches_its_config(tmp_path):
    from d2kd.config.saved import config_mismatches

    mgd = os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_from_R50_mgd.yaml")
    run = tmp_path / "seed1"
    _finished_run(run, mgd, ["SEED", "1"])
    other_checkout = (run / "config.yaml").read_text().replace(
        CONFIGS, "/elsewhere/d2kd/configs")
    assert "/elsewhere/d2kd/configs/DigitsDet/retinanet_R50_teacher.yaml" in other_checkout
    (run / "config.yaml").write_text(other_checkout)
    assert config_mismatches(str(run), mgd, ["SEED", "1"]) == []
    assert config_mismatches(str(run), mgd, ["SEED", "2"]) == ["SEED: 1 -> 2"]


def test_proxy_fidelity_is_kendalls_tau_of_the_finished_trials(tmp_path):
    import math

    from dev.benchmark.proxy_fidelity import fidelity, plot_fidelity

    rows = [{"proxy_ap": p, "full_ap": f, "full_aps": [f - 0.1, f + 0.1]}
            for p, f in [(1.0, 10.0), (2.0, 30.0), (3.0, 20.0), (4.0, 40.0)]]
    # by hand: pairs (1,2) (1,3) (1,4) (2,4) (3,4) concordant, (2,3) discordant: (5 - 1) / 6
    assert fidelity(rows)["kendall_tau"] == pytest.approx(4 / 6, abs=1e-4)
    assert fidelity(rows)["genomes"] == 4
    # upper half: proxy >= median 2.5, i.e. (3, 20) and (4, 40): one concordant pair
    assert fidelity(rows)["upper_half_kendall_tau"] == pytest.approx(1.0)
    assert fidelity(rows)["upper_half_genomes"] == 2
    rejected = rows + [{"proxy_ap": -math.inf, "full_ap": 0.0, "full_aps": [0.0]}]
    assert fidelity(rejected) == fidelity(rows)  # a rejected candidate has no rank
    assert fidelity(rows[:1])["kendall_tau"] is None
    assert fidelity(rows[:1])["upper_half_kendall_tau"] is None
    plot_fidelity(rejected, fidelity(rows), str(tmp_path / "fidelity.png"))
    assert (tmp_path / "fidelity.png").stat().st_size > 0


def test_proxy_fidelity_names_runs_by_genome_not_position():
    from dev.benchmark.proxy_fidelity import genome_tag

    assert genome_tag("global:natt|local_s2|softmax_HW|cos|w=1") == \
        "global-natt-local_s2-softmax_HW-cos-w1"
    assert genome_tag("global:natt|local_s2|softmax_HW|cos|w=0.5") == \
        "global-natt-local_s2-softmax_HW-cos-w0.5"
    assert genome_tag("global:no|scale_r4|l1|w=1;fgbg:mask|no|norm_C|l2|w=2") == \
        "global-no-scale_r4-l1-w1-fgbg-mask-no-norm_C-l2-w2"


def test_a_proxy_variant_needs_a_name_before_anything_runs(tmp_path, capsys):
    search = os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_from_R50_detkds_search.yaml")
    error = tool_usage_error("benchmark", [
        "proxy-fidelity", "--search-config", search, "--config-file", search, "--genomes",
        "global:no|no|no|l1|w=1", "--output", str(tmp_path), "--json", str(tmp_path / "f.json"),
        "--markdown", str(tmp_path / "f.md"), "DISTILL.DETKDS.SEARCH.VAL_IMAGES", "300"], capsys)
    assert "name it (--proxy-variant NAME)" in error
    assert os.listdir(tmp_path) == []


def test_proxy_fidelity_reuses_earlier_full_schedule_aps_and_trains_nothing(tmp_path):
    import json

    from dev.benchmark.proxy_fidelity import genome_tag, run_proxy_fidelity_benchmark

    genomes = ["global:no|scale_r1|cos|w=1", "global:natt|no|l1|w=2", "global:mask|no|l2|w=5"]
    proxy_aps, full = [3.0, 1.0, 2.0], {0: [30.0, 10.0, 25.0], 1: [32.0, 12.0, 15.0]}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"rows": [
        {"genome": g, "full_aps": [full[0][i], full[1][i]], "seeds": [0, 1]}
        for i, g in enumerate(genomes)]}))
    for genome, ap in zip(genomes, proxy_aps):  # finished proxy trials (reused, not run)
        trial = tmp_path / "out" / "proxy@v" / genome_tag(genome)
        trial.mkdir(parents=True)
        (trial / "outcome.json").write_text(json.dumps({"ap": ap}))
    result = run_proxy_fidelity_benchmark(
        "no-such-search.yaml", "no-such-config.yaml", genomes, [1, 0], str(tmp_path / "out"),
        str(tmp_path / "f.json"), str(tmp_path / "f.md"), proxy_opts=["K", "V"],
        proxy_variant="v", full_schedule_from=[str(earlier)])
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [r["full_aps"] for r in rows] == [[32.0, 30.0], [12.0, 10.0], [15.0, 25.0]]  # seeds 1, 0
    assert [r["full_ap"] for r in rows] == [31.0, 11.0, 20.0]
    assert all(r["full_aps_reused"] for r in rows)
    # ranks by hand: proxy 3 > 2 > 1, full 31 > 20 > 11: every pair concordant
    assert result["kendall_tau"] == pytest.approx(1.0)
    assert (tmp_path / "f.md").read_text().count("Kendall tau-b: 1.0 (p = ") == 1
    assert not (tmp_path / "out" / "full").exists()  # nothing trained
    # one genome (a search's winner): the markdown says why there is no rank correlation
    run_proxy_fidelity_benchmark(
        "no-such-search.yaml", "no-such-config.yaml", genomes[:1], [0, 1], str(tmp_path / "out"),
        str(tmp_path / "w.json"), str(tmp_path / "w.md"), proxy_opts=["K", "V"],
        proxy_variant="v", full_schedule_from=[str(earlier)])
    assert "Kendall tau-b: none (1 genome(s); a rank correlation needs 2 or more)" in (
        tmp_path / "w.md").read_text()
    # a seed the earlier result lacks would be trained: the missing config file says so
    with pytest.raises(Exception, match="no-such-config"):
        run_proxy_fidelity_benchmark(
            "no-such-search.yaml", "no-such-config.yaml", genomes[:1], [0, 2],
            str(tmp_path / "out"), str(tmp_path / "g.json"), str(tmp_path / "g.md"),
            proxy_opts=["K", "V"], proxy_variant="v", full_schedule_from=[str(earlier)])
