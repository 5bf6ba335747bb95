"""The HTML leaderboard page: self-contained, escaped, one sortable table and the plots per board.

The browser test loads a page in headless Chromium through chromedriver's W3C WebDriver HTTP API (the
standard library's urllib, no client package): no console errors, a click on a header sorts the rows,
and a screenshot (copied to docs/img/leaderboard-screenshot.png, the README's picture, only with
HARNESS_UPDATE_SCREENSHOT=1: a test run leaves the tree as it was).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from typing import Any

import pytest
from test_leaderboard import ev, purify

from backdoor_harness.leaderboard.html import page
from backdoor_harness.leaderboard.render import boards, render
from backdoor_harness.store import Cell, JobRecord, PluginInfo

from helpers import ROOT

SCREENSHOT = ROOT / "docs" / "img" / "leaderboard-screenshot.png"
T = [0.0, 0.25, 0.5, 0.75, 1.0]


def lmc(defense: str, attack: str, asr: list[float], seed: int = 0, deps=()) -> JobRecord:
    """An LMC evaluation: the ASR curve along t and its escape point."""
    return ev(defense, attack, seed, {"lmc_t": T, "lmc_asr": asr, "lmc_escape_t": asr.index(min(asr)) / 4},
              evaluator="lmc", deps=deps)


def records() -> list[JobRecord]:
    """Two attacks, four defenses with C-Acc, O-ASR and P-ASR, a failed cell, costs, LMC curves; a 5% board."""
    cells = {  # (defense, attack): (C-Acc, O-ASR, P-ASR)
        ("none", "badnets"): (0.93, 0.97, 0.98), ("none", "blended"): (0.94, 0.99, 0.99),
        ("ep", "badnets"): (0.90, 0.02, 0.85), ("ep", "blended"): (0.91, 0.04, 0.70),
        ("ft", "badnets"): (0.88, 0.12, 0.95), ("ft", "blended"): (0.89, 0.30, 0.97),
        ("pam", "badnets"): (0.89, 0.03, 0.06), ("pam", "blended"): (0.90, 0.05, 0.09),
        ("anp", "blended"): (0.72, 0.45, 0.80)}
    costs = {("ep", "badnets"): 120.0, ("ep", "blended"): 130.0, ("ft", "badnets"): 40.0, ("pam", "badnets"): 300.0}
    # ep / badnets at 10% has its train record: its setup is known (REPORTED's)
    recs: list[JobRecord] = [JobRecord(
        kind="train", key="t-badnets", label="train", status="done", attrs=Cell(dataset="d", seed=0),
        config={"data": {"name": "d"}, "model": {"name": "m"}, "recipe": {"epochs": 100},
                "attack": {"name": "badnets", "config": {}}}, plugin=PluginInfo(name="badnets", version="1"))]
    # purify records: the ones that cost something, and the none ones (the baseline row's fact: its cost is ~0)
    costs.update({("none", "badnets"): 0.5, ("none", "blended"): 0.5})
    pur = {(d, a): purify(d, a, w, key=f"p-{d}-{a}") for (d, a), w in costs.items()}
    recs += list(pur.values())
    recs += [ev(d, a, s, {"clean_acc": c + s / 100, "asr": o, "retune_asr": p},
                deps=["t-badnets" if a == "badnets" else "t-blended", f"p-{d}-{a}"])
             for (d, a), (c, o, p) in cells.items() for s in (0, 1)]
    recs += [ev("anp", "badnets", 0, {}, status="failed", deps=["t-badnets", "p-anp-badnets"])]
    recs += [lmc(d, "badnets", asr, deps=["t-badnets", f"p-{d}-badnets"])
             for d, asr in [("ep", [0.97, 0.95, 0.6, 0.1, 0.02]), ("ft", [0.97, 0.9, 0.8, 0.5, 0.12]),
                            ("pam", [0.97, 0.4, 0.05, 0.03, 0.03])]]
    recs += [ev(d, "badnets", 0, {"clean_acc": c, "asr": a}, rate=0.05, deps=["t5", f"p5-{d}"])
             for d, c, a in [("none", 0.94, 0.91), ("ep", 0.91, 0.03)]]
    # (a cost is the defense's per attack, whatever the rate: the same as at 10%, so the 10% board's stays)
    recs += [purify(d, "badnets", costs[(d, "badnets")], key=f"p5-{d}") for d in ("none", "ep")]
    return recs


REPORTED = [{"dataset": "d", "model": "m", "poison_rate": 0.1, "attack": "badnets", "defense": "ep", "metric": "asr",
             "value": 0.0142, "source": "paper 000, Table 1", "setup": {"recipe": {"epochs": 100}}}]


class Tables(HTMLParser):
    """The text of every body cell of every table: ``tables[i][row][col]``; ``titles`` likewise."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.titles: list[list[list[str]]] = []
        self._in_body = self._in_cell = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        if tag == "tbody":
            self._in_body = True
            self.tables.append([])
            self.titles.append([])
        elif tag == "tr" and self._in_body:
            self.tables[-1].append([])
            self.titles[-1].append([])
        elif tag == "td" and self._in_body:
            self._in_cell = True
            self.tables[-1][-1].append("")
            self.titles[-1][-1].append(dict(attrs).get("title") or "")

    def handle_endtag(self, tag: str) -> None:
        self._in_body = self._in_body and tag != "tbody"
        self._in_cell = self._in_cell and tag != "td"

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.tables[-1][-1][-1] += data


