"""The command layer: help everywhere, exit codes, run lock, cron-quiet output, JSON, metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from cli_helpers import REPO, probe_hook, run, write_config

from certbatch.cli import cli


def walk(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, (*path, name))


COMMANDS = list(walk(cli))


def test_the_expected_commands_exist():
    assert {" ".join(p) for p, _ in COMMANDS} >= {"", "renew", "status", "run-hook", "check"}


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "certbatch"
                                                       for p, _ in COMMANDS])
def test_every_command_and_option_has_help(path, command):
    assert (command.help or "").strip(), f"{' '.join(path)} has no help text"
    for param in command.params:
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"{' '.join(path)} {param.opts} has no help"
    result = run([*path, "--help"], None)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: certbatch")


def test_exit_codes_are_in_help():
    for args in ([], ["renew"]):
        out = run([*args, "--help"], None).stdout
        for code in ("0 ", "1 ", "2 ", "75 "):
            assert re.search(rf"^\s+{code}", out, re.M), (args, code)


def test_unknown_option_is_a_usage_error():
    result = run(["renew", "--frobnicate"], None)
    assert result.returncode == 2
    assert "No such option" in result.stderr


def simple_config(tmp_path: Path, pebble=None, **sections) -> Path:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")

    class Fake:
        directory_url = "https://127.0.0.1:9/dir"  # never contacted by these tests
        ca_bundle = bundle

        def env(self):
            return {}

    return write_config(tmp_path, pebble or Fake(), {"site": {"domains": ["a.example.com"]}},
                        **sections)


def hold_run_lock(config: Path) -> subprocess.Popen[str]:
    """A real process holding the run lock (through the runner's own lock) until stdin closes."""
    code = f"""
import sys
from pathlib import Path
from certbatch import config
from certbatch.runner import run_lock
settings = config.load(Path({str(config)!r}))
with run_lock(settings.paths.state):
    print("locked", flush=True)
    sys.stdin.readline()
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_exits_75_naming_the_holder_then_killed_holder_does_not_block(tmp_path):
    cfg = simple_config(tmp_path)
    holder = hold_run_lock(cfg)
    try:
        t0 = time.monotonic()
        second = run(["run-hook"], cfg)
        assert second.returncode == 75
        assert time.monotonic() - t0 < 5  # exits at once, does not wait
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"another certbatch (pid {holder.pid}, running since " \
            in lines[0], lines
        assert run(["renew", "--only", "site"], cfg).returncode == 75
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        holder.wait()
        third = run(["run-hook"], cfg)
        assert third.returncode == 0, third.stderr
        assert third.stdout.strip() == "nothing pending"
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "state" / ".lock").exists()


def test_wait_waits_for_the_lock(tmp_path):
    cfg = simple_config(tmp_path)
    holder = hold_run_lock(cfg)
    try:
        waiter = subprocess.Popen([sys.executable, "-m", "certbatch", "-c", str(cfg),
                                   "run-hook", "--wait", "30"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting
        assert holder.stdin is not None
        holder.stdin.close()  # release
        holder.wait()
        out, errout = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, errout
        assert out.strip() == "nothing pending"
    finally:
        holder.kill()
        holder.wait()


def test_json_report_matches_documented_schema(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, {"a": {"domains": ["json-a.example.com"]},
                                          "b": {"domains": ["json-b.example.com"]}})
    probe_hook(tmp_path / "hooks" / "notify.d" / "50-probe", tmp_path)
    result = run(["renew", "--json"], cfg, pebble)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    schema = json.loads((REPO / "docs" / "report.schema.json").read_text())
    check_schema(report, schema)
    assert [c["name"] for c in report["certificates"]] == ["a", "b"]
    assert {c["outcome"] for c in report["certificates"]} == {"issued"}
    assert report["notify"]["ran"] and report["notify"]["names"] == ["a", "b"]
    assert report["exit_code"] == 0
    again = json.loads(run(["renew", "--json"], cfg, pebble).stdout)
    check_schema(again, schema)
    assert {c["outcome"] for c in again["certificates"]} == {"not-due"}
    assert again["notify"]["ran"] is False

    status = json.loads(run(["status", "--json"], cfg, pebble).stdout)
    assert [c["name"] for c in status["certificates"]] == ["a", "b"]
    assert all(c["days_left"] > 0 and c["due"] is False for c in status["certificates"])


def check_schema(value, schema, where="$", root=None):
    """A small validator for the subset of JSON Schema the docs/*.schema.json files use."""
    root = schema if root is None else root
    if "$ref" in schema:  # only local references: "#/$defs/name"
        node = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    types = schema.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        py = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
              "boolean": bool, "null": type(None)}
        ok = any(isinstance(value, py[t]) and not (t in ("integer", "number")
                                                   and isinstance(value, bool)) for t in types)
        assert ok, f"{where}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(props)
            assert not extra, f"{where}: undocumented keys {extra}"
        for key, sub in props.items():
            if key in value:
                check_schema(value[key], sub, f"{where}.{key}", root)
        if isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                check_schema(item, schema["additionalProperties"], f"{where}.{key}", root)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{where}[{i}]", root)


def test_metrics_file_is_valid_prometheus_text(tmp_path, pebble):
    from prometheus_client.parser import text_string_to_metric_families

    metrics = tmp_path / "metrics" / "certbatch.prom"
    cfg = write_config(tmp_path, pebble, {"m": {"domains": ["metrics.example.com"]}},
                       metrics={"file": str(metrics)})
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 0, result.stderr
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    expiry = families["certbatch_certificate_expiry_timestamp_seconds"].samples
    assert expiry[0].labels == {"name": "m"} and expiry[0].value > time.time()
    assert families["certbatch_certificate_last_run_ok"].samples[0].value == 1
    assert families["certbatch_spool_pending_certificates"].samples[0].value == 0
    assert families["certbatch_run_exit_code"].samples[0].value == 0
    assert families["certbatch_run_duration_seconds"].samples[0].value > 0
    assert [p.name for p in metrics.parent.iterdir()] == ["certbatch.prom"]  # no temp files


@pytest.fixture
def restore_certbatch_logger():
    """cli.main configures the certbatch logger (handlers, no propagation): undo it after."""
    import logging

    logger = logging.getLogger("certbatch")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.propagate, logger.level = saved


def test_verbose_counts_before_and_after_the_command(tmp_path, restore_certbatch_logger):
    import logging

    cfg = simple_config(tmp_path)
    levels = {}
    for label, args in (("once", ["-v", "status"]), ("split", ["-v", "status", "-v"]),
                        ("together", ["-vv", "status"])):
        cli.main(args=[*args, "-c", str(cfg)], standalone_mode=False)
        stderr_handlers = [h for h in logging.getLogger("certbatch").handlers
                           if getattr(h, "stream", None) is not None
                           and not isinstance(h, logging.FileHandler)]
        levels[label] = min(h.level for h in stderr_handlers)
    assert levels == {"once": logging.INFO, "split": logging.DEBUG,
                      "together": logging.DEBUG}


def test_logger_level_follows_what_is_shown(tmp_path, restore_certbatch_logger):
    """Without -v or a log file, INFO/DEBUG records are not even built (a renewal makes dozens
    per certificate); with a log file, INFO; with -vv, DEBUG."""
    import logging

    cfg = simple_config(tmp_path)
    logger = logging.getLogger("certbatch")
    seen = {}
    for label, args in (("quiet", ["status"]), ("file", ["--log-file", str(tmp_path / "l"),
                                                         "status"]),
                        ("debug", ["-vv", "status"])):
        cli.main(args=[*args, "-c", str(cfg)], standalone_mode=False)
        seen[label] = (logger.level, logging.getLogger("acme").level)
    assert seen == {"quiet": (logging.WARNING, logging.WARNING),
                    "file": (logging.INFO, logging.WARNING),
                    "debug": (logging.DEBUG, logging.WARNING)}
