"""The README's nginx quick start works as written: its `certbatch init` line, and its port-80
server block serving what certbatch's webroot solver writes (a real nginx; skipped without one).
"""

from __future__ import annotations

import http.client
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import REPO, run
from nginx_server import NGINX_BIN, free_port

from certbatch import config
from certbatch.challenges import ChallengeResponse, WebrootSolver

README = REPO / "README.md"


def quick_start() -> str:
    text = README.read_text()
    start = text.index("## Quick start: nginx")
    return text[start:text.index("\n## ", start + 1)]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", quick_start(), re.M | re.S)


def test_the_init_line_of_the_quick_start(tmp_path: Path) -> None:
    (line,) = [b for b in blocks("sh") if "certbatch init" in b]
    argv = shlex.split(line[line.index("certbatch init"):].replace("\\\n", " "))
    webroot = tmp_path / "acme"
    webroot.mkdir()
    argv = [str(webroot) if a == "/var/www/acme" else a for a in argv[1:]]
    cfg = tmp_path / "certbatch.yaml"
    done = run(argv, cfg)
    assert done.returncode == 0, done.stderr
    (cert,) = config.load(cfg).certificates.values()
    assert cert.domains == ("example.com", "www.example.com")
    assert cert.challenge.webroot == webroot
    assert run(["check"], cfg).returncode == 0


@pytest.mark.skipif(not os.access(NGINX_BIN, os.X_OK), reason=f"no nginx at {NGINX_BIN}")
def test_the_port_80_server_block_serves_the_challenge_files(tmp_path: Path) -> None:
    (server,) = [b for b in blocks("nginx") if "acme-challenge" in b]
    webroot, work = tmp_path / "acme", tmp_path / "nginx"
    (work / "tmp").mkdir(parents=True)
    port = free_port()
    server = server.replace("listen [::]:80;", "").replace("listen 80;",
                                                           f"listen 127.0.0.1:{port};")
    server = server.replace("/var/www/acme", str(webroot))
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "".join(f"    {kind}_temp_path {work / 'tmp' / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = work / "nginx.conf"
    conf.write_text(f"{user}daemon on;\nworker_processes 1;\npid {work / 'nginx.pid'};\n"
                    f"error_log {work / 'error.log'};\nevents {{}}\nhttp {{\n"
                    f"    access_log off;\n{temp}{server}}}\n")
    webroot.mkdir()
    started = subprocess.run([NGINX_BIN, "-c", str(conf), "-e", str(work / "error.log")],
                             capture_output=True, text=True, timeout=20)
    assert started.returncode == 0, started.stderr
    try:
        solver = WebrootSolver(webroot, "www")
        token = "quick-start_token-0123456789"
        solver.prepare([ChallengeResponse("http-01", "example.com", token, f"{token}.thumb")],
                       deadline=time.monotonic() + 30)

        def get(path: str) -> tuple[int, str, str | None]:
            for _ in range(50):  # nginx daemonizes before it listens
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", path, headers={"Host": "example.com"})
                    resp = conn.getresponse()
                    return resp.status, resp.read().decode(), resp.getheader("Location")
                except ConnectionRefusedError:
                    time.sleep(0.1)
            raise AssertionError("nginx does not answer")

        assert get(f"/.well-known/acme-challenge/{token}")[:2] == (200, f"{token}.thumb")
        assert get("/.well-known/acme-challenge/missing")[0] == 404
        assert get("/shop")[0::2] == (301, "https://example.com/shop")
        solver.cleanup()
        assert get(f"/.well-known/acme-challenge/{token}")[0] == 404
    finally:
        subprocess.run([NGINX_BIN, "-c", str(conf), "-e", str(work / "error.log"), "-s", "stop"],
                       capture_output=True, timeout=20)
