"""reST source -> readable plain text (:func:`clean_rst`): markup removed, directives rendered
roughly the way Sphinx shows them, prose paragraphs joined into single lines, code kept verbatim."""

from __future__ import annotations

import re
from collections.abc import Iterable

_ADORNMENT_RE = re.compile(r"""^\s*([=\-`:'"~^_*+#<>.!$%&,/;?@\\|])\1{2,}\s*$""")
_TABLE_BORDER_RE = re.compile(r"^\s*(?:\+[-=+]+\+|=+(?: +=+)+|-+(?: +-+)+)\s*$")
_EXPLICIT_RE = re.compile(r"^( *)\.\.(?: +(.*))?$")
_DIRECTIVE_RE = re.compile(r"^([A-Za-z][\w:.-]*)::(?:\s+(.*))?$")
_FOOTNOTE_RE = re.compile(r"^\[([^\]]+)\]\s*(.*)$")
_OPTION_RE = re.compile(r"^:([\w-]+(?: [\w-]+)*):(?:\s+(.*))?$")
_LIST_ITEM_RE = re.compile(r"^(?:[-*+•]|#\.|\d+[.)]|\(\d+\)|[a-zA-Z][.)])\s+")
_FIELD_RE = re.compile(r"^:[\w .-]+:(?:\s|$)")

_LITERAL_RE = re.compile(r"``(?=\S)(.+?)(?<=\S)``(?!`)", re.S)
_ROLE_RE = re.compile(r"(?<![\w`]):(?P<role>[A-Za-z][\w:+.-]*?):`(?P<body>[^`]+)`(?!`)")
_LINK_RE = re.compile(r"`(?P<body>[^`]+)`__?(?!\w)")
_INTERPRETED_RE = re.compile(r"`(?P<body>[^`]+)`")
_FOOTREF_RE = re.compile(r" ?\[(?:#[\w-]*|\d+|\*)\]_")
_STRONG_RE = re.compile(r"(?<![\w*\\])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![\w*])", re.S)
_EMPH_RE = re.compile(r"(?<![\w*\\])\*(?=[^\s*])([^*]+?)(?<=[^\s\\])\*(?![\w*])")
_PLACEHOLDER_RE = re.compile("\x00(\\d+)\x00")

