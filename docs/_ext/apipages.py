"""API reference pages, generated at build time from the packages' ``__all__``.

Every public name gets a page of its own, ``api/<module>.<name>``: the names of
``curvlinops.__all__`` (a module listed there, such as ``curvlinops.losses``, gets
a section with a page per name of its own ``__all__``), the backends interface
(``curvlinops.backends.__all__``) and the command-line jobs (``curvlinops.__main__``
and every ``run_*`` entry point its job modules export). Nothing is listed by
hand: a name added to an ``__all__`` gets a page at the next build.

``curvlinops`` is imported here, never a framework: autodoc reads the objects.
A cross-reference to a name that the docstrings spell by its defining module
(``curvlinops.eigen.eigsh``) is pointed at the public page; one to a
``curvlinops`` name that has no page is reported as a warning (an error with -W).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import pkgutil
import re
import shutil
import types
from dataclasses import dataclass, field
from pathlib import Path

API_DIR = "api"  # under the source folder; generated, not committed


@dataclass
class Section:
    """One part of the reference: a module's public names, grouped by kind."""

    title: str
    module: str
    intro: str
    names: list[str] = field(default_factory=list)
    label: str = ""

    def __post_init__(self):
        self.label = self.label or "api-" + self.module.rsplit(".", 1)[-1]


def public_sections() -> list[Section]:
    """The reference's sections, read from the packages' ``__all__`` lists."""
    import curvlinops

    top = Section("curvlinops", "curvlinops", "Operators, algorithms and their results.")
    sections = [top]
    for name in curvlinops.__all__:
        obj = getattr(curvlinops, name)
        if isinstance(obj, types.ModuleType):
            doc = _first_line(obj)
            sections.append(Section(obj.__name__, obj.__name__, doc, list(obj.__all__)))
        else:
            top.names.append(name)
    backends = importlib.import_module("curvlinops.backends")
    sections.append(
        Section(
            "curvlinops.backends",
            "curvlinops.backends",
            "The interface a framework backend implements, and how one is chosen.",
            list(backends.__all__),
        )
    )
    sections.append(job_section())
    add_result_types(sections)
    return sections


def add_result_types(sections: list[Section]) -> None:
    """Add the library's classes that public functions take or return but do not export.

    ``spectral_density`` returns a ``SpectralDensity``, ``run_demo`` takes a
    ``Problem``: the reader needs their pages too, under the defining module's name.
    """
    listed = {resolve(s, n)[0] for s in sections for n in s.names}
    listed_objects = {id(resolve(s, n)[1]) for s in sections for n in s.names}
    for section in sections:
        for name in list(section.names):
            _, obj = resolve(section, name)
            for cls in _annotated_classes(obj):
                full = f"{cls.__module__}.{cls.__qualname__}"
                if full not in listed and id(cls) not in listed_objects:
                    listed.add(full)
                    section.names.append(full)


