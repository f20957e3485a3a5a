"""The documentation matches the code.

- docs/batch.schema.json, docs/ledger.schema.json and docs/meta.schema.json describe the files a
  real spool writes (an entry's meta.json, a target's kept batch.json, the applied/ record,
  every kind of ledger), and every schema in docs/
  uses only keywords that the validators here check (or pure annotations);
- docs/configuration.md lists every `hooks` key the loader accepts, and docs/metrics.md every
  metric certbatch writes;
- docs/hooks.md's variable tables list exactly the CERTBATCH_* variables hooks are handed;
- every relative link in README.md and docs/*.md points at a file that exists, and at a heading
  that exists when it has an anchor;
- the YAML examples of the hooks documentation load as configuration;
- README.md stays a first read (short, linking every page of docs/), no long paragraph is written
  twice across README.md and docs/*.md, and docs/certbatch.1 is what scripts/manpage.py makes of
  the commands today.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cli import check_schema
from test_spool import cert, hook

from certbatch import config, metrics
from certbatch.config import AcmeSettings, HookSettings, Settings, TargetSettings
from certbatch.runner import RunReport
from certbatch.spool import Spool
from certbatch.spool.env import NAMES_ENV_MAX, deploy_env, notify_env
from certbatch.store import Store
from certbatch.targets import resolve

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"
HOOKS_MD = DOCS / "hooks.md"
CONFIG_MD = DOCS / "configuration.md"
METRICS_MD = DOCS / "metrics.md"

# JSON Schema keywords: those check_schema (tests/test_cli.py) checks, those `validate` below adds,
# and annotations that check nothing. A schema using anything else would promise a check that no
# test makes.
CHECKED = {"type", "enum", "required", "properties", "additionalProperties", "items", "$ref"}
CHECKED_HERE = {"pattern", "propertyNames", "minimum"}
ANNOTATIONS = {"$schema", "$defs", "title", "description"}


def schema(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DOCS / name).read_text())
    return data


def validate(value: Any, sch: dict[str, Any]) -> None:
    """check_schema, plus the keywords it leaves out (CHECKED_HERE)."""
    check_schema(value, sch)
    _check_more(value, sch, sch, "$")


def _check_more(value: Any, sch: dict[str, Any], root: dict[str, Any], where: str) -> None:
    if "$ref" in sch:  # local references only; keywords beside the $ref still apply
        node = root
        for part in sch["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        sch = {**node, **{k: v for k, v in sch.items() if k != "$ref"}}
    if isinstance(value, str) and "pattern" in sch:
        assert re.search(sch["pattern"], value), f"{where}: {value!r} !~ {sch['pattern']}"
    if "minimum" in sch and isinstance(value, (int, float)) and not isinstance(value, bool):
        assert value >= sch["minimum"], f"{where}: {value!r} < {sch['minimum']}"
    if isinstance(value, dict):
        props = sch.get("properties", {})
        for key, item in value.items():
            if key in props:
                _check_more(item, props[key], root, f"{where}.{key}")
            elif isinstance(sch.get("additionalProperties"), dict):
                _check_more(item, sch["additionalProperties"], root, f"{where}.{key}")
            if "propertyNames" in sch:
                _check_more(key, sch["propertyNames"], root, f"{where}[{key!r}]")
    if isinstance(value, list) and "items" in sch:
        for i, item in enumerate(value):
            _check_more(item, sch["items"], root, f"{where}[{i}]")


def keywords(sch: dict[str, Any]) -> set[str]:
    """Every keyword used anywhere in a schema (property and definition names left out)."""
    found: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        found.update(node)
        for key, sub in node.items():
            if key in ("properties", "$defs"):
                for child in sub.values():
                    walk(child)
            elif key in ("items", "additionalProperties", "propertyNames") \
                    and isinstance(sub, dict):
                walk(sub)

    walk(sch)
    return found


def section(text: str, heading: str) -> str:
    """The text under `heading` (a whole line) up to the next heading of the same or a higher
    level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    assert heading in lines, f"no heading {heading!r}"
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)


# -- (a) the schemas describe the files certbatch writes ----------------------------------------

def test_schemas_use_only_checked_keywords() -> None:
    for path in sorted(DOCS.glob("*.schema.json")):
        unknown = keywords(schema(path.name)) - CHECKED - CHECKED_HERE - ANNOTATIONS
        assert not unknown, f"{path.name}: keywords no test checks: {sorted(unknown)}"


