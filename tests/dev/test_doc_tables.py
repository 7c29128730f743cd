"""Tables in the README and docs are rendered from result files (dev/doc_tables.py)."""
import importlib.util
import json
import os

import pytest
from conftest import REPO

_spec = importlib.util.spec_from_file_location("doc_tables",
                                               os.path.join(REPO, "dev", "doc_tables.py"))
doc_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_tables)

RESULTS = {"runs": [
    {"name": "student", "seed": 0, "results": {"bbox": {"AP": 33.114}}},
    {"name": "student", "seed": 1, "results": {"bbox": {"AP": 33.426}}},
    {"name": "distilled", "seed": 0, "results": {"bbox": {"AP": 36.891}}},
    {"name": "distilled", "seed": 1, "results": {"bbox": {"AP": 37.155}}},
], "summary": [{"name": "student", "bbox/AP": 33.27}]}


def render(template: str) -> str:
    return doc_tables.render(template, {"runs.json": RESULTS}.__getitem__)


def test_a_template_renders_means_spreads_and_differences_of_the_files_values():
    template = ("R = runs.json\n"
                "| arm | AP | seeds (spread) | gain |\n"
                "|---|---|---|---|\n"
                "| distilled | {{ mean(R.runs[name=distilled].results.bbox.AP) }} "
                "| {{ count(R.runs[name=distilled]) | d }} ({{spread(R.runs[name=distilled]"
                ".results.bbox.AP) | .3f}}) | {{ mean(R.runs[name=distilled].results.bbox.AP) - "
                "mean(R.runs[name=student].results.bbox.AP) | +.2f }} |\n"
                "| student | {{ R.summary[0].bbox/AP | .1f }} | {{R.runs[1].seed|d}} | `w=0.5` |")
    # by hand: means 37.023 and 33.270, spread 0.264, gain 3.753
    assert render(template) == ("| arm | AP | seeds (spread) | gain |\n"
                                "|---|---|---|---|\n"
                                "| distilled | 37.02 | 2 (0.264) | +3.75 |\n"
                                "| student | 33.3 | 1 | `w=0.5` |\n")


def test_an_aggregate_takes_the_values_of_several_references():
    files = {"a.json": {"AP": 40.0}, "b.json": {"runs": [{"AP": 43.0}, {"AP": 44.5}]}}
    template = "A = a.json\nB = b.json\n{{ mean(A.AP, B.runs.AP) }} {{ spread(B.runs.AP, A.AP) }}"
    assert doc_tables.render(template, files.__getitem__) == "42.50 4.50\n"


def test_a_text_value_renders_with_format_s_and_only_then():
    files = {"c.json": {"vs_control": {"verdict": "gain certified", "low": 0.21}}}
    template = "C = c.json\n| {{ C.vs_control.verdict | s }} | {{ C.vs_control.low }} |"
    assert doc_tables.render(template, files.__getitem__) == "| gain certified | 0.21 |\n"
    assert doc_tables.render("C = c.json\n{{ C.vs_control.verdict | .4s }}…",
                             files.__getitem__) == "gain…\n"
    with pytest.raises(doc_tables.TableError, match="is not text"):
        doc_tables.render("C = c.json\n{{ C.vs_control.low | s }}", files.__getitem__)
    with pytest.raises(doc_tables.TableError, match="is not one number"):
        doc_tables.render("C = c.json\n{{ C.vs_control.verdict }}", files.__getitem__)


def test_a_quoted_key_may_hold_spaces_and_signs():
    files = {"d.json": {"results": {"student + MGD from the teacher": {"AP": 37.25}}}}
    template = 'D = d.json\n{{ D.results["student + MGD from the teacher"].AP | .1f }}'
    assert doc_tables.render(template, files.__getitem__) == "37.2\n"


def test_a_difference_is_taken_before_rounding():
    # 37.0049 - 33.0051 = 3.9998 -> 4.00; the rounded values 37.00 - 33.01 would give 3.99
    files = {"a.json": {"x": 37.0049, "y": 33.0051}}
    assert doc_tables.render("A = a.json\n{{A.x - A.y}}", files.__getitem__) == "4.00\n"