def _annotated_classes(obj: object) -> list[type]:
    """Classes of ``curvlinops`` named in the annotations of a function's signature."""
    if not inspect.isfunction(obj):
        return []
    module = importlib.import_module(obj.__module__)
    annotations = " ".join(str(a) for a in obj.__annotations__.values())
    found = []
    for word in dict.fromkeys(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", annotations)):
        candidate = getattr(module, word, None)
        if (
            inspect.isclass(candidate)
            and candidate.__module__.startswith("curvlinops")
            and not word.startswith("_")
        ):
            found.append(candidate)
    return found


def job_section() -> Section:
    """``curvlinops.__main__.main`` and the ``run_*`` entry point of every job module."""
    main = importlib.import_module("curvlinops.__main__")
    section = Section(
        "Jobs (command line)",
        "curvlinops.__main__",
        "``python -m curvlinops <job>`` and the functions the jobs run.",
        [f"curvlinops.__main__.{n}" for n in main.__all__],
        label="api-jobs",
    )
    for module_name in _job_modules():
        module = importlib.import_module(module_name)
        runs = [n for n in getattr(module, "__all__", ()) if n.startswith("run_")]
        section.names += [f"{module_name}.{n}" for n in runs]
    return section


def _job_modules() -> list[str]:
    """Modules of ``curvlinops`` (outside backends) that export a ``run_*`` function.

    Found from the source text, so that nothing is imported that is not a job.
    """
    import curvlinops

    found = []
    for info in pkgutil.walk_packages(curvlinops.__path__, "curvlinops."):
        if info.name.startswith(("curvlinops.backends", "curvlinops.__main__")):
            continue
        spec = importlib.util.find_spec(info.name)
        origin = Path(spec.origin) if spec and spec.origin else None
        if origin and origin.suffix == ".py" and '"run_' in origin.read_text(encoding="utf-8"):
            found.append(info.name)
    return sorted(found)


def _first_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def resolve(section: Section, name: str) -> tuple[str, object]:
    """The full dotted name of a section's entry and the object it names."""
    full = name if "." in name else f"{section.module}.{name}"
    module_name, _, attribute = full.rpartition(".")
    return full, getattr(importlib.import_module(module_name), attribute)


def kind_of(obj: object) -> str:
    """The group a public object is listed under."""
    from curvlinops import LinearOperator

    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return "Errors and warnings"
        if issubclass(obj, LinearOperator) or obj.__name__.endswith("LinearOperator"):
            return "Operators"
        return "Classes and types"
    if callable(obj):
        return "Functions"
    return "Constants"


DIRECTIVES = {"Functions": "autofunction", "Constants": "autodata"}
GROUP_ORDER = ["Operators", "Functions", "Classes and types", "Errors and warnings", "Constants"]


def page_text(full: str, obj: object) -> str:
    """The reST source of one name's page."""
    kind = kind_of(obj)
    directive = DIRECTIVES.get(kind, "autoclass")
    title = full.rsplit(".", 1)[1]
    lines = [title, "=" * len(title), ""]
    if kind == "Constants" and not _has_doc_comment(full):
        # autodata would show the docstring of the value's type (dict, tuple, ...)
        value = " ".join(repr(obj).split())
        lines += [f".. py:data:: {full}", "", f"   ``{value[:300]}``"]
        return "\n".join(lines) + "\n"
    if kind == "Operators":  # else autodoc shows scipy's __new__(*args, **kwargs)
        lines.append(f".. {directive}:: {full}{constructor_signature(obj)}")
    else:
        lines.append(f".. {directive}:: {full}")
    if directive == "autoclass":
        lines += ["   :members:"]
        if kind == "Operators":
            # what private bases (the curvature operators' shared class) add, not
            # the LinearOperator interface (on its own page) nor scipy's
            lines += ["   :inherited-members: LinearOperator"]
        if "Enum" in {base.__name__ for base in inspect.getmro(obj)}:
            lines += ["   :undoc-members:"]
    return "\n".join(lines) + "\n"


def constructor_signature(cls: type) -> str:
    """``(a, b=1, *, c=None)``: the parameters of ``cls(...)``, without annotations."""
    signature = inspect.signature(cls)
    empty = inspect.Parameter.empty
    parameters = [
        p.replace(annotation=empty, default=_Shown(p.default))
        if isinstance(p.default, enum.Enum)
        else p.replace(annotation=empty)
        for p in signature.parameters.values()
    ]
    return str(signature.replace(parameters=parameters, return_annotation=empty))


class _Shown:
    """An enum member as written in code (``FisherType.MC``), not as its repr."""

    def __init__(self, member: enum.Enum):
        self.text = f"{type(member).__name__}.{member.name}"

    def __repr__(self) -> str:
        return self.text


def _has_doc_comment(full: str) -> bool:
    """Whether the module documents the name (a ``#:`` comment or a string after it)."""
    from sphinx.pycode import ModuleAnalyzer

    module_name, _, name = full.rpartition(".")
    attr_docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
    return ("", name) in attr_docs


def index_text(sections: list[Section], pages: dict[str, list[tuple[str, str, str]]]) -> str:
    """The reST source of the reference's front page: every section, by group."""
    lines = [
        "API reference",
        "=============",
        "",
        "Generated from the docstrings at every build: every name in "
        "``curvlinops.__all__``, in the ``__all__`` of the modules it lists, in "
        "``curvlinops.backends.__all__`` and the jobs' entry points has a page.",
        "",
    ]
    toctrees = []
    for section in sections:
        toctree = []
        toctrees.append((section.title, toctree))
        lines += [f".. _{section.label}:", ""]
        lines += [section.title, "-" * len(section.title), "", section.intro, ""]
        lines += [f".. py:module:: {section.module}", ""]
        grouped: dict[str, list[tuple[str, str]]] = {}
        for full, kind, summary in pages[section.title]:
            grouped.setdefault(kind, []).append((full, summary))
        for kind in GROUP_ORDER:
            if kind not in grouped:
                continue
            lines += [f".. rubric:: {kind}", "", ".. list-table::", "   :widths: 40 60", ""]
            for full, summary in grouped[kind]:
                lines += [f"   * - :doc:`{full.rsplit('.', 1)[1]} <{full}>`", f"     - {summary}"]
                toctree.append(full)
            lines.append("")
    for title, toctree in toctrees:  # one per section: the sidebar shows its title
        lines += [".. toctree::", "   :hidden:", f"   :caption: {title}", ""]
        lines += [*(f"   {p}" for p in toctree), ""]
    return "\n".join(lines)


def write_api_pages(out: Path) -> dict[str, Path]:
    """Write the reference under ``out``; returns {public name: its page}."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sections = public_sections()
    pages: dict[str, list[tuple[str, str, str]]] = {}
    written: dict[str, Path] = {}
    for section in sections:
        entries = pages.setdefault(section.title, [])
        for name in section.names:
            full, obj = resolve(section, name)
            path = out / f"{full}.rst"
            path.write_text(page_text(full, obj), encoding="utf-8")
            written[full] = path
            summary = _first_line(obj).replace("|", r"\|") or "(no docstring)"
            entries.append((full, kind_of(obj), summary))
    (out / "index.rst").write_text(index_text(sections, pages), encoding="utf-8")
    return written


def public_targets() -> dict[str, str]:
    """{short name and defining-module name: the documented full name} for cross-links."""
    targets: dict[str, str] = {}
    for section in public_sections():
        for name in section.names:
            full, obj = resolve(section, name)
            short = full.rsplit(".", 1)[1]
            targets.setdefault(short, full)
            targets[full] = full
            module = getattr(obj, "__module__", None)
            if module:
                targets[f"{module}.{short}"] = full
    return targets


def _builder_inited(app) -> None:
    write_api_pages(Path(app.srcdir) / API_DIR)
    app.env.curvlinops_targets = public_targets()


def _missing_reference(app, env, node, contnode):
    """Point ``curvlinops.<module>.<Name>`` and bare public names at their public page.

    A reference to a ``curvlinops`` name that is neither public nor private (no
    component starts with ``_``) and has no page is a broken link: warned about.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    targets = getattr(env, "curvlinops_targets", {})
    parts = target.split(".")
    # the object itself, or the class of a method/attribute (then the member added back)
    for cut in (len(parts), len(parts) - 1):
        if cut == 0:
            break
        head, tail = ".".join(parts[:cut]), parts[cut:]
        short = head if "." not in head or head.startswith("curvlinops") else None
        full = targets.get(head) or (targets.get(parts[cut - 1]) if short else None)
        if full is None:
            continue
        resolved = _resolve_xref(app, env, node, contnode, ".".join([full, *tail]))
        if resolved is not None:
            return resolved
    private = any(p.startswith("_") and p != "__main__" for p in parts)
    if target.startswith("curvlinops") and not private:
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            "cross-reference to %s, which has no page", target, location=node
        )
    return None


def _resolve_xref(app, env, node, contnode, full: str):
    domain = env.get_domain("py")
    for role in ("class", "func", "meth", "attr", "data", "exc", "mod", "obj"):
        resolved = domain.resolve_xref(env, node["refdoc"], app.builder, role, full, node, contnode)
        if resolved is not None:
            return resolved
    return None


def setup(app):
    app.connect("builder-inited", _builder_inited)
    app.connect("missing-reference", _missing_reference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