def test_batch_and_ledger_files_match_their_schemas(tmp_path: Path) -> None:
    hooks_dir = tmp_path / "hooks"
    spool = Spool(tmp_path / "spool", hooks_dir, notify_timeout=20)
    hook(hooks_dir / "notify.d" / "50-ok", "exit 0\n")
    hook(hooks_dir / "notify.d" / "60-fails", 'echo "backend unreachable" >&2\nexit 3\n')
    (hooks_dir / "notify.d" / "70-cannot").write_text("#!/bin/sh\n")  # not executable
    settings = HookSettings(notify_timeout=20, targets={
        "cfg": TargetSettings("cfg", command="exit 0", env=(("SETTING", "1"),))})
    targets = resolve(hooks_dir, settings)
    names = ["api", "www.example", "x_1-2"]
    for i, name in enumerate(names):
        assert spool.stage(cert(name, serial=f"{i + 10:x}")).ok

    out = spool.notify(targets, failed_names=["legacy"])

    assert [t.target for t in out.failed_targets] == ["60-fails", "70-cannot"]
    batch_schema, ledger_schema = schema("batch.schema.json"), schema("ledger.schema.json")
    kept = json.loads((spool.root / "targets" / "60-fails" / "batch.json").read_text())
    validate(kept, batch_schema)
    assert kept["target"] == "60-fails" and kept["names"] == names and kept["count"] == 3
    assert kept["failed_names"] == ["legacy"] and kept["batch_id"] == out.batch_id
    assert kept["certificates"][0]["folder"] == str(spool.root / "pending" / "api")
    assert not (spool.root / "targets" / "50-ok" / "batch.json").exists()  # removed on success

    def ledger(target: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (spool.root / "targets" / target / "ledger.json").read_text())
        validate(data, ledger_schema)
        return data

    ok, failed, cannot = ledger("50-ok"), ledger("60-fails"), ledger("70-cannot")
    assert ledger("cfg")["last_result"] == "ok"
    assert ok["applied"] == {"api": "a", "www.example": "b", "x_1-2": "c"}
    assert ok["last_error"] is None and ok["last_success"] == ok["last_attempt"]
    assert failed["last_result"] == "failed" and failed["applied"] == {}
    assert failed["last_success"] is None and "backend unreachable" in failed["last_error"]
    assert cannot["last_result"] == "failed" and "not executable" in cannot["last_error"]

    # The failing targets are fixed (one removed, one made to succeed): the entries leave
    # pending/, and applied/<batch-id>/batch.json is the record, with target null.
    (hooks_dir / "notify.d" / "70-cannot").unlink()
    hook(hooks_dir / "notify.d" / "60-fails", "exit 0\n")
    again = spool.notify(resolve(hooks_dir, settings))
    assert again.ok and again.applied == names
    record = json.loads((spool.root / "applied" / again.batch_id / "batch.json").read_text())
    validate(record, batch_schema)
    assert record["target"] is None and record["names"] == names
    assert record["failed_names"] == []
    ledger("60-fails")

    # Every staged entry's meta.json (what hooks read) passes docs/meta.schema.json.
    for entry in spool.pending():
        validate(json.loads((entry.folder / "meta.json").read_text()), schema("meta.schema.json"))
    for name in names:
        validate(json.loads((spool.root / "applied" / again.batch_id / name / "meta.json")
                            .read_text()), schema("meta.schema.json"))

    # A target that never succeeded, and applied serials of several certificates.
    assert spool.stage(cert("api", serial="0f", version="v2")).ok
    hook(hooks_dir / "notify.d" / "80-new", "exit 1\n")
    spool.notify(resolve(hooks_dir, settings))
    assert ledger("80-new")["applied"] == {}
    assert ledger("50-ok")["applied"]["api"] == "0f"


def test_documented_examples_match_the_files(tmp_path: Path) -> None:
    """The ledger shown in docs/hooks.md passes its schema; its meta.json and batch.json examples
    have the keys certbatch writes."""
    text = HOOKS_MD.read_text()
    blocks = [json.loads(b) for b in re.findall(r"^```json\n(.*?)^```$", text, re.M | re.S)]
    ledgers = [b for b in blocks if "applied" in b and "last_result" in b]
    assert ledgers
    for example in ledgers:
        validate(example, schema("ledger.schema.json"))

    hooks_dir = tmp_path / "hooks"
    spool = Spool(tmp_path / "spool", hooks_dir, notify_timeout=20)
    hook(hooks_dir / "notify.d" / "t", "exit 1\n")
    assert spool.stage(cert("www")).ok
    spool.notify()
    meta = json.loads((spool.root / "pending" / "www" / "meta.json").read_text())
    batch = json.loads((spool.root / "targets" / "t" / "batch.json").read_text())
    (meta_example,) = [b for b in blocks if "not_before" in b]
    assert meta_example.keys() == meta.keys()
    (batch_example,) = [b for b in blocks if "batch_id" in b]
    assert batch_example.keys() == batch.keys()
    assert batch_example["certificates"][0].keys() == batch["certificates"][0].keys()
    validate(dict(batch_example, certificates=[batch_example["certificates"][0]]),
             schema("batch.schema.json"))


# -- (b), (c), (d): keys, metrics and variables are documented -----------------------------------

def test_every_hooks_key_is_in_the_configuration_reference() -> None:
    table = section(CONFIG_MD.read_text(), "## `hooks` (optional)")
    for key in config._HOOKS_KEYS:
        assert f"| `{key}` |" in table, key
    for key in config._TARGET_KEYS:
        assert f"| `targets.<name>.{key}` |" in table, key