@pytest.mark.parametrize("expression, message", [
    ("mean(R.runs[name=nobody].results.bbox.AP)", "no item has name = nobody"),
    ("R.runs[name=student].results.bbox.AP", "is not one number"),
    ("R.runs[0].results.bbox.AR", "no key 'AR'"),
    ("Q.runs[0].seed", "no file is named 'Q'"),
    ("R.runs[9].seed", "the list has 4 items"),
    ("median(R.runs[0].seed)", "not one of"),
    ("R.runs[0].seed R.runs[1].seed", "cannot read"),
])
def test_a_reference_that_names_nothing_is_an_error(expression, message):
    with pytest.raises(doc_tables.TableError, match=message.replace("(", r"\(")):
        render("R = runs.json\n| {{ " + expression + " }} |")


def test_a_csv_file_is_a_list_of_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_tables, "REPO", str(tmp_path))
    (tmp_path / "trials.csv").write_text("study,status,ap\nbaseline,ok,16.5\ns1,pruned,3\n"
                                         "s1,ok,18.25\ns1,pruned,2\n")
    rows = doc_tables.load_result("trials.csv")
    assert rows[0] == {"study": "baseline", "status": "ok", "ap": 16.5}
    template = ("T = trials.csv\n| {{ count(T[study=s1][status=pruned]) | d }} of "
                "{{ count(T[study=s1]) | d }} | {{ max(T[study=s1].ap) }} |")
    assert doc_tables.render(template, doc_tables.load_result) == "| 2 of 3 | 18.25 |\n"


def test_a_missing_result_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_tables, "REPO", str(tmp_path))
    text = "<!-- table\nR = gone.json\n| {{R.x}} |\n-->\n| 1.00 |\n<!-- /table -->\n"
    new, errors = doc_tables.rerender(text, "doc.md")
    assert new == text and errors == ["doc.md:1: gone.json: no such result file"]


def test_rerendering_replaces_only_the_rendering(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_tables, "REPO", str(tmp_path))
    (tmp_path / "r.json").write_text(json.dumps({"x": 1.5}))
    text = ("intro\n<!-- table\nR = r.json\n| a | {{R.x}} |\n-->\n| a | 9.99 |\n"
            "<!-- /table -->\nafter\n")
    new, errors = doc_tables.rerender(text, "doc.md")
    assert not errors
    assert new == text.replace("| a | 9.99 |", "| a | 1.50 |")


def test_a_number_typed_into_a_template_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_tables, "REPO", str(tmp_path))
    (tmp_path / "r.json").write_text(json.dumps({"x": 1.5}))
    text = ("<!-- table\nR = r.json\n| R-50/2, `rho=0.5` | {{R.x}} | 37.02 |\n-->\n"
            "| R-50/2, `rho=0.5` | 1.50 | 37.02 |\n<!-- /table -->\n")
    assert doc_tables.rerender(text, "doc.md")[1] == [
        "doc.md:1: numbers typed by hand (not from a file): 37.02"]


def test_an_ap_table_outside_a_template_is_found():
    text = ("Box AP on val:\n\n| model | score |\n|---|---|\n| a | 1 |\n\n"
            "Other things:\n\n| key | meaning |\n|---|---|\n| x | y |\n\n"
            "<!-- table\nR = r.json\n| model | AP |\n|---|---|\n-->\n| model | AP |\n|---|---|\n"
            "<!-- /table -->\n")
    assert doc_tables.unrendered_ap_tables("doc.md", text) == [
        "doc.md:3: an AP table that no template renders"]


def test_every_table_of_the_docs_is_what_its_result_files_render():
    assert doc_tables.main(["--check"]) == 0  # the differing tables are printed above


def test_every_ap_table_of_the_docs_is_rendered_from_result_files():
    found = []
    for document in doc_tables.documents():
        with open(os.path.join(REPO, document)) as f:
            found += doc_tables.unrendered_ap_tables(document, f.read())
    assert not found, "\n".join(found)
