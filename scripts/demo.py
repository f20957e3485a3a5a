"""The demo: a local Pebble CA, three certificates, one batch, one notify hook.

Run by scripts/demo.sh after set-up. Everything lives in ./demo (state, spool, hooks, config) and
Pebble runs on free loopback ports for the duration of the demo only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pebble_server import start_pebble  # noqa: E402 - the same harness the tests use

DEMO = ROOT / "demo"
CERTBATCH = [sys.executable, "-m", "certbatch"]

NOTIFY_HOOK = """#!/bin/sh
# Demo notify hook: where nginx would be reloaded once, print the batch instead.
echo "notify hook: applying $CERTBATCH_COUNT certificates: $CERTBATCH_NAMES" >> "$DEMO_LOG"
"""


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def run(*args: str, env: dict[str, str]) -> int:
    print("$ certbatch " + " ".join(args), flush=True)
    return subprocess.run([*CERTBATCH, *args], env=env, cwd=DEMO).returncode


def main() -> int:
    shutil.rmtree(DEMO, ignore_errors=True)
    (DEMO / "hooks" / "notify.d").mkdir(parents=True)
    (DEMO / "hooks" / "deploy.d").mkdir(parents=True)
    (DEMO / "hooks" / "dns").mkdir(parents=True)
    shutil.copy(ROOT / "hooks" / "dns" / "challtestsrv.sh", DEMO / "hooks" / "dns")
    shutil.copy(ROOT / "hooks" / "deploy.d" / "combined-pem", DEMO / "hooks" / "deploy.d")
    hook = DEMO / "hooks" / "notify.d" / "50-demo"
    hook.write_text(NOTIFY_HOOK)
    hook.chmod(0o755)

    step("starting a local Pebble ACME server and its mock DNS (pebble-challtestsrv)")
    pebble = start_pebble(DEMO / "pebble")
    try:
        config = (ROOT / "examples" / "demo.yaml").read_text()
        config = config.replace("https://127.0.0.1:14000/dir", pebble.directory_url)
        config = config.replace("port: 5002", f"port: {pebble.http_port}")
        shutil.copy(pebble.ca_bundle, DEMO / "pebble-ca.pem")
        (DEMO / "certbatch.yaml").write_text(config)
        print(f"Pebble: {pebble.directory_url}   config: {DEMO / 'certbatch.yaml'}")

        env = dict(os.environ, **pebble.env(), DEMO_LOG=str(DEMO / "notify.log"))
        env.pop("CERTBATCH_CONFIG", None)
        step("what would happen (no network, no writes)")
        run("renew", "--dry-run", env=env)
        step("first run: three certificates issued in parallel, staged, applied in one batch")
        rc = run("renew", env=env)
        print((DEMO / "notify.log").read_text() if (DEMO / "notify.log").exists() else
              "(the notify hook did not run)")
        step("second run from cron: nothing due, so nothing printed and exit code 0")
        rc2 = subprocess.run([*CERTBATCH, "renew"], env=env, cwd=DEMO, capture_output=True,
                             text=True)
        print(f"$ certbatch renew   -> exit {rc2.returncode}, "
              f"{len(rc2.stdout) + len(rc2.stderr)} bytes of output")
        step("status")
        run("status", env=env)
        step("the staged batch that the notify hook applied")
        for batch in sorted((DEMO / "spool" / "applied").iterdir()):
            print(f"{batch}: {' '.join(sorted(p.name for p in batch.iterdir()))}")
        print("\nEverything is in ./demo: certbatch.yaml, state/, spool/, hooks/. "
              "Pebble stops now; run the demo again to start over.")
        return rc or rc2.returncode
    finally:
        pebble.stop()


if __name__ == "__main__":
    sys.exit(main())
