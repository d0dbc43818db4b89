"""Sphinx configuration of the django-events documentation site (MyST Markdown, Furo).

Build it with warnings as errors, as tox's ``docs`` env and CI do::

    sphinx-build -W --keep-going -n -b html docs /tmp/docs-html

autodoc imports ``django_events`` and its models, so Django is set up first, with the small
settings module next to this file (``docs_settings``: no database or broker service needed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import django
import sphinx.ext.napoleon
from sphinx.application import Sphinx

DOCS_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS_DIR.parent), str(DOCS_DIR)]  # the source tree first, then docs_settings
os.environ["DJANGO_SETTINGS_MODULE"] = "docs_settings"
django.setup()

import django_events  # noqa: E402  (needs Django set up)

project = "django-events"
author = "django-events developers"
copyright = "django-events developers"
release = version = django_events.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "docs_settings.py"]

# MyST: `#anchor` links to headings (up to ###), and ::: fences for admonitions.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist", "fieldlist"]

# autodoc: signatures with their type hints in the description, members in source order.
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Docstrings are Google style ("Args:", "Attributes:"), with reST inline markup.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

# Napoleon reads an attribute's ``#:`` comment as "type: description", and our comments are
# sentences ("The longest delay a run can ask for, in seconds: 366 days."): leave those alone.
_napoleon_process_docstring = sphinx.ext.napoleon._process_docstring


def _process_docstring(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    if what not in {"attribute", "data", "property"}:
        _napoleon_process_docstring(app, what, name, obj, options, lines)  # type: ignore[arg-type]


sphinx.ext.napoleon._process_docstring = _process_docstring  # napoleon's setup() connects this name

# No network at build time: intersphinx inventories are not fetched, so references to Python's
# and Django's objects are plain text (nitpick_ignore below) instead of links.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
nitpicky = True
nitpick_ignore_regex = [
    # Types of the standard library, Django and Dramatiq (no inventory offline).
    ("py:class", r"(datetime|dt|collections\.abc|typing|types|enum|json|logging|threading)\..*"),
    ("py:class", r"(django|dramatiq)\..*"),
    ("py:class", r"(Any|Callable|Iterable|Iterator|Mapping|Sequence|Literal|Self|TypeAlias|Enum)"),
    ("py:class", r"(Signal|Broker|Message|MessageProxy|QuerySet|Model|TextChoices|Event|Run|Attempt)"),
    ("py:class", r"(timedelta|datetime|NoneType|Logger|ImproperlyConfigured|ValueError|TypeError)"),
    ("py:class", r"(P|R|T|_T|F|_F|KeySpec|JSON|JSONValue)"),
    ("py:class", r"django_events\..*"),  # private or re-exported names autodoc spells by module
    ("py:class", r"CatchUp"),  # a Literal alias of the registry: "latest", "all" or "none"
    ("py:class", r".* .*"),  # napoleon reading the start of a sentence as a type ("The message as stored")
    ("py:obj", r".*"),
    ("py:exc", r"(ValueError|TypeError|ImproperlyConfigured)"),
    ("py:exc", r"(QueueNotFound|ConnectionClosed|QueueJoinTimeout|DecodeError)"),  # Dramatiq's errors
]

html_theme = "furo"
html_title = f"django-events {release}"
html_static_path: list[str] = []


# Links from a page to a file of the repository outside docs/ (``../../benchmarks/README.md``) work
# on GitHub; in the site they have no page to go to, so they become their text. A link to a file
# that does not exist still fails the build.
from docutils import nodes  # noqa: E402
from sphinx import addnodes  # noqa: E402
from sphinx.transforms.post_transforms import SphinxPostTransform  # noqa: E402

REPO_DIR = DOCS_DIR.parent


class RepositoryLinks(SphinxPostTransform):
    """Turn MyST links to Markdown files of the repository outside docs/ into their text."""

    default_priority = 8  # before MyST's resolver (9), which would call them unknown documents

    def run(self, **kwargs: object) -> None:
        for node in list(self.document.findall(addnodes.pending_xref)):
            if node.get("reftype") != "myst" or node.get("refdomain") != "doc":
                continue
            target = str(node["reftarget"])
            if target in self.env.all_docs:
                continue
            path = (DOCS_DIR / f"{target}.md").resolve()
            if path.is_file() and path.is_relative_to(REPO_DIR) and not path.is_relative_to(DOCS_DIR):
                text = node[0].deepcopy() if node.children else nodes.Text(target)
                node.replace_self(nodes.inline("", "", text, classes=["repository-file"]))


def setup(app: Sphinx) -> dict[str, bool]:
    app.add_post_transform(RepositoryLinks)
    return {"parallel_read_safe": True}
