"""`fedcare audit report`: one self-contained HTML page (plus JSON) from a verification.

Everything shown comes from `verify.verify_path`; this module only lays it out. The
page has no scripts, fonts or external references, so it opens offline. Budgets are
shown per dataset, with the dataset's data versions (a changed data fingerprint is a
new version of the same dataset and spends from the same budget).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from typing import Sequence

from common.privacy.group import patient_reading, reading_text
from common.privacy.verify import (
    AUDIT_ORDERS, PLD_DISCRETIZATION, PRV_EPS_ERROR, EntryResult, SiteResult, VerifyReport,
    verify_path,
)

WIDTH, HEIGHT = 640, 280
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 16, 44
COLOURS = ("#1f5fa8", "#2a8a4a", "#8a4fa8", "#b8860b")


def format_epsilon(value: float | None) -> str:
    """How the report prints an ε: 4 decimals, '∞' when unbounded, '—' when unknown."""
    if value is None:
        return "—"
    return "∞" if math.isinf(value) else f"{value:.4f}"


def write_report(path: Path, out_html: Path, out_json: Path,
                 trusted_keys: Path | None = None, tolerance: float = 1e-2,
                 notes_per_patient: int | None = None) -> dict:
    """Verify `path`, write the HTML page and its JSON twin, and return the JSON facts.
    A run directory's empirical audit (audit/empirical.json) is shown next to the claims.
    `notes_per_patient`: the most notes of one patient, for reading record-level claims
    per patient (None: a table of group sizes)."""
    data = report_data(verify_path(Path(path), trusted_keys, tolerance), notes_per_patient)
    empirical = Path(path) / "audit" / "empirical.json"
    if empirical.is_file():
        data["empirical"] = json.loads(empirical.read_text())
    Path(out_html).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(data, indent=2, ensure_ascii=False,
                                         allow_nan=False) + "\n", encoding="utf-8")
    Path(out_html).write_text(render_html(data), encoding="utf-8")
    return data


def report_data(report: VerifyReport, notes_per_patient: int | None = None) -> dict:
    return {
        "path": report.path,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ok": report.ok,
        "tolerance": report.tolerance,
        "trusted_keys": report.trusted_keys,
        "verifier": {"dp_accounting": version("dp-accounting"),
                     "rdp_orders": f"{len(AUDIT_ORDERS)} orders from {AUDIT_ORDERS[0]:g} "
                                   f"to {AUDIT_ORDERS[-1]:g}",
                     "pld_discretization": PLD_DISCRETIZATION,
                     "prv_eps_error": PRV_EPS_ERROR},
        "notes_per_patient": notes_per_patient,
        "sites": [_site_data(site, notes_per_patient) for site in report.sites],
    }


def dataset_summaries(entries: Sequence[EntryResult]) -> list[dict]:
    """Per dataset, in order of first appearance: its budget (the latest entry's), ε
    spent (the latest claim) and left, δ, the unit its releases protect (record or
    patient, with k), the entry that started it (None: it started with its first
    release) and its data versions, each with its first and last seq."""
    out: dict[str, dict] = {}
    for e in entries:
        d = out.setdefault(e.dataset or e.data_fingerprint, {
            "dataset": e.dataset or e.data_fingerprint, "budget": None, "spent": 0.0,
            "left": None, "delta": None, "started": None, "versions": {},
            "unit": "record", "max_records_per_patient": None})
        if e.kind not in ("dataset", "refusal"):  # the unit its releases protect
            d["unit"], d["max_records_per_patient"] = e.privacy_unit, e.max_records_per_patient
        d["budget"] = e.epsilon_budget if e.epsilon_budget is not None else d["budget"]
        d["spent"] = e.epsilon_claimed if e.epsilon_claimed is not None else d["spent"]
        d["delta"] = e.delta if e.delta is not None else d["delta"]
        if e.kind == "dataset":
            d["started"] = {"seq": e.seq, "time": e.time, "reason": e.reason}
            continue
        version = d["versions"].setdefault(e.data_fingerprint, {
            "fingerprint": e.data_fingerprint, "version": len(d["versions"]) + 1,
            "first_seq": e.seq, "last_seq": e.seq})
        version["last_seq"] = e.seq
    for d in out.values():
        d["versions"] = list(d["versions"].values())
        if d["budget"] is not None:
            d["left"] = max(0.0, d["budget"] - d["spent"])
    return list(out.values())


def _site_data(site: SiteResult, notes_per_patient: int | None = None) -> dict:
    entries = [{k: ("inf" if isinstance(v, float) and math.isinf(v) else v)
                for k, v in dataclasses.asdict(e).items()} for e in site.entries]
    budgets = sorted({e.epsilon_budget for e in site.entries if e.epsilon_budget is not None})
    return {"site": site.site, "ledger": site.ledger, "status": site.status,
            "keys_pinned": site.keys_pinned, "key_fingerprints": list(site.key_fingerprints),
            "epsilon_budgets": budgets,
            "datasets": [_with_reading(d, notes_per_patient)
                         for d in dataset_summaries(site.entries)],
            "problems": [{"seq": p.seq, "message": p.message} for p in site.problems],
            "entries": entries, "approvals": [dataclasses.asdict(a) for a in site.approvals],
            "app_approval": site.app_approval}


def render_html(data: dict) -> str:
    e = html.escape
    overall = "all ledgers verified" if data["ok"] else "PROBLEMS FOUND"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fedcare privacy audit - {e(data['path'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Privacy audit: {e(overall)}</h1>",
        f"<p>Source: <code>{e(data['path'])}</code>. Generated {e(data['generated'])}. "
        f"Each claimed ε is re-derived with dp_accounting {e(data['verifier']['dp_accounting'])}"
        f" (RDP over {e(data['verifier']['rdp_orders'])}; PLD with discretisation "
        f"{data['verifier']['pld_discretization']:g}) over the releases on its dataset. An RDP "
        f"claim (opacus-rdp, or no accountant named) is a problem when more than "
        f"{data['tolerance']:.1%} below the re-derived RDP ε; a PRV or PLD claim when below the "
        f"re-derived PLD ε by more than PRV's stated error "
        f"({data['verifier'].get('prv_eps_error', PRV_EPS_ERROR):g}) plus PLD's own "
        f"discretisation error. Trusted keys: "
        f"{e(data['trusted_keys'] or 'none given (keys unpinned)')}.</p>",
    ]
    if data.get("empirical"):
        parts.append(_empirical_html(data["empirical"]))
    for site in data["sites"]:
        parts.append(_site_html(site))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _empirical_html(emp: dict) -> str:
    """The one-run lower bounds (fedcare audit empirical) beside the claimed ε."""
    e = html.escape
    control = f" (control: {emp['control']} off)" if emp.get("control") else ""
    rows = "".join(
        f"<tr><td>{e(kind)}</td><td>{k['epsilon']:.3f}</td><td>{k['correct']}/"
        f"{k['guesses']}</td><td>{_g(k['auc']) or '-'}</td>"
        f"<td>{'EXCEEDS THE CLAIM' if k['exceeds_claim'] else 'below the claim'}</td></tr>"
        for kind, k in emp["kinds"].items())
    return (f"<h2>Empirical audit: {e(emp['verdict'])}{e(control)}</h2>"
            f"<p>Canaries at {e(', '.join(emp['canary_sites']))}, each included with "
            f"probability ½ ({emp['canaries_per_kind']} of each kind); the view: "
            f"{e(emp['view'])}. Claimed ε = {emp['claimed_epsilon']:.3f} at δ = "
            f"{emp['delta']:g}; lower bounds at {emp['confidence']:.0%} confidence "
            f"(audit/canaries.json holds every score and guess).</p>"
            "<table><tr><th>canaries</th><th>ε lower bound</th><th>right / guesses</th>"
            f"<th>membership AUC</th><th></th></tr>{rows}</table>")


def _site_html(site: dict) -> str:
    e = html.escape
    status_class = "bad" if site["problems"] else ("warn" if not site["keys_pinned"] else "ok")
    keys = ("pinned to the trusted key" if site["keys_pinned"]
            else "unpinned (checked only against the key sent with the ledger)")
    budgets = ", ".join(format_epsilon(b) for b in site["epsilon_budgets"]) or "—"
    out = [f'<section><h2>Site {e(site["site"])} '
           f'<span class="{status_class}">{e(site["status"])}</span></h2>',
           f"<p>Ledger <code>{e(site['ledger'])}</code>; keys {keys}; "
           f"budget ε = {e(budgets)}.</p>",
           "<p>Key fingerprints: " + ", ".join(f"<code>{e(f)}</code>"
                                               for f in site["key_fingerprints"]) + "</p>"]
    if site.get("app_approval"):
        warn = ' class="warn"' if site["app_approval"].startswith("UNAPPROVED") else ""
        out.append(f"<p{warn}>Apps: {e(site['app_approval'])}.</p>")
    if site.get("approvals"):
        out.append("<p>Apps approved by the site (each release names the app it ran under):"
                   "</p><ul>" + "".join(
                       f"<li>seq {a['seq']}: {'approved' if a['approved'] else 'revoked'} "
                       f"<code>{e(str(a['app_sha256']))}</code> by {e(str(a['by']))} "
                       f"({e(str(a['time']))}): {e(str(a['reason']))}</li>"
                       for a in site["approvals"]) + "</ul>")
    if site["problems"]:
        out.append("<ul class='problems'>" + "".join(
            f"<li>{e(p['message'])}</li>" for p in site["problems"]) + "</ul>")
    else:
        out.append("<p>No problems found.</p>")
    out.append(_datasets_html(site))
    out.append(_svg(site))
    versions = {(d["dataset"], v["fingerprint"]): v["version"]
                for d in site.get("datasets", []) for v in d["versions"]}
    out.append("<table><tr><th>seq</th><th>round</th><th>kind</th><th>dataset</th>"
               "<th>data</th><th>σ</th><th>q</th><th>steps</th><th>C</th><th>δ</th>"
               "<th>unit</th><th>ε claimed</th><th>ε re-derived (RDP)</th><th>ε (PLD)</th><th>app</th>"
               "<th>note</th></tr>")
    for r in site["entries"]:
        dataset = r.get("dataset") or r["data_fingerprint"]
        version = versions.get((dataset, r["data_fingerprint"]))
        note = r.get("reason") or (f"update withheld: {r['withheld']}" if r.get("withheld")
                                   else None)
        if r.get("released_value") is not None:
            note = f"released size {r['released_value']:g}"
        cells = [r["seq"], r["round"], r["kind"], dataset,
                 None if version is None else f"v{version}", _g(r["noise_multiplier"]),
                 _g(r["sample_rate"]), r["steps"], _g(r["max_grad_norm"]), _g(r["delta"]),
                 _unit_cell(r), _eps(r["epsilon_claimed"]), _eps(r["epsilon_rdp"]), _eps(r["epsilon_pld"]),
                 r.get("app_sha256") and r["app_sha256"][:12], note]
        row_class = f" class='{r['kind']}'" if r["kind"] in ("refusal", "dataset") else ""
        out.append(f"<tr{row_class}>" + "".join(
            f"<td>{e('—' if c is None else str(c))}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    refusals = [r for r in site["entries"] if r["kind"] == "refusal"]
    if refusals:
        out.append("<h3>Refusals</h3><ul>" + "".join(
            f"<li>Round {e(str(r['round']))}: {e(r['reason'] or 'no reason given')}</li>"
            for r in refusals) + "</ul>")
    out.append("</section>")
    return "\n".join(out)


def _unit_cell(r: dict) -> str:
    if r["kind"] in ("dataset", "refusal") or r.get("privacy_unit") in (None, "record"):
        return "record" if r["kind"] not in ("dataset", "refusal") else "—"
    return f"patient (k={r.get('max_records_per_patient')})"


def _datasets_html(site: dict) -> str:
    """One paragraph per dataset: its budget, how it started, its data versions."""
    e, out = html.escape, []
    for d in site.get("datasets", []):
        started = d["started"]
        how = (f"Started at seq {started['seq']} by the site: "
               f"{e(started['reason'] or 'no reason given')}." if started
               else "Started with its first release.")
        versions = "; ".join(
            f"v{v['version']} <code>{e(v['fingerprint'])}</code> (seq {v['first_seq']}"
            + (f"–{v['last_seq']}" if v["last_seq"] != v["first_seq"] else "") + ")"
            for v in d["versions"]) or "none released yet"
        newer = (" A new data version spends from the same budget."
                 if len(d["versions"]) > 1 else "")
        reading = ("<br>Read for a patient (group privacy): " + e(reading_text(
            d["patient_reading"], len(d["patient_reading"]) == 1)) + "."
            if d.get("patient_reading") else "")
        out.append(f"<p class='dataset'>Dataset <code>{e(d['dataset'])}</code> "
                   f"({e(unit_text(d))}): budget ε = "
                   f"{e(format_epsilon(d['budget']))}, spent ε = {e(format_epsilon(d['spent']))}"
                   f", left ε = {e(format_epsilon(d['left']))}, δ = {_g(d['delta']) or '—'}. "
                   f"{how} Data versions: {versions}.{newer}{reading}</p>")
    return "\n".join(out)


def _svg(site: dict) -> str:
    """Cumulative ε per round: a polyline per dataset, budget dashed."""
    rows = [{**r, "dataset": r.get("dataset") or r["data_fingerprint"]}
            for r in site["entries"] if r["round"] is not None and r["kind"] != "dataset"
            and isinstance(r["epsilon_claimed"], (int, float))]
    if not rows:
        return "<p>No readable entries to plot.</p>"
    rounds = [r["round"] for r in rows]
    x_lo, x_hi = min(rounds), max(rounds)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_hi = max([r["epsilon_claimed"] for r in rows] + site["epsilon_budgets"]) * 1.1 or 1.0
    px = lambda x: LEFT + (x - x_lo) / (x_hi - x_lo) * (WIDTH - LEFT - RIGHT)  # noqa: E731
    py = lambda y: HEIGHT - BOTTOM - y / y_hi * (HEIGHT - TOP - BOTTOM)  # noqa: E731
    out = [f'<svg width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="cumulative epsilon per round">',
           f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" '
           'stroke="#333"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" stroke="#333"/>']
    for t in _ticks(0.0, y_hi):
        out.append(f'<line x1="{LEFT - 4}" y1="{py(t):.1f}" x2="{LEFT}" y2="{py(t):.1f}" '
                   f'stroke="#333"/><text x="{LEFT - 6}" y="{py(t) + 4:.1f}" '
                   f'text-anchor="end">{t:g}</text>')
    for t in _ticks(x_lo, x_hi, integer=True):
        out.append(f'<line x1="{px(t):.1f}" y1="{HEIGHT - BOTTOM}" x2="{px(t):.1f}" '
                   f'y2="{HEIGHT - BOTTOM + 4}" stroke="#333"/><text x="{px(t):.1f}" '
                   f'y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" '
               'text-anchor="middle">round</text><text x="14" y="{:.1f}" '
               'transform="rotate(-90 14 {:.1f})" text-anchor="middle">cumulative ε</text>'
               .format((TOP + HEIGHT - BOTTOM) / 2, (TOP + HEIGHT - BOTTOM) / 2))
    for budget in site["epsilon_budgets"]:
        out.append(f'<line x1="{LEFT}" y1="{py(budget):.1f}" x2="{WIDTH - RIGHT}" '
                   f'y2="{py(budget):.1f}" stroke="#c0392b" stroke-dasharray="6 4"/>'
                   f'<text x="{WIDTH - RIGHT}" y="{py(budget) - 4:.1f}" text-anchor="end" '
                   f'fill="#c0392b">budget ε = {html.escape(format_epsilon(budget))}</text>')
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for i, name in enumerate(datasets):
        colour = COLOURS[i % len(COLOURS)]
        series = [r for r in rows if r["dataset"] == name]
        points = " ".join(f"{px(r['round']):.1f},{py(r['epsilon_claimed']):.1f}" for r in series)
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for r in series:
            x, y = px(r["round"]), py(r["epsilon_claimed"])
            tip = html.escape(f"round {r['round']} ({r['kind']}): ε = "
                              f"{format_epsilon(r['epsilon_claimed'])}, dataset {name}")
            if r["kind"] == "refusal":
                out.append(f'<path d="M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}'
                           f'M{x - 5:.1f},{y + 5:.1f}L{x + 5:.1f},{y - 5:.1f}" stroke="#c0392b" '
                           f'stroke-width="2"><title>refused: {tip}</title></path>')
            else:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}">'
                           f'<title>{tip}</title></circle>')
    out.append("</svg>")
    legend = "; ".join(f'<span style="color:{COLOURS[i % len(COLOURS)]}">●</span> dataset '
                       f"<code>{html.escape(name)}</code>" for i, name in enumerate(datasets))
    return "\n".join(out) + f"<p class='legend'>{legend}; × refusal; dashed: budget.</p>"


def _ticks(lo: float, hi: float, integer: bool = False) -> list[float]:
    span = (hi - lo) or 1.0
    raw = span / 5
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _g(value) -> str | None:
    return None if value is None else f"{value:g}"


def _eps(value) -> str:
    return format_epsilon(math.inf if value == "inf" else value)


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:60em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
        "padding:2px 8px;text-align:right}tr.refusal{background:#fbeaea}"
        "tr.dataset{background:#eaf1fb}"
        ".ok{color:#2a8a4a}.warn{color:#b8860b}.bad{color:#c0392b}"
        "ul.problems li{color:#c0392b}svg text{font-size:11px}code{font-size:90%}")


def _with_reading(d: dict, notes: int | None) -> dict:
    """A record-level dataset's claim read for a patient (group privacy)."""
    reading = patient_reading(d["spent"], d["delta"], notes) \
        if d["unit"] == "record" and d["spent"] and d["delta"] else []
    return {**d, "patient_reading": reading}


def unit_text(d: dict) -> str:
    """How a dataset's ε reads: 'ε per patient (at most k=4 notes a step)' or per record."""
    if d["unit"] == "patient":
        return (f"ε per patient, with all of their notes (each patient brings at most "
                f"k={d['max_records_per_patient']} notes to a step)")
    return "ε per record (one note; a patient with several notes is protected as a group)"
