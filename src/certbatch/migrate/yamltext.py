"""Adding certificate entries to a config file as text, so the operator's file keeps its
comments, order and layout.

A new file is written whole. In an existing file the entries go in as text: below the last
entry under `certificates:` (same indentation), or replacing one entry's lines (--replace), or
into a new `certificates:` section at the end. The result is checked by parsing both texts: it
must hold exactly the old data plus the new entries, else nothing is written (`TextEditError`).
"""

from __future__ import annotations

from typing import Any

import yaml


class TextEditError(Exception):
    """The entries cannot be added to this file as text (say why; the caller refuses)."""


class _Dumper(yaml.SafeDumper):
    """Mappings as blocks, lists on one line (`domains: [a.example, b.example]`)."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def entry_text(name: str, entry: dict[str, Any], comments: list[str], indent: int) -> str:
    """`name:` and its mapping, indented by `indent`, with comment lines above it."""
    body = yaml.dump({name: entry}, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=4096)
    pad = " " * indent
    lines = [f"{pad}# {c}" for c in comments] + [pad + line for line in body.splitlines()]
    return "\n".join(lines) + "\n"


def new_file(header: list[str], top: dict[str, Any],
             entries: list[tuple[str, dict[str, Any], list[str]]]) -> str:
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(top, sort_keys=False, default_flow_style=False)
    text += "certificates:\n"
    return text + "".join(entry_text(n, e, c, 2) for n, e, c in entries)


def add_entries(text: str, entries: list[tuple[str, dict[str, Any], list[str]]],
                replace: set[str]) -> str:
    """`text` with `entries` (name, mapping, comments) added under `certificates:`; the names in
    `replace` are existing entries whose lines are replaced in place."""
    root = _compose(text)
    certs = _certificates(root)
    out = text
    # Replace from the end, so earlier offsets stay valid.
    spans = []
    for name, entry, comments in entries:
        if name in replace:
            if certs is None:
                raise TextEditError(f"no certificates section holds {name}")
            spans.append((_entry_span(text, certs, name), name, entry, comments))
    nl = "\r\n" if "\r\n" in text else "\n"  # the file's own line breaks
    for (start, end, indent), name, entry, comments in sorted(spans, key=lambda s: -s[0][0]):
        out = out[:start] + entry_text(name, entry, comments, indent).replace("\n", nl) + \
            out[end:]
    added = [(n, e, c) for n, e, c in entries if n not in replace]
    if added:
        out = _append(out, added)
    _verify(text, out, entries)
    return out


def _compose(text: str) -> yaml.MappingNode | None:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise TextEditError(f"it is not valid YAML: {' '.join(str(exc).split())}") from None
    if node is not None and not isinstance(node, yaml.MappingNode):
        raise TextEditError("its top level is not a mapping")
    return node


def _certificates(root: yaml.MappingNode | None) -> yaml.Node | None:
    if root is None:
        return None
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "certificates":
            return value
    return None


def _last_end(node: yaml.Node) -> int:
    """Where the last character of `node`'s content is (block nodes end where the next token
    starts, after comments and blank lines; their last leaf does not)."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
        return _last_end(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
        return _last_end(node.value[-1])
    return int(node.end_mark.index)


def _line_end(text: str, index: int) -> int:
    """The start of the line after the one `index` is on; a node that ends with its line
    break (a block scalar, `|`) ends there already."""
    if index > 0 and text[index - 1] == "\n":
        return index
    nl = text.find("\n", index)
    return len(text) if nl < 0 else nl + 1


def _entry_span(text: str, certs: yaml.Node, name: str) -> tuple[int, int, int]:
    """(start, end, indentation) of the lines of the entry `name`."""
    if not isinstance(certs, yaml.MappingNode) or certs.flow_style:
        raise TextEditError("certificates is not a block mapping")
    for key, value in certs.value:
        if isinstance(key, yaml.ScalarNode) and key.value == name:
            start = key.start_mark.index - key.start_mark.column
            if text[start:key.start_mark.index].strip():
                raise TextEditError(f"the entry {name} does not start its own line")
            return start, _line_end(text, _last_end(value)), key.start_mark.column
    raise TextEditError(f"no entry {name} under certificates")


def _append(text: str, entries: list[tuple[str, dict[str, Any], list[str]]]) -> str:
    root = _compose(text)
    certs = _certificates(root)

    nl = "\r\n" if "\r\n" in text else "\n"  # the file's own line breaks

    def block(indent: int) -> str:
        return "".join(entry_text(n, e, c, indent) for n, e, c in entries).replace("\n", nl)

    if certs is None:  # no certificates section: a new one at the end
        sep = "" if not text or text.endswith("\n") else nl
        return f"{text}{sep}certificates:{nl}{block(2)}"
    if isinstance(certs, yaml.MappingNode) and not certs.flow_style and certs.value:
        at = _line_end(text, _last_end(certs))
        indent = certs.value[0][0].start_mark.column
        return text[:at] + block(indent) + text[at:]
    empty_scalar = isinstance(certs, yaml.ScalarNode) and certs.tag.endswith(":null")
    empty_flow = isinstance(certs, yaml.MappingNode) and certs.flow_style and not certs.value
    if not (empty_scalar or empty_flow):
        raise TextEditError("certificates is written in flow style ({...}); write it as a "
                            "block mapping first")
    # `certificates:`, `certificates: ~`, `certificates: {}`: drop the value, entries below
    start, end = certs.start_mark.index, certs.end_mark.index
    at = _line_end(text, end)
    line_rest = text[end:at]
    return text[:start].rstrip(" \t") + line_rest.rstrip("\r\n") + nl + block(2) + text[at:]


def _verify(old: str, new: str, entries: list[tuple[str, dict[str, Any], list[str]]]) -> None:
    """The new text must load as the old data plus the entries (and nothing else changed)."""
    try:
        before = yaml.safe_load(old) or {}
        after = yaml.safe_load(new) or {}
    except yaml.YAMLError as exc:
        raise TextEditError(f"the edited text is not valid YAML: {exc}") from None
    expected = dict(before)
    certs = dict(expected.get("certificates") or {})
    for name, entry, _ in entries:
        certs[name] = entry
    expected["certificates"] = certs
    if after != expected:
        raise TextEditError("adding the entries as text would change more than them")
