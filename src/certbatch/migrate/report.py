"""An import plan (and what was done) as the lines the command prints."""

from __future__ import annotations

from typing import Any

from .apply import Applied
from .plan import ADOPT, DONE, ENTRY_ONLY, IMPORT, SKIP, LineagePlan, Plan

_VERB = {IMPORT: "import", ADOPT: "import", ENTRY_ONLY: "entry", DONE: "done", SKIP: "SKIP"}


def plan_lines(plan: Plan, dry_run: bool) -> list[str]:
    n = len(plan.lineages)
    lines = [f"certbot folder: {plan.source} ({n} lineage{'s' * (n != 1)} selected)",
             f"config: {plan.config_path} ({'exists' if plan.config_exists else 'new'})",
             f"state: {plan.state}",
             f"CA: {plan.directory or 'none chosen'}"]
    if plan.account is not None:
        a = plan.account
        what = {"import": f"{'would become' if dry_run else 'becomes'} certbatch's account "
                          f"for this CA",
                "present": "certbatch's account already",
                "kept": "not imported"}[a.action]
        lines.append(f"account: {a.account.uri} (certbot account {a.account.id}): {what}"
                     + (f"; {a.why}" if a.why else ""))
    for lp in plan.lineages:
        lines.extend(_lineage_lines(lp))
    if plan.hooks or any(lp.mapped.hooks for lp in plan.lineages if lp.action != SKIP):
        lines.append("certbot hooks (certbatch never copies or runs them; where they belong):")
        for lp in plan.lineages:
            if lp.action != SKIP:
                lines.extend(f"  {lp.name}: {h}" for h in lp.mapped.hooks)
        lines.extend(f"  {h}" for h in plan.hooks)
    for f in plan.new_files:
        lines.append(f"{'would write' if dry_run else 'writes'} {f.path} (mode {f.mode:04o}): "
                     f"{f.what}")
    return lines


def _lineage_lines(lp: LineagePlan) -> list[str]:
    label = lp.name if lp.name == lp.lineage else f"{lp.name} (lineage {lp.lineage})"
    if lp.action == SKIP:
        return [f"  SKIP    {label}: {lp.why}"]
    how = _challenge(lp.entry().get("challenge"))
    line = (f"  {_VERB[lp.action]:<7} {label}: {' '.join(lp.domains)} [{lp.key_type}"
            f"{', ' + how if how else ''}] serial {lp.serial}, expires "
            f"{lp.not_after:%Y-%m-%d}")
    if lp.replaces:
        line += ", replacing the existing one"
    if lp.why:
        line += f" ({lp.why})"
    return [line] + [f"      note: {n}" for n in lp.mapped.notes]


def _challenge(ch: Any) -> str:
    if not isinstance(ch, dict):
        return ""
    if ch.get("webroot_map"):
        return "http-01 webroot_map " + " ".join(f"{d}={r}" for d, r in ch["webroot_map"].items())
    if ch.get("webroot"):
        return f"http-01 webroot {ch['webroot']}"
    if "standalone" in ch:
        s = ch["standalone"]
        return f"http-01 standalone {s.get('address', '0.0.0.0')}:{s.get('port', 80)}"
    if ch.get("provider"):
        return f"dns-01 {ch['provider']} {ch.get('server', '')}".rstrip()
    return f"dns-01 script {ch.get('script')}"


def done_lines(plan: Plan, done: Applied) -> list[str]:
    lines = []
    if done.account:
        lines.append(f"imported account {done.account}")
    if done.certificates:
        lines.append(f"imported {len(done.certificates)} certificate"
                     f"{'s' * (len(done.certificates) != 1)} into {plan.state}: "
                     f"{' '.join(done.certificates)}")
        lines.append("they count as staged: the next `certbatch renew` has nothing to do for "
                     "them until they are due; to hand them to a notify target now, run "
                     "`certbatch run-hook --target NAME --all`")
    if done.config_written:
        lines.append(f"wrote {plan.config_path}; check it with `certbatch check` and "
                     f"`certbatch status`, then disable certbot's timer")
    if not (done.certificates or done.config_written or done.account):
        lines.append("nothing to import")
    return lines


def skipped_line(plan: Plan) -> str | None:
    skipped = plan.skipped
    if not skipped:
        return None
    return (f"{len(skipped)} of {len(plan.lineages)} lineages not imported: "
            f"{' '.join(lp.lineage for lp in skipped)}")
