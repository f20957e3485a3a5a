"""The cache of large validated configs (config_cache.py): used only for the very file it was
made from, only from a folder of certbatch's user's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from certbatch import config, config_cache
from certbatch.errors import ConfigError


def big_config(folder: Path, n: int = config_cache.CACHE_FROM, extra: str = "") -> Path:
    path = folder / "certbatch.yaml"
    path.write_text("acme: {directory: https://ca.example/dir}\n" + extra
                    + "defaults: {challenge: {type: http-01, standalone: {}}}\ncertificates:\n"
                    + "".join(f"  c{i}: {{domains: [c{i}.example.com]}}\n" for i in range(n)))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CERTBATCH_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every real parse of a config file."""
    calls: list[Path] = []
    real = config_cache.load

    def counting(path: Path | str) -> config.Settings:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(config_cache, "load", counting)
    return calls


def test_a_large_config_is_parsed_once_until_it_changes(tmp_path, cache, loads):
    path = big_config(tmp_path)
    first = config_cache.load_cached(path)
    assert len(loads) == 1 and len(list(cache.iterdir())) == 1
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
    assert oct(next(cache.iterdir()).stat().st_mode & 0o777) == "0o600"
    assert config_cache.load_cached(path) == first and len(loads) == 1  # from the cache
    # any change of the file (even to the same size, in the same clock tick) means a real parse
    stat = path.stat()
    path.write_text(path.read_text().replace("c0.example.com", "x0.example.com"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = config_cache.load_cached(path)
    assert len(loads) == 2 and changed.certificates["c0"].domains == ("x0.example.com",)


def test_small_configs_are_not_cached(tmp_path, cache, loads):
    path = big_config(tmp_path, n=3)
    config_cache.load_cached(path)
    config_cache.load_cached(path)
    assert len(loads) == 2 and not cache.exists()


def test_a_cache_anyone_else_could_write_is_not_read(tmp_path, cache, loads):
    path = big_config(tmp_path)
    config_cache.load_cached(path)
    entry = next(cache.iterdir())
    entry.chmod(0o666)  # another user could have put anything there: pickle runs code
    config_cache.load_cached(path)
    assert len(loads) == 2
    assert oct(entry.stat().st_mode & 0o777) == "0o600"  # written again, privately
    cache.chmod(0o777)
    config_cache.load_cached(path)
    assert len(loads) == 3


def test_commands_that_write_nothing_never_write_the_cache(tmp_path, cache, loads):
    path = big_config(tmp_path)
    config_cache.load_cached(path, write=False)
    assert not cache.exists()  # status, check and dry runs: no writes at all
    config_cache.load_cached(path)
    config_cache.load_cached(path, write=False)
    assert len(loads) == 2  # ... but they read it


def test_a_spool_that_became_the_state_folder_is_refused_even_from_the_cache(tmp_path, cache,
                                                                                loads):
    (tmp_path / "state").mkdir()
    path = big_config(tmp_path, extra="paths: {state: ./state, spool: ./spool}\n")
    config_cache.load_cached(path)
    (tmp_path / "spool").symlink_to("state")  # one folder: the two locks would be one
    with pytest.raises(ConfigError, match="paths.spool"):
        config_cache.load_cached(path)


def test_the_ca_bundle_is_checked_even_from_the_cache(tmp_path, cache, loads):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    path = big_config(tmp_path, extra="paths: {state: ./s}\n")
    path.write_text(path.read_text().replace(
        "acme: {directory: https://ca.example/dir}",
        f"acme: {{directory: https://ca.example/dir, ca_bundle: {bundle}}}"))
    config_cache.load_cached(path)
    bundle.unlink()
    with pytest.raises(ConfigError, match="ca_bundle"):
        config_cache.load_cached(path)
