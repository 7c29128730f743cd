"""The documentation site builds with warnings as errors (mkdocs.yml, ``make docs``), and its hook
(dev/mkdocs_hooks.py) checks the links that leave docs/: shown to fail on a missing file.

mkdocs comes with the ``docs`` extra, which ``make setup`` installs: a missing install fails
here (it does not skip), so that CI notices a missing install step.
"""
import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

HOOKS = os.path.join(REPO, "dev", "mkdocs_hooks.py")
FIX = ('run `make setup` (or `pip install -c requirements/constraints.txt -e ".[docs]"`): '
       "the docs extra of setup.py")


def require_mkdocs() -> None:
    missing = [name for name in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python",
                                 "material")
               if importlib.util.find_spec(name.split(".")[0]) is None
               or importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed in {sys.prefix}: {FIX}")


@pytest.fixture(scope="module")
def hooks():
    require_mkdocs()
    spec = importlib.util.spec_from_file_location("d2kd_mkdocs_hooks", HOOKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_link_leaving_docs_is_resolved_in_the_repository(hooks, tmp_path):
    docs = tmp_path / "docs"
    (docs / "methods").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "README.md").write_text("configs\n")
    (tmp_path / "README.md").write_text("readme\n")

    def target(href, page="methods/page.md"):
        return hooks.outside_target(href, page, str(docs), str(tmp_path))

    assert target("../../README.md") == "README.md"
    assert target("../README.md", page="index.md") == "README.md"
    assert target("../../configs/README.md#weights") == "configs/README.md"
    assert target("../../configs/") == "configs"
    # links MkDocs checks itself, or that are no files
    for href in ("../index.md", "page.md#a", "#a", "https://example.org/x.md", "/abs.md",
                 "mailto:a@b.org"):
        assert target(href) is None, href
    with pytest.raises(hooks.MissingTarget, match="configs/missing.md does not exist"):
        target("../../configs/missing.md")
    with pytest.raises(hooks.MissingTarget, match="leads out of the repository"):
        target("../../../elsewhere.md")


def test_a_link_is_rewritten_to_the_source_url_or_relative_to_the_built_page(hooks, tmp_path):
    site, repo = str(tmp_path / "site"), str(tmp_path)
    assert hooks.rewrite("../../configs/README.md#weights", "configs/README.md", "methods/dfd/",
                         "https://example.org/d2kd/blob/main/", site, repo) \
        == "https://example.org/d2kd/blob/main/configs/README.md#weights"
    assert hooks.rewrite("../README.md", "README.md", "", None, site, repo) == "../README.md"
    assert hooks.rewrite("x", "configs/README.md", "methods/dfd/", None, site, repo) \
        == "../../../configs/README.md"
    assert hooks.rewrite("x", "README.md", "methods/dfd.html", None, site, repo) \
        == "../../README.md"


def _mini_site(root: Path, links: str, source_url: str = "") -> Path:
    """A one-page MkDocs project with the hook, linking to ``links`` (markdown)."""
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "index.md").write_text(f"# Home\n\n{links}\n")
    (root / "present.txt").write_text("present\n")
    config = root / "mkdocs.yml"
    config.write_text(textwrap.dedent(f"""\
        site_name: mini
        docs_dir: docs
        site_dir: site
        hooks:
          - {HOOKS}
        extra:
          source_url: {source_url or "null"}
        """))
    return config


def _build(config: Path, strict: bool) -> None:
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    build(load_config(config_file=str(config), strict=strict))


def test_the_hook_fails_the_build_on_a_missing_file_naming_page_and_link(hooks, tmp_path,
                                                                         caplog):
    from mkdocs.exceptions import Abort

    config = _mini_site(tmp_path, "[present](../present.txt) and [gone](../gone.md#x)")
    caplog.set_level(logging.INFO, logger="mkdocs")
    with pytest.raises(Abort, match="BuildError"):
        _build(config, strict=False)  # an error even without --strict
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("'index.md' links to '../gone.md#x': gone.md does not exist" in message
               for message in errors), errors
    assert not any("present.txt" in message for message in errors), errors


def test_the_hook_rewrites_a_valid_link_and_the_strict_build_passes(hooks, tmp_path):
    config = _mini_site(tmp_path, "[present](../present.txt#L2) and [home](index.md)",
                        source_url="https://example.org/d2kd/blob/main/")
    _build(config, strict=True)
    html = (tmp_path / "site" / "index.html").read_text()
    assert 'href="https://example.org/d2kd/blob/main/present.txt#L2"' in html
    assert "data-d2kd" not in html


@pytest.mark.slow
def test_the_documentation_builds_with_warnings_as_errors(tmp_path):
    """``make docs``: every page, every link and anchor, the API reference from the docstrings."""
    require_mkdocs()
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    assert "WARNING" not in result.stderr, result.stderr[-6000:]
    # the API reference holds the public genome language, generated from the source
    search = (site / "api" / "search" / "index.html").read_text()
    for name in ("parse_genome", "format_genome", "dry_run"):
        assert f'id="d2kd.search.{name}"' in search, name