def test_every_metric_is_in_the_metrics_page(tmp_path: Path) -> None:
    settings = Settings(path=tmp_path / "certbatch.yaml",
                        acme=AcmeSettings(directory="https://ca.example/dir"))
    report = RunReport(started_at=dt.datetime.now(dt.timezone.utc))
    text = metrics.render(settings, Store(tmp_path / "state"), report, now=0.0)
    names = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert len(names) >= 12 and all(n.startswith("certbatch_") for n in names), names
    table = METRICS_MD.read_text()
    for name in names:
        assert f"| `{name}` |" in table, name


def hook_variables() -> tuple[set[str], set[str]]:
    """The variable names spool/env.py can hand a deploy hook and a notify target."""
    deploy = set(deploy_env(Path("/spool"), "www", ["example.org"], Path("/spool/.staging/w")))
    long = [f"{i:05d}-{'x' * 58}" for i in range(NAMES_ENV_MAX // 64 + 1)]  # over the limit
    assert len(" ".join(long)) > NAMES_ENV_MAX
    notify: set[str] = set()
    for names in (["www"], long):
        notify |= set(notify_env(Path("/spool"), "t", Path("/spool/targets/t"), names, names))
    return deploy, notify


def table_variables(text: str) -> set[str]:
    return set(re.findall(r"^\| `(CERTBATCH_[A-Z_]+)` \|", text, re.M))


def test_hooks_md_tables_list_every_variable_a_hook_is_handed() -> None:
    deploy, notify = hook_variables()
    assert {"CERTBATCH_NAMES_TRUNCATED", "CERTBATCH_FAILED_NAMES_TRUNCATED"} <= notify
    text = HOOKS_MD.read_text()
    for name in deploy | notify:
        assert f"`{name}`" in text, name
    assert table_variables(section(text, "## Deploy hooks")) == deploy
    assert table_variables(section(text, "## Notify targets")) == notify


# -- (e) links ------------------------------------------------------------------------------------

def slugs(path: Path) -> set[str]:
    """The anchors GitHub makes for the headings of a Markdown file."""
    seen: Counter[str] = Counter()
    found = set()
    for line in without_code_blocks(path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return found


def links(path: Path) -> list[str]:
    text = without_code_blocks(path.read_text())
    text = re.sub(r"``.+?``|`[^`\n]*`", "", text)  # code spans: their brackets are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_point_at_existing_files_and_headings(doc: Path) -> None:
    found = links(doc)
    assert found, f"{doc.name}: no links found"
    for link in found:
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: link {link}: {path} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in slugs(path), f"{doc.name}: link {link}: no such heading"


# -- the YAML examples load ------------------------------------------------------------------------

@pytest.mark.parametrize("doc", [README, HOOKS_MD], ids=lambda p: p.name)
def test_hooks_yaml_examples_load(doc: Path, tmp_path: Path) -> None:
    blocks = re.findall(r"^```yaml\n(.*?)^```$", doc.read_text(), re.M | re.S)
    examples = [yaml.safe_load(b) for b in blocks]
    examples = [e for e in examples if isinstance(e, dict) and "hooks" in e]
    assert examples, f"{doc.name}: no hooks example"
    for i, example in enumerate(examples):
        path = tmp_path / f"example-{i}.yaml"
        path.write_text(yaml.safe_dump({
            "acme": {"directory": "https://ca.example/dir"},
            "hooks": example["hooks"],
            "certificates": {"www": {"domains": ["www.example.com"],
                                     "challenge": {"type": "http-01", "standalone": {}}}},
        }))
        settings = config.load(path)
        assert settings.hooks.targets or settings.hooks.notify, example


# -- the README is a first read; nothing is said twice; the man page follows the commands ---------

def test_the_readme_is_short_and_links_every_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 330, "README.md is the first read: move details to docs/"
    first = text.split("\n## ")[0]
    assert "bash scripts/demo.sh" in first and "bash scripts/test.sh" in first
    linked = {link.partition("#")[0] for link in links(README)}
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


def paragraphs(path: Path) -> list[str]:
    """Prose paragraphs and table rows of a Markdown file, whitespace-normalised."""
    text = without_code_blocks(path.read_text())
    found = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    found += [" ".join(line.split()) for line in text.splitlines() if line.startswith("|")]
    return [p for p in found if len(p) >= 160 and not p.startswith("|---")]


def test_no_long_paragraph_is_written_twice() -> None:
    seen: dict[str, str] = {}
    for doc in [README, *sorted(DOCS.glob("*.md"))]:
        for para in set(paragraphs(doc)):
            assert para not in seen, f"{doc.name} repeats {seen[para]}: {para[:80]}..."
            seen[para] = doc.name


def test_the_man_page_is_generated_from_the_commands() -> None:
    spec = importlib.util.spec_from_file_location("manpage", REPO / "scripts" / "manpage.py")
    assert spec and spec.loader
    manpage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(manpage)
    text = manpage.render()
    for command in ("init", "renew", "status", "check", "run-hook", "import certbot"):
        assert f".SS certbatch {command.replace('-', chr(92) + '-')}\n" in text, command
    assert (DOCS / "certbatch.1").read_text() == text, \
        "docs/certbatch.1 is out of date: run .venv/bin/python scripts/manpage.py"