def test_the_page_needs_nothing_from_the_network():
    html = render(records(), "html", reported=REPORTED)
    assert html == page(boards(records(), REPORTED), records())  # render passes the records on
    assert not re.search(r"\b(src|href)\s*=|@import|url\(", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert html.count("<script>") == 1 and html.count("<style>") == 1  # both inline


def test_one_table_per_board_under_its_title_and_the_legend_in_the_footer():
    data = boards(records(), REPORTED)
    html = page(data, records(), generated="2025-01-02 03:04 UTC")
    assert len(data) == 2 and html.count("<table") == 2
    assert "d / m / poison rate 10% (seeds 0, 1; rates in %)" in html
    assert "d / m / poison rate 5% (seeds 0; rates in %)" in html
    assert "<footer>" in html and "reported.yaml" in html and "Generated 2025-01-02 03:04 UTC." in html
    assert "Generated" not in page(data, records())  # no clock read inside
    first = Tables(html).tables[0]
    assert [r[0] for r in first] == ["none", "ep (oracle)", "ft", "pam", "anp"]  # ep uses the real trigger
    # ep / badnets: C-Acc, ASR with the reported number beside it, P-ASR; ...; cost and device last
    assert first[1][1:4] == ["90.50", "2.00(1.42)", "85.00"] and first[1][-2:] == ["125.0", "cpu"]
    assert 'title="reported: paper 000, Table 1"' in html


def test_a_failed_cell_shows_its_status_and_reason_never_a_number():
    html = page(boards(records()), records())
    anp = next(r for r in Tables(html).tables[0] if r[0] == "anp")
    anp_titles = Tables(html).titles[0][-1]
    assert anp[1:4] == ["failed", "failed", "failed"]
    assert anp_titles[1] == "anp / badnets / asr: failed: ValueError: why"
    assert "<li>anp / badnets / asr: failed: ValueError: why</li>" in html
    assert anp[-3] == "—"  # and its average over the attacks is no number either


def test_the_plots_appear_when_the_data_has_them():
    html = page(boards(records()), records())
    assert html.count('aria-label="C-Acc vs ASR"') == 2  # both boards have C-Acc and ASR
    assert html.count('aria-label="O-ASR vs P-ASR"') == 1  # only the 10% board has P-ASR
    assert "d / m / badnets: lmc_asr along the path" in html
    assert "pam / badnets: P-ASR 6.00%" in html  # a bar's tooltip
    asr_only = [ev("none", "a", 0, {"asr": 0.9}), ev("ft", "a", 0, {"asr": 0.1})]
    assert "<svg" not in page(boards(asr_only), asr_only)


def test_text_from_the_records_is_escaped():
    recs = [ev("<x>", 'a"&b', 0, {"clean_acc": 0.9, "asr": 0.1, "retune_asr": 0.5}), lmc("<x>", 'a"&b', [0.9] * 5)]
    html = page(boards(recs), recs)
    assert "<x>" not in html and 'a"&b' not in html
    assert "&lt;x&gt;" in html and "a&quot;&amp;b" in html
    assert Tables(html).tables[0][0][0] == "<x>"  # what a browser shows


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def webdriver():
    """A chromedriver session on headless Chromium: ``call(method, path, body) -> value``."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("HARNESS_SKIP_BROWSER") == "1":
            pytest.skip("HARNESS_SKIP_BROWSER=1: no browser test")
        pytest.fail("the browser test needs Chromium and chromedriver: `apt-get install chromium chromium-driver` "
                    "(Debian; .ci/run does it), or set HARNESS_SKIP_BROWSER=1 to skip it", pytrace=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def call(method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.load(resp)["value"]

    try:
        _wait_ready(call)
        options = {"binary": chromium, "args": ["--headless", "--no-sandbox", "--disable-gpu",
                                                "--disable-dev-shm-usage", "--window-size=1400,1000"]}
        caps = {"browserName": "chrome", "goog:chromeOptions": options, "goog:loggingPrefs": {"browser": "ALL"}}
        session = call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        yield lambda method, path, body=None: call(method, f"/session/{session}{path}", body)
        call("DELETE", f"/session/{session}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_ready(call, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if call("GET", "/status")["ready"]:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("chromedriver did not start")
        time.sleep(0.2)


def _severe(session) -> list[str]:
    """The console's errors (uncaught exceptions included) since the last call."""
    return [e["message"] for e in session("POST", "/se/log", {"type": "browser"}) if e["level"] == "SEVERE"]


def _defenses(session) -> list[str]:
    """The defense names of the first table's rows, in their order (an oracle row's mark left out)."""
    names = session("POST", "/execute/sync", {"script": "return Array.from(document.querySelector('table').tBodies[0]"
                                                       ".rows, r => r.cells[0].textContent)", "args": []})
    return [name.removesuffix(" (oracle)") for name in names]


def _click(session, css: str) -> None:
    """Click the first element matching ``css``."""
    element = session("POST", "/element", {"using": "css selector", "value": css})
    session("POST", f"/element/{next(iter(element.values()))}/click", {})


@pytest.mark.integration
def test_in_chromium_no_console_errors_headers_sort_and_a_screenshot(webdriver, tmp_path):
    path = tmp_path / "leaderboard.html"
    path.write_text(render(records(), "html", reported=REPORTED))
    webdriver("POST", "/url", {"url": path.as_uri()})
    assert _severe(webdriver) == []
    webdriver("POST", "/execute/sync", {"script": "console.error('probe')", "args": []})
    assert any("probe" in m for m in _severe(webdriver))  # the check above can see an error

    shot = tmp_path / "leaderboard.png"
    shot.write_bytes(base64.b64decode(webdriver("GET", "/screenshot")))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("HARNESS_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)

    assert _defenses(webdriver) == ["none", "ep", "ft", "pam", "anp"]
    c_acc = 'table th[data-col="1"]'  # badnets C-Acc: higher is better, so best first; anp failed: last
    _click(webdriver, c_acc)
    assert _defenses(webdriver) == ["none", "ep", "pam", "ft", "anp"]
    _click(webdriver, c_acc)
    assert _defenses(webdriver) == ["ft", "pam", "ep", "none", "anp"]
    _click(webdriver, 'table th[data-col="0"]')  # the names, alphabetically
    assert _defenses(webdriver) == ["anp", "ep", "ft", "none", "pam"]
    assert _severe(webdriver) == []
