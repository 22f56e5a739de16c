"""Class names and prompt templates: the one set of rules `from-labels`, eval sets and preflight share.

Users bring templates in two conventions and both are accepted, in any mix:
- OpenAI's CLIP notebooks: `a photo of a {}.` (a positional field; `{0}` is accepted too),
- CLIP_benchmark: `a photo of a {c}.`.
A template must hold exactly one such placeholder and no other `{…}` field (`{{`/`}}` are literal
braces). Templates are normalised to the `{c}` form when read, so the rest of the code fills them with
`fill_template`. Class names come from `classnames.txt` (one line per class folder, in sorted folder
order) or, without that file, from the folder names themselves (`golden_retriever` → `golden
retriever`). Templates come from the set's own `templates.txt` or from one shared file the caller
names. Lines that are blank or start with `#` are ignored in both files.
"""

from __future__ import annotations

import string
from pathlib import Path

__all__ = [
    "CLASSNAMES_FILE",
    "TEMPLATES_FILE",
    "class_folders",
    "fill_template",
    "normalise_template",
    "read_classnames",
    "read_lines",
    "read_templates",
    "resolve_classnames",
    "templates_file",
]

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
_PLACEHOLDERS = ("", "0", "c")  # `{}`, `{0}`, `{c}`
_HELP = "write {} (OpenAI CLIP) or {c} (CLIP_benchmark) where the class name goes"


def read_lines(path: str | Path) -> list[str]:
    """Non-blank lines of a text file, without `#` comment lines."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def normalise_template(template: str, where: str = "") -> str:
    """`template` in the `{c}` form; ValueError naming it for no placeholder, two, or another field."""
    prefix = f"{where}: " if where else ""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:  # a lone '{' or '}'
        raise ValueError(f"{prefix}template {template!r} is malformed ({err}); "
                         "use '{{' for a literal brace") from None
    fields = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
    others = [name for name, _, _ in fields if name not in _PLACEHOLDERS]
    if others:
        raise ValueError(f"{prefix}template {template!r} has the field {{{others[0]}}}: {_HELP}, "
                         "and use '{{' / '}}' for literal braces")
    if len(fields) != 1:
        what = "no placeholder" if not fields else f"{len(fields)} placeholders"
        raise ValueError(f"{prefix}template {template!r} has {what}; it needs exactly one: {_HELP}")
    out = []
    for literal, name, spec, conv in parts:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is not None:
            out.append("{c" + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}")
    return "".join(out)


def read_templates(templates: list[str] | tuple[str, ...] | str | Path) -> list[str]:
    """Templates from a list or a templates file (one per line), each checked and normalised to `{c}`."""
    if isinstance(templates, list | tuple):
        items, where = list(templates), ""
    else:
        path = Path(templates)
        if not path.is_file():
            raise FileNotFoundError(f"templates file not found: {path}")
        items, where = read_lines(path), str(path)
    if not items:
        raise ValueError(f"{where or 'templates'}: no prompt templates; "
                         "give at least one, e.g. 'a photo of a {}.'")
    return [normalise_template(t, where) for t in items]


def fill_template(template: str, classname: str) -> str:
    """The prompt for one class from a normalised template."""
    return template.format(c=classname)


def class_folders(root: str | Path) -> list[Path]:
    """The class folders of an ImageFolder tree, in sorted order (hidden folders ignored)."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def read_classnames(path: str | Path) -> list[str]:
    """Class names from a classnames.txt, one line per class folder in sorted folder order."""
    names = read_lines(path)
    if not names:
        raise ValueError(f"{path} is empty: one class name per line, in sorted class-folder order")
    return names


def resolve_classnames(root: str | Path, folders: list[Path], given: list[str] | None = None) -> list[str]:
    """`given`, else `<root>/classnames.txt`, else the folder names (underscores as spaces); checked
    against the folder count, since names are matched to folders by position."""
    where = Path(root) / CLASSNAMES_FILE
    if given is not None:
        names, source = list(given), "the given class names"
    elif where.is_file():
        names, source = read_classnames(where), str(where)
    else:
        names, source = [f.name.replace("_", " ") for f in folders], "the folder names"
    if len(names) != len(folders):
        shown = [f.name for f in folders][:10]
        raise ValueError(f"{source}: {len(names)} class names for {len(folders)} class folders in {root} "
                         f"({shown}); one line per folder, in sorted folder order")
    if any(not n.strip() for n in names):
        raise ValueError(f"{source}: class names must be non-empty")
    return names


def templates_file(root: str | Path, shared: str | Path | None = None) -> Path:
    """The templates file of an ImageFolder set: its own `templates.txt`, else the shared file."""
    own = Path(root) / TEMPLATES_FILE
    if own.is_file():
        return own
    if shared is not None:
        return Path(shared)
    raise FileNotFoundError(f"{own} not found: put prompt templates there (one per line, with {{}} or {{c}}) "
                            "or name one shared file for all sets (eval.templates / --templates)")
