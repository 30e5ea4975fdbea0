"""The audit report: one offline HTML file (inline SVG) and a JSON twin with the same facts."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

from common.privacy.audit_cli import main
from common.privacy.ledger import read_entries
from common.privacy.report import format_epsilon, write_report
from common.privacy.signing import load_or_create_site_key, public_key_pem
from common.privacy.verify import verify_path
from tests.test_ledger import ROUNDS, build_ledger, fields, gaussian, start
from tests.test_verify import make_run, reseal, write


def test_html_shows_every_epsilon_and_the_budget(tmp_path):
    run, _ = make_run(tmp_path)
    data = write_report(run, tmp_path / "r.html", tmp_path / "r.json")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    for site in ("hospital_a", "hospital_b"):
        for entry in read_entries(run / "ledgers" / f"{site}.jsonl"):
            assert f"<td>{format_epsilon(entry['epsilon'])}</td>" in page
            assert f"ε = {format_epsilon(entry['epsilon'])}" in page  # point tooltip in the plot
    assert "budget ε = 8.0000" in page
    assert "the next round would exceed the remaining budget" in page  # refusal reason
    assert page.count("verified (keys unpinned)") == 2
    assert data["ok"] and [s["status"] for s in data["sites"]] == ["verified (keys unpinned)"] * 2


def test_html_is_self_contained(tmp_path):
    run, _ = make_run(tmp_path)
    write_report(run, tmp_path / "r.html", tmp_path / "r.json")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert not re.search(r"https?://", page)
    for outside in ("<script", "<link", "src=", "@import", "url(", "<iframe"):
        assert outside not in page
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["r.html", "r.json"]


def test_svg_plot_is_well_formed_with_budget_line_and_refusal(tmp_path):
    run, _ = make_run(tmp_path)
    write_report(run, tmp_path / "r.html", tmp_path / "r.json")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 2
    plot = ET.fromstring(svgs[0])
    polyline = plot.find("polyline")
    assert len(polyline.get("points").split()) == len(ROUNDS)
    dashed = [el for el in plot.iter("line") if el.get("stroke-dasharray")]
    assert len(dashed) == 1
    refusals = [el for el in plot.iter("path") if el.find("title").text.startswith("refused")]
    assert len(refusals) == ROUNDS.count(None)
    ticks = [el.text for el in plot.iter("text")]
    assert "round" in ticks and "0" in ticks and "1" in ticks and str(len(ROUNDS)) in ticks


def test_json_carries_the_verifiers_findings(tmp_path):
    run, keys = make_run(tmp_path)
    path = run / "ledgers" / "hospital_b.jsonl"
    path.write_text(path.read_text().replace('"steps":30', '"steps":3'))
    data = write_report(run, tmp_path / "r.html", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == data
    verified = verify_path(run)
    site_b = data["sites"][1]
    assert site_b["status"] == "problems" and not data["ok"]
    assert [p["message"] for p in site_b["problems"]] == [p.message for p in verified.problems]
    claimed = [e["epsilon_claimed"] for e in site_b["entries"]]
    assert claimed == [e["epsilon"] for e in read_entries(path)]
    assert all(e["epsilon_rdp"] is not None for e in site_b["entries"])
    assert site_b["key_fingerprints"] == [read_entries(path)[0]["key_fingerprint"]]
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "changed after it was written" in page


def test_strings_from_the_ledger_are_escaped(tmp_path):
    key = load_or_create_site_key(tmp_path / "keys")
    site = '<img src=x onerror="alert(1)">'
    ledger = tmp_path / "odd.jsonl"
    build_ledger(ledger, key, site=site)
    (tmp_path / "odd.pub.pem").write_text(public_key_pem(key.public_key()))
    write_report(ledger, tmp_path / "r.html", tmp_path / "r.json")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<img" not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page


def test_cli_report_writes_beside_the_run(tmp_path, capsys):
    run, _ = make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(run / "audit_report.html"),
                                                    str(run / "audit_report.json")]
    assert json.loads((run / "audit_report.json").read_text())["ok"] is True
    assert main(["report", str(run), "--output", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").exists() and (tmp_path / "x.json").exists()


def test_datasets_versions_starts_and_gaussian_releases_are_shown(tmp_path):
    run, keys = make_run(tmp_path)
    path = run / "ledgers" / "hospital_a.jsonl"
    entries = [{**e, "dataset": "notes", "data_fingerprint": "sha256:v1" if e["seq"] < 3
                else "sha256:v2"} for e in read_entries(path)][:4]
    history = [r for r in ROUNDS[:4] if r is not None]
    entries += [{**gaussian("size", 4, history), "dataset": "notes",
                 "data_fingerprint": "sha256:v2"},
                start("ward-b", reason="the oncology ward joins"),
                {**fields("hospital_a", 5, [], ROUNDS[0], 4.0), "dataset": "ward-b"}]
    write(path, reseal(entries, keys["hospital_a"]))
    data = write_report(run, tmp_path / "r.html", tmp_path / "r.json")
    assert data["ok"]
    notes, ward = data["sites"][0]["datasets"]
    assert [(v["fingerprint"], v["first_seq"], v["last_seq"]) for v in notes["versions"]] == [
        ("sha256:v1", 0, 2), ("sha256:v2", 3, 4)]
    assert notes["spent"] == entries[4]["epsilon"] and notes["started"] is None
    assert ward["started"]["reason"] == "the oncology ward joins"
    assert (ward["budget"], ward["versions"][0]["first_seq"]) == (4.0, 6)
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Started at seq 5 by the site: the oncology ward joins." in page
    assert "v2 <code>sha256:v2</code> (seq 3–4)" in page
    assert "A new data version spends from the same budget." in page
    assert "<td>size</td><td>notes</td><td>v2</td>" in page
    assert "<td>released size 812.4</td>" in page
    plot = ET.fromstring(re.findall(r"<svg.*?</svg>", page, flags=re.S)[0])
    assert len(plot.findall("polyline")) == 2  # one per dataset, not per data version


def test_the_page_states_the_rule_each_accountant_is_held_to(tmp_path):
    run, _ = make_run(tmp_path)
    write_report(run, tmp_path / "r.html", tmp_path / "r.json")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "more than 1.0% below the re-derived RDP ε" in page
    assert "below the re-derived PLD ε by more than PRV's stated error (0.01)" in page
