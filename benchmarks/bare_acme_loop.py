"""The lower bound for bench_renew.py: a bare parallel ACME loop written directly on `acme`.

    python benchmarks/bare_acme_loop.py --directory URL --ca-bundle PEM --challtestsrv URL \
        --count N --workers W [--prefix b] [--out result.json]

Orders the same two-name certificates as the benchmark's certbatch config (`<prefix><i>` for
``<prefix><i>.example.com`` and ``www.<prefix><i>.example.com``), with everything certbatch adds
left out: no config, no state folder, no hooks as processes, no retries, no checks of the
result. One account is registered and shared; each worker thread has its own ClientNetwork
(acme's is not thread-safe), a new EC P-256 key per certificate (certbatch's default),
dns-01 TXT records set directly through challtestsrv's management API, and polls every
POLL seconds instead of acme's 1 s sleeps. Prints (or writes to --out) a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import josepy as jose
import requests
from acme import challenges, crypto_util, messages
from acme.client import ClientNetwork, ClientV2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

POLL = 0.05  # seconds between polls: Pebble with PEBBLE_VA_NOSLEEP answers within a few ms
POLL_LIMIT = 60.0  # seconds before one certificate is given up


def _new_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class BareLoop:
    def __init__(self, directory_url: str, ca_bundle: str, challtestsrv: str,
                 dns_script: str | None = None, per_certificate: bool = False) -> None:
        self.dns_script = dns_script  # None: set TXT records in-process over HTTP
        self.per_certificate = per_certificate  # one script run per certificate and action
        self.directory_url = directory_url
        self.ca_bundle = ca_bundle
        self.challtestsrv = challtestsrv.rstrip("/")
        self.key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        self.directory: messages.Directory | None = None
        self.regr: messages.RegistrationResource | None = None
        self._local = threading.local()

    def _net(self, account: messages.RegistrationResource | None) -> ClientNetwork:
        # requests takes a CA bundle path for verify; acme only declares bool.
        verify: Any = self.ca_bundle
        return ClientNetwork(key=self.key, alg=jose.ES256, account=account, verify_ssl=verify,
                             user_agent="certbatch-bench-bare-loop")

    def register(self) -> None:
        """Fetch the directory and register the one account every worker shares."""
        net = self._net(None)
        self.directory = ClientV2.get_directory(self.directory_url, net)
        client = ClientV2(self.directory, net)
        self.regr = client.new_account(messages.NewRegistration.from_data(
            email="bench@example.com", terms_of_service_agreed=True))

    def _client(self) -> tuple[ClientV2, requests.Session]:
        """This thread's ACME client and challtestsrv session, kept for all its certificates."""
        if not hasattr(self._local, "client"):
            assert self.directory is not None
            self._local.client = ClientV2(self.directory, self._net(self.regr))
            self._local.dns = requests.Session()
        return self._local.client, self._local.dns

    def issue(self, domains: list[str]) -> float:
        """Order, validate, finalize and download one certificate; returns its duration."""
        t0 = time.perf_counter()
        client, dns = self._client()
        csr_pem = crypto_util.make_csr(_new_key_pem(), domains)
        order = client.new_order(csr_pem)
        todo = []
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue
            challb = next(c for c in authzr.body.challenges
                          if isinstance(c.chall, challenges.DNS01))
            record = f"_acme-challenge.{authzr.body.identifier.value}."
            value = challb.chall.validation(self.key)
            if not self.dns_script:  # (the script runs below, once all records are known)
                dns.post(f"{self.challtestsrv}/set-txt", timeout=10, json={
                    "host": record, "value": value}).raise_for_status()
            todo.append((authzr, challb, record, value))
        records = [(a.body.identifier.value, r, v) for a, _, r, v in todo]
        if self.dns_script:
            self._script("add", records)
        for _, challb, _, _ in todo:
            client.answer_challenge(challb, challb.chall.response(self.key))
        for authzr, _, _, _ in todo:
            self._poll_authz(client, authzr)
        if self.dns_script:
            self._script("remove", records)
        else:
            for _, _, record, _ in todo:
                dns.post(f"{self.challtestsrv}/clear-txt", json={"host": record},
                         timeout=10).raise_for_status()
        order = client.begin_finalization(order)
        deadline = time.monotonic() + POLL_LIMIT
        body = order.body
        while body.status != messages.STATUS_VALID:
            if body.status == messages.STATUS_INVALID or time.monotonic() > deadline:
                raise RuntimeError(f"order for {domains[0]} is {body.status}")
            time.sleep(POLL)
            body = messages.Order.from_json(client._post_as_get(order.uri).json())
        pem = client._post_as_get(body.certificate).text
        if "BEGIN CERTIFICATE" not in pem:
            raise RuntimeError(f"no certificate downloaded for {domains[0]}")
        return time.perf_counter() - t0

    def _script(self, action: str, records: list[tuple[str, str, str]]) -> None:
        """certbatch's dns-01 script contract: a process per record and action, or per
        certificate and action with every record's triple in argv."""
        assert self.dns_script is not None
        env = dict(os.environ, CERTBATCH_CHALLTESTSRV_URL=self.challtestsrv)
        calls = [records] if self.per_certificate else [[r] for r in records]
        for call in calls:
            subprocess.run([self.dns_script, action, *(f for r in call for f in r)], env=env,
                           check=True, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=60)

    @staticmethod
    def _poll_authz(client: ClientV2, authzr: messages.AuthorizationResource) -> None:
        deadline = time.monotonic() + POLL_LIMIT
        while True:
            authzr, _ = client.poll(authzr)
            status = authzr.body.status
            if status == messages.STATUS_VALID:
                return
            if status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING) \
                    or time.monotonic() > deadline:
                raise RuntimeError(f"authorization {authzr.uri} is {status}")
            time.sleep(POLL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", required=True)
    parser.add_argument("--ca-bundle", required=True)
    parser.add_argument("--challtestsrv", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--prefix", default="b")
    parser.add_argument("--out", help="write the JSON summary here instead of stdout")
    parser.add_argument("--dns-script", help="set TXT records through this dns-01 script "
                        "(certbatch's contract) instead of in-process HTTP calls")
    parser.add_argument("--dns-calls", choices=("per-record", "per-certificate"),
                        default="per-record", help="with --dns-script: one run per record "
                        "and action, or per certificate and action")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    loop = BareLoop(args.directory, args.ca_bundle, args.challtestsrv, args.dns_script,
                    args.dns_calls == "per-certificate")
    loop.register()
    t_account = time.perf_counter() - t0
    names = [f"{args.prefix}{i}" for i in range(args.count)]
    failures: list[str] = []

    def one(name: str) -> float:
        try:
            return loop.issue([f"{name}.example.com", f"www.{name}.example.com"])
        except Exception as exc:  # noqa: BLE001 - count it, keep the others going
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            return 0.0

    t1 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        durations = list(pool.map(one, names))
    t_loop = time.perf_counter() - t1
    summary = {"count": args.count, "workers": args.workers, "issued": args.count - len(failures),
               "failures": failures[:5], "account_seconds": round(t_account, 3),
               "loop_seconds": round(t_loop, 3),
               "mean_cert_seconds": round(sum(durations) / max(len(durations), 1), 3)}
    text = json.dumps(summary)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
