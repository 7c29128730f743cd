"""MkDocs hook (``hooks:`` in mkdocs.yml): links from the docs to repository files outside docs/.

MkDocs validates the links between the pages of docs/ (``validation:`` in mkdocs.yml), but a
relative link that leaves docs/ (``../README.md``, ``../configs/COCO/README.md``,
``../benchmarks/digitsdet/``) names no page it knows: it would only warn. This hook takes such
links over, before MkDocs sees them:

- the target must exist in the repository (file or folder): a missing one is logged with the
  page and the link, and fails the build (with or without ``--strict``);
- the link is rewritten to the file in the repository: ``<extra.source_url><path>`` when
  mkdocs.yml sets ``extra: {source_url: https://.../blob/<branch>/}``, otherwise a path relative
  to the built page (valid in the checkout the site was built in: ``make docs`` builds
  ``site/`` at the repository root).

Links inside docs/, absolute paths and URLs are left to MkDocs. tests/dev/test_docs_build.py checks
the hook on a planted missing file and a planted valid one.
"""
from __future__ import annotations

import os
import posixpath
from typing import Iterator, List, Optional, Tuple
from urllib.parse import unquote, urlsplit
from xml.etree import ElementTree

from markdown import Extension, Markdown
from markdown.treeprocessors import Treeprocessor
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

log = get_plugin_logger("d2kd-links")

#: the attribute that carries a rewritten link past MkDocs' own link check (see _Rewrite)
_HELD = "data-d2kd-outside-link"
#: the link attribute of each element MkDocs checks
_LINK_ATTRIBUTES = {"a": "href", "img": "src"}


class MissingTarget(ValueError):
    """A relative link leaves docs/ for a path that is not in the repository."""


def outside_target(href: str, page_src: str, docs_dir: str, repo_root: str) -> Optional[str]:
    """The repository path (POSIX, relative to ``repo_root``) that a relative link from the page
    ``page_src`` (relative to ``docs_dir``) leads to, when it leads out of ``docs_dir``; ``None``
    for any other link (URLs, absolute paths, anchors, links inside docs/).

    Raises:
        MissingTarget: the target is outside the repository or does not exist.
    """
    scheme, netloc, path, _, _ = urlsplit(href)
    if scheme or netloc or not path or path.startswith(("/", "\\")):
        return None
    docs_dir = os.path.abspath(docs_dir)
    target = os.path.normpath(os.path.join(docs_dir, os.path.dirname(page_src), unquote(path)))
    if target == docs_dir or target.startswith(docs_dir + os.sep):
        return None
    repo_path = os.path.relpath(target, os.path.abspath(repo_root))
    if repo_path == os.pardir or repo_path.startswith(os.pardir + os.sep):
        raise MissingTarget(f"'{href}' leads out of the repository")
    if not os.path.exists(target):
        raise MissingTarget(f"'{href}': {repo_path} does not exist in the repository")
    return repo_path.replace(os.sep, "/")


def rewrite(href: str, repo_path: str, page_url: str, source_url: Optional[str],
            site_dir: str, repo_root: str) -> str:
    """The link to ``repo_path`` from the built page at ``page_url`` (its URL in the site:
    ``methods/dfd/``, ``index.html``, ``""``), keeping the query and anchor of ``href``."""
    parts = urlsplit(href)
    suffix = (f"?{parts.query}" if parts.query else "") + (
        f"#{parts.fragment}" if parts.fragment else "")
    if source_url:
        return f"{source_url.rstrip('/')}/{repo_path}{suffix}"
    page_folder = os.path.join(os.path.abspath(site_dir), *posixpath.dirname(page_url).split("/"))
    target = os.path.join(os.path.abspath(repo_root), *repo_path.split("/"))
    return os.path.relpath(target, page_folder).replace(os.sep, "/") + suffix


def _links(root: ElementTree.Element) -> Iterator[Tuple[ElementTree.Element, str]]:
    for element in root.iter():
        attribute = _LINK_ATTRIBUTES.get(element.tag)
        if attribute is not None and element.get(attribute) is not None:
            yield element, attribute


class _Rewrite(Treeprocessor):
    """Before MkDocs' link check (``relpath``, priority 0): checks each link that leaves docs/ and
    holds its rewritten target in ``_HELD``, leaving ``#`` (which MkDocs does not check)."""

    def __init__(self, md: Markdown, links: OutsideLinks) -> None:
        super().__init__(md)
        self.links = links

    def run(self, root: ElementTree.Element) -> None:
        for element, attribute in _links(root):
            rewritten = self.links.rewrite_link(element.get(attribute))
            if rewritten is not None:
                element.set(attribute, "#")
                element.set(_HELD, rewritten)


class _Restore(Treeprocessor):
    """After MkDocs' link check: puts the held targets back."""

    def run(self, root: ElementTree.Element) -> None:
        for element, attribute in _links(root):
            held = element.attrib.pop(_HELD, None)
            if held is not None:
                element.set(attribute, held)


class OutsideLinks(Extension):
    """The Markdown extension that checks and rewrites the links leaving docs/ of the page being
    rendered (``page``, set by :func:`on_page_markdown`)."""

    def __init__(self, config: MkDocsConfig) -> None:
        super().__init__()
        self.docs_dir = config.docs_dir
        self.site_dir = config.site_dir
        self.repo_root = os.path.dirname(os.path.abspath(config.config_file_path))
        self.source_url: Optional[str] = config.extra.get("source_url")
        self.page: Optional[Page] = None
        self.missing: List[str] = []

    def extendMarkdown(self, md: Markdown) -> None:  # Markdown's name for the hook
        md.treeprocessors.register(_Rewrite(md, self), "d2kd_outside_links", 1)
        md.treeprocessors.register(_Restore(md), "d2kd_outside_links_restore", -1)

    def rewrite_link(self, href: str) -> Optional[str]:
        """The rewritten ``href`` of a link leaving docs/ from the current page, ``None`` for
        other links; a missing target is logged and recorded (the build fails at its end)."""
        if self.page is None:
            return None
        page = self.page.file
        try:
            repo_path = outside_target(href, page.src_uri, self.docs_dir, self.repo_root)
        except MissingTarget as error:
            message = f"Doc file '{page.src_uri}' links to {error}"
            log.error(message)
            self.missing.append(message)
            return None
        if repo_path is None:
            return None
        return rewrite(href, repo_path, page.url, self.source_url, self.site_dir,
                       self.repo_root)


_extension: Optional[OutsideLinks] = None


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Adds the extension (on every build: ``mkdocs serve`` reloads the config)."""
    global _extension
    _extension = OutsideLinks(config)
    config.markdown_extensions.append(_extension)  # type: ignore[arg-type]
    return config


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Tells the extension which page is rendered next."""
    if _extension is not None:
        _extension.page = page
    return markdown


def on_post_build(config: MkDocsConfig) -> None:
    """Fails the build if a link led to a missing file (each was logged with its page)."""
    if _extension is not None and _extension.missing:
        raise PluginError(f"{len(_extension.missing)} link(s) from docs/ to a file outside docs/ "
                          "lead to no file of the repository (listed above)")
