"""Reading the config file's YAML: libyaml's safe loader, a key given twice refused, and every
YAML problem a ConfigError naming the line. Imported only when a config is parsed (a run of a
large config takes its checked settings from config_cache instead, without PyYAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import _join, _one_line, _short
from .errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"

# libyaml's parser is several times faster than the pure-Python one; the constructor and the
# duplicate-key walk below are Python either way.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader
# What PyYAML's constructors raise, instead of a YAML error, for a value they cannot build.
_CONSTRUCT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)
_MAX_INT_BITS = 1000  # beyond any count or duration; float() and str() always work below it


class _Loader(_BaseLoader):
    """The safe loader, where a value PyYAML cannot build (`2020-13-45`, `!!int ''`,
    `!!bool maybe`, a 5000-digit number) or an integer too large to use is a YAML error at that
    value rather than a ValueError, KeyError... from deep inside PyYAML."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            data = super().construct_object(node, deep)
        except _CONSTRUCT_ERRORS as e:
            what = _short(node.value) if isinstance(node, yaml.ScalarNode) else "this value"
            why = f" ({str(e).partition(';')[0][:80]})" if isinstance(e, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{what} is not a valid {str(node.tag).rpartition(':')[2]}{why}",
                node.start_mark) from None
        if type(data) is int and data.bit_length() > _MAX_INT_BITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer too large ({data.bit_length()} bits)", node.start_mark)
        return data


def read_yaml(path: Path, file: str) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(file, "", "is a folder, not a file") from None
    except PermissionError:
        raise ConfigError(file, "", "permission denied") from None
    except OSError as e:
        raise ConfigError(file, "", f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(file, "", f"not UTF-8 text (bad byte at offset {e.start})") from None
    return parse_yaml(text, file)


def parse_yaml(text: str, file: str) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, file)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(file, "", f"invalid YAML {_yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(file, "", f"invalid YAML: {_one_line(str(e))}") from None
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.MarkedYAMLError) -> str:
    mark = e.problem_mark or e.context_mark
    where = f"at line {mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    text = e.problem or e.context or "syntax error"
    if e.problem and e.context:
        cmark = e.context_mark
        cwhere = f" at line {cmark.line + 1}:{cmark.column + 1}" if cmark is not None else ""
        text = f"{e.problem} ({e.context}{cwhere})"
    return _one_line(f"{where}: {text}")


def _check_duplicate_keys(root: yaml.Node, file: str) -> None:
    """Refuse a key given twice in one mapping: PyYAML would silently keep the last one.

    Walks the composed node tree (not the built objects) so the key path and both lines are known.
    Merge keys (`<<`) are skipped: overriding a merged key is what they are for.
    """
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    seen_nodes: set[int] = set()
    while stack:
        node, where = stack.pop()
        if id(node) in seen_nodes:  # an alias: checked where the anchor was
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # the constructor refuses unhashable keys itself
                if key_node.tag == _MERGE_TAG:
                    continue
                ident = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if ident in lines:
                    raise ConfigError(file, _join(where, key_node.value),
                                      f"duplicate key (first at line {lines[ident]},"
                                      f" again at line {line})")
                lines[ident] = line
                # Scalars hold no keys: skip them, and building their path strings.
                if not isinstance(value_node, yaml.ScalarNode):
                    stack.append((value_node, _join(where, key_node.value)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value)
                         if not isinstance(item, yaml.ScalarNode))