_DROP = {
    "toctree", "index", "highlight", "sectionauthor", "moduleauthor", "codeauthor", "testsetup",
    "testcleanup", "module", "currentmodule", "py:module", "py:currentmodule", "program", "include",
    "literalinclude", "tabularcolumns", "contents", "image", "figure", "raw", "default-role",
    "default-domain", "miscnews", "limited-api-list", "meta", "role", "c:namespace", "c:namespace-push",
    "c:namespace-pop", "autoclass", "autofunction", "automodule", "digraph", "graphviz",
}
_CODE = {
    "code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "productionlist",
    "parsed-literal",
}
_UNWRAP = {"only", "container", "compound", "glossary", "list-table", "table", "epigraph", "centered"}
_ADMONITIONS = {
    "note": "Note", "warning": "Warning", "seealso": "See also", "important": "Important",
    "caution": "Caution", "tip": "Tip", "hint": "Hint", "attention": "Attention", "danger": "Danger",
    "error": "Error", "impl-detail": "CPython implementation detail", "availability": "Availability",
}
_VERSIONS = {
    "versionadded": "New in version {}",
    "versionchanged": "Changed in version {}",
    "deprecated": "Deprecated since version {}",
    "deprecated-removed": "Deprecated since version {}, will be removed in version {}",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _dedent(lines: list[str]) -> list[str]:
    widths = [_indent(line) for line in lines if line.strip()]
    cut = min(widths, default=0)
    return [line[cut:] if line.strip() else "" for line in lines]


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the last non-blank line, from ``start`` on, that is indented deeper than ``indent``."""
    end = start
    for j in range(start, len(lines)):
        if lines[j].strip():
            if _indent(lines[j]) <= indent:
                break
            end = j + 1
    return end


def _role_text(role: str, body: str) -> str:
    """Display text of an interpreted-text role or reference body."""
    body = body.strip()
    titled = re.match(r"(?s)^(.*\S)\s*<([^<>]+)>$", body)
    if titled:
        text = titled.group(1)
    else:
        text = body.lstrip("~!")
        if role in ("pep", "rfc"):
            text = f"{role.upper()} {text.split('#')[0]}"
        elif role in ("samp", "file"):
            text = re.sub(r"(?<!\\)[{}]", "", text)
    return " ".join(text.split())


def _inline(text: str) -> str:
    """Strip inline reST markup (roles, literals, emphasis, references)."""
    saved: list[str] = []

    def keep(value: str) -> str:
        saved.append(value)
        return f"\x00{len(saved) - 1}\x00"

    text = _LITERAL_RE.sub(lambda m: keep(" ".join(m.group(1).split())), text)
    text = _ROLE_RE.sub(lambda m: keep(_role_text(m.group("role"), m.group("body"))), text)
    text = _LINK_RE.sub(lambda m: keep(_role_text("", m.group("body"))), text)
    text = _INTERPRETED_RE.sub(lambda m: keep(_role_text("", m.group("body"))), text)
    text = _FOOTREF_RE.sub("", text)
    text = _STRONG_RE.sub(r"\1", text)
    text = _EMPH_RE.sub(r"\1", text)
    text = re.sub(r"\\ ", "", text)
    text = re.sub(r"\\(.)", r"\1", text)
    while "\x00" in text:
        text = _PLACEHOLDER_RE.sub(lambda m: saved[int(m.group(1))], text)
    return text


def _reflow(lines: list[str]) -> list[str]:
    """Join wrapped prose lines; list items, fields and indentation changes start a new line."""
    out: list[str] = []
    cont = -1
    for line in lines:
        stripped = line.strip()
        ind = _indent(line)
        stripped = " ".join(stripped.split())
        if out and ind == cont and not _LIST_ITEM_RE.match(stripped) and not _FIELD_RE.match(stripped):
            out[-1] += " " + stripped
            continue
        out.append(" " * ind + stripped)
        item = _LIST_ITEM_RE.match(stripped)
        cont = ind + (item.end() if item else 0)
    return out


def _strip_double_colon(lines: list[str]) -> list[str]:
    """Apply the reST rule for a paragraph that ends with ``::``."""
    last = lines[-1].rstrip()
    if last.strip() == "::":
        return lines[:-1]
    if last.endswith(" ::"):
        return lines[:-1] + [last[:-3].rstrip()]
    return lines[:-1] + [last[:-1]]


def _paragraph(lines: list[str], reflow: bool) -> list[str]:
    """Clean one paragraph (no blank lines, no explicit markup)."""
    if lines[0].lstrip().startswith(">>>"):
        return [line.rstrip() for line in lines]
    is_table = any(_TABLE_BORDER_RE.match(line) for line in lines)
    kept = [line for line in lines if not (_ADORNMENT_RE.match(line) or _TABLE_BORDER_RE.match(line))]
    if not kept:
        return []
    kept = _inline("\n".join(kept)).split("\n")
    if reflow and not is_table:
        kept = _reflow(kept)
    if kept[-1].rstrip().endswith("::"):
        kept = _strip_double_colon(kept)
    return kept


def _labelled(label: str, content: list[str], sep: str = ": ") -> list[str]:
    """Prefix ``label`` to cleaned content, on the first line when it is prose."""
    body = list(content)
    while body and not body[0].strip():
        body.pop(0)
    if not body:
        return [label + "."]
    first = body[0]
    prose = first[:1].isalnum() and not first.startswith(">>>") and not _LIST_ITEM_RE.match(first)
    if prose:
        return [f"{label}{sep}{first}"] + body[1:]
    return [label + ":"] + body


def _directive(
    name: str, arg_lines: list[str], body: list[str], reflow: bool
) -> list[str]:
    """Render one directive (header arguments already split from its dedented body)."""
    arg = " ".join(arg_lines)
    if name in _DROP:
        return []
    if name in _CODE:
        code = (arg_lines[1:] if name == "productionlist" else []) + body
        code = _dedent(code)
        return [""] + [line.rstrip() for line in code] + [""]
    if name == "audit-event":
        parts = arg.split()
        event = parts[0] if parts else "?"
        args = [a for a in (parts[1].strip('"').split(",") if len(parts) > 1 else []) if a]
        if not args:
            return [f"Raises an auditing event {event}."]
        noun = "argument" if len(args) == 1 else "arguments"
        return [f"Raises an auditing event {event} with {noun} {', '.join(args)}."]
    content = [arg] if arg else []
    if name in _VERSIONS:
        words = arg.split(None, 2 if name == "deprecated-removed" else 1)
        nver = 2 if name == "deprecated-removed" else 1
        versions = (words[:nver] + ["?", "?"])[:nver]
        label = _VERSIONS[name].format(*versions)
        rest = " ".join(words[nver:])
        content = ([rest] if rest else []) + ([""] + body if body else [])
        return _labelled(label, _clean_lines(content, reflow))
    if name in _ADMONITIONS or name == "admonition":
        label = _ADMONITIONS.get(name) or arg or "Note"
        content = ([] if name == "admonition" else content) + ([""] + body if body else [])
        return _labelled(label, _clean_lines(content, reflow))
    if name in _UNWRAP:
        return _clean_lines(body, reflow)
    # Generic (API signatures, rubric, topic, cmdoption, envvar, ...): header lines then content.
    return [line.strip() for line in arg_lines] + [""] + _clean_lines(body, reflow)


def _split_header(lines: list[str], start: int, end: int) -> tuple[list[str], dict[str, str], int]:
    """Continuation lines and ``:options:`` right after a directive line; returns (args, options, body_start)."""
    args: list[str] = []
    options: dict[str, str] = {}
    j = start
    while j < end and lines[j].strip():
        stripped = lines[j].strip()
        option = _OPTION_RE.match(stripped)
        if option:
            options[option.group(1)] = (option.group(2) or "").strip()
        else:
            args.append(stripped)
        j += 1
    return args, options, j


def _explicit(lines: list[str], i: int, reflow: bool) -> tuple[list[str], int]:
    """Render the explicit-markup block starting at line ``i``; returns (lines, next index)."""
    match = _EXPLICIT_RE.match(lines[i])
    assert match is not None
    indent, rest = len(match.group(1)), (match.group(2) or "").strip()
    end = _block_end(lines, i + 1, indent)
    footnote = _FOOTNOTE_RE.match(rest)
    directive = _DIRECTIVE_RE.match(rest)
    if footnote and not rest.startswith("|"):
        body = [footnote.group(2)] + _dedent(lines[i + 1:end])
        rendered = _labelled(f"[{footnote.group(1)}]", _clean_lines(body, reflow), sep=" ")
    elif directive and not rest.startswith(("|", "_")):
        head = [directive.group(2).strip()] if directive.group(2) else []
        more, _options, body_start = _split_header(lines, i + 1, end)
        body = _dedent(lines[body_start:end])
        rendered = _directive(directive.group(1).lower(), head + more, body, reflow)
    else:  # comment, hyperlink target, substitution definition
        rendered = []
    pad = " " * indent
    return [""] + [pad + line if line.strip() else "" for line in rendered] + [""], end


def _clean_lines(lines: list[str], reflow: bool) -> list[str]:
    """Clean a block of reST lines (recursive through directive bodies)."""
    out: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            out.append("")
            i += 1
            continue
        if _EXPLICIT_RE.match(line):
            rendered, i = _explicit(lines, i, reflow)
            out.extend(rendered)
            continue
        j = i + 1
        while j < n and lines[j].strip() and not _EXPLICIT_RE.match(lines[j]):
            j += 1
        para = lines[i:j]
        out.extend(_paragraph(para, reflow))
        i = j
        if para[-1].rstrip().endswith("::") and not para[0].lstrip().startswith(">>>"):
            i = _literal_block(lines, i, _content_indent(para[-1]), out)
    return out


def _content_indent(line: str) -> int:
    """Indentation of the text of ``line`` (after a list marker, if any)."""
    item = _LIST_ITEM_RE.match(line.lstrip())
    return _indent(line) + (item.end() if item else 0)


def _literal_block(lines: list[str], i: int, indent: int, out: list[str]) -> int:
    """Copy the indented literal block after a ``::`` paragraph verbatim; returns the next index."""
    k = i
    while k < len(lines) and not lines[k].strip():
        k += 1
    if k >= len(lines) or _indent(lines[k]) <= indent:
        return i
    end = _block_end(lines, k, indent)
    out.append("")
    out.extend(line.rstrip() for line in lines[k:end])
    out.append("")
    return end


def _finish(lines: Iterable[str]) -> str:
    """Strip trailing spaces, collapse blank-line runs and trim the ends."""
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def _normalize(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8).split("\n")


def clean_rst(text: str, reflow: bool = True) -> str:
    """reST source -> readable plain text (prose + code); ``reflow`` joins wrapped prose lines."""
    return _finish(_clean_lines(_normalize(text), reflow))
