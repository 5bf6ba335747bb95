"""Fuzz: every record that validates renders in every format, never a crash (issue 18, item 3).

Records are built as the dicts a records file or a submission could hold (odd text, NaN, infinities,
huge and negative numbers, strings where numbers go, configs that are not mappings, missing upstream
records, schema 1 and 2), and only those :class:`JobRecord` accepts are kept: whatever validation lets
through, the boards must show (a non-finite number as its status, a missing field as a dash).
"""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from backdoor_harness.leaderboard.html import page
from backdoor_harness.leaderboard.plots import curves, write_curve_plots
from backdoor_harness.leaderboard.render import boards, load_reported, render
from backdoor_harness.store import JobRecord

#: the published numbers: records naming their cells (cifar10 / preactresnet18 / badnets / ...) meet them
REPORTED = load_reported()
#: text a hostile or careless submitter might write
NASTY = ["a|b", "<script>alert(1)</script>", "# head", "[x](http://evil)", "\x1b[31mred\x1b[0m", "line\nbreak",
         "x\u2028y", "\x00", "\ud800", "\x85\x9b", "*b* _i_ `c`", "\\", "&amp;", '"onmouseover="x', "' onload='y",
         "$\\frac{a}{$",
         "", " ", "ü", "🙂", "\u202eevil", "x" * 300, "../../etc/passwd", "none", "ep", "badnets", "cifar10",
         "preactresnet18", "asr", "clean_acc"]
text = st.one_of(st.sampled_from(NASTY), st.text(max_size=12))
name = st.sampled_from(["cifar10", "preactresnet18", "badnets", "blended", "none", "ep", "ft", "asr", "qra",
                        "a|b", "<b>", "# h", "\x1b[2J", "", "_x_"])
KEYS = ["k0", "k1", "k2", "k3", "k4"]
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.1, 0.5, 1.0, -0.2, 1e308]))
number = st.one_of(floats, st.integers(min_value=-10 ** 400, max_value=10 ** 400), st.booleans())
junk = st.one_of(st.none(), text, number, st.lists(number, max_size=3))
value = st.one_of(number, junk, st.lists(st.one_of(floats, text), max_size=6),
                  st.sampled_from([[0.0, 0.5, 1.0], [0.9, 0.5, 0.1], [0.1, float("nan"), 2.0]]))
mapping = st.dictionaries(text, junk, max_size=3)
plugin_ref = st.one_of(junk, st.fixed_dictionaries({"name": st.one_of(name, junk)},
                                                   optional={"config": st.one_of(mapping, junk)}))
config = st.fixed_dictionaries({}, optional={
    "attack": plugin_ref, "defense": plugin_ref, "evaluator": plugin_ref, "data": st.one_of(mapping, junk),
    "model": st.one_of(st.fixed_dictionaries({"name": name}), junk), "recipe": st.one_of(mapping, junk),
    "reserve": st.one_of(mapping, junk), "seed": junk})
metric_info = st.fixed_dictionaries(
    {"higher_is_better": st.booleans()},
    optional={"title": text, "percent": st.booleans(), "curve": st.booleans(), "doc": text,
              "board": st.one_of(st.none(), st.integers(-3, 3), st.just(10 ** 30)), "one_sided": st.booleans(),
              "range": st.one_of(st.none(), st.tuples(floats, floats))})
metric_name = st.one_of(st.sampled_from(["clean_acc", "asr", "retune_asr", "lmc_t", "lmc_asr", "x_t", "x_asr",
                                         "a@b", "@", "_t"]), text)
attrs = st.fixed_dictionaries(
    {"dataset": st.one_of(name, text),
     "seed": st.one_of(st.integers(-2, 3), st.just(10 ** 30), st.sampled_from(["1", "07"]), st.just(2.0),
                       st.booleans())},
    optional={"model": st.one_of(st.none(), name, text), "attack": st.one_of(st.none(), name, text),
              "defense": st.one_of(st.none(), name, text), "evaluator": st.one_of(st.none(), name, text),
              "poison_rate": st.one_of(st.none(), floats, st.sampled_from(["0.1", "nan", "-inf", "1e400"])),
              "role": st.sampled_from(["attacked", "clean", "resource", None])})
plugin = st.one_of(st.none(), st.fixed_dictionaries(
    {"name": st.one_of(name, text), "version": text},
    optional={"config": mapping, "oracle": st.booleans(), "baseline": st.booleans(),
              "substitute": st.one_of(st.none(), text)}))
record = st.fixed_dictionaries(
    {"key": st.one_of(st.sampled_from(KEYS), text),
     "kind": st.one_of(st.sampled_from(["train", "purify", "evaluate"]), text), "label": text,
     "status": st.sampled_from(["running", "done", "failed", "skipped", "blocked"]), "attrs": attrs},
    optional={"schema_version": st.sampled_from([1, 2]), "config": config,
              "versions": st.dictionaries(st.sampled_from(["model", "attack", "defense", "harness"]), text, max_size=2),
              "deps": st.lists(st.one_of(st.sampled_from(KEYS), text), max_size=3),
              "metrics": st.dictionaries(metric_name, value, max_size=4), "error": st.one_of(st.none(), text),
              "wall_s": st.one_of(st.none(), floats), "device": st.one_of(st.none(), text), "plugin": plugin,
              "metric_info": st.dictionaries(metric_name, metric_info, max_size=4)})


def _valid(raw: dict) -> JobRecord | None:
    try:
        return JobRecord.model_validate(raw)
    except ValidationError:
        return None


valid_records = st.lists(record, min_size=1, max_size=8).map(lambda rs: [r for r in map(_valid, rs) if r is not None])
#: the tags and attributes the page is made of: anything else came from a record's text
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "section", "div", "table", "thead", "tbody",
        "tr", "th", "td", "span", "small", "ul", "li", "figure", "figcaption", "svg", "line", "text", "rect",
        "circle", "polygon", "polyline", "path", "i", "br", "footer", "script", "p"}
ATTRS = {"lang", "charset", "name", "content", "class", "colspan", "rowspan", "data-col", "data-type", "data-first",
         "data-v", "title", "style", "width", "height", "viewbox", "role", "aria-label", "x", "y", "x1", "x2", "y1",
         "y2", "cx", "cy", "r", "points", "fill", "fill-opacity", "stroke", "stroke-width", "transform",
         "text-anchor", "dominant-baseline", "font-weight", "d"}
NUMERIC = {"x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "r", "width", "height", "data-v"}
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


class Page(HTMLParser):
    """Every tag and attribute of a page, and the number of script elements."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.scripts = 0
        self.bad_numbers: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.scripts += tag == "script"
        for a, v in attrs:
            self.attrs.add(a)
            if a in NUMERIC and not math.isfinite(float(v)):
                self.bad_numbers.append(f"{tag} {a}={v}")
            if a == "points" and any(not math.isfinite(float(c)) for p in v.split() for c in p.split(",")):
                self.bad_numbers.append(f"{tag} points={v}")


def check_all_formats(recs: list[JobRecord]) -> None:
    for fmt in ("text", "markdown"):
        for long in (False, True):
            out = render(recs, fmt, REPORTED, long=long)
            assert not CONTROL.search(out), (fmt, long)
            assert "\x1b" not in out
            out.encode("utf-8")  # written to LEADERBOARD.md, printed to a terminal
    cells = json.loads(render(recs, "json"), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert isinstance(cells, list)
    html = render(recs, "html", REPORTED)
    html.encode("utf-8")
    parsed = Page(html)
    assert parsed.tags <= TAGS and parsed.attrs <= ATTRS and parsed.scripts == 1
    assert not parsed.bad_numbers
    assert not CONTROL.search(html.replace("\n", ""))
    curves(recs)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(valid_records)
@example([JobRecord(key="k0", kind="evaluate", label="e", status="done", attrs={"dataset": "d", "seed": 0},
                    metrics={"asr": 10 ** 400}, config={"evaluator": "asr"})])  # beyond the float range
@example([JobRecord(key="k0", kind="evaluate", label="e", status="failed", attrs={"dataset": "d", "seed": 0})])
def test_any_valid_records_render_in_every_format(recs):
    assume(recs)
    check_all_formats(recs)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.fixed_dictionaries({
    "defense": name, "attack": name, "seed": st.integers(0, 2), "rate": st.floats(0, 1),  # what a Cell accepts
    "status": st.sampled_from(["done", "failed"]),
    "metrics": st.dictionaries(st.sampled_from(["clean_acc", "asr", "retune_asr", "lmc_t", "lmc_asr"]), value,
                               max_size=5),
    "wall_s": st.one_of(st.none(), floats)}), min_size=1, max_size=6))
@example([{"defense": "ft", "attack": "a", "seed": 0, "rate": 0.1, "status": "done", "wall_s": float("inf"),
           "metrics": {"clean_acc": float("nan"), "asr": 0.5, "retune_asr": 1e308}}])
def test_boards_with_every_plot_render_whatever_the_numbers(cells):
    """Records shaped like a real run (train, purify, evaluate with board metrics and curves), the numbers
    anything: the scatter, the bars and the curves of the page stay drawable."""
    from test_leaderboard import METRICS, ev, purify

    recs = []
    for i, c in enumerate(cells):
        recs.append(purify(c["defense"], c["attack"], c["wall_s"], key=f"p{i}"))
        recs.append(ev(c["defense"], c["attack"], c["seed"], {} if c["status"] != "done" else c["metrics"],
                       status=c["status"], rate=c["rate"], deps=["t", f"p{i}"]))
        recs[-1] = recs[-1].model_copy(update={"metric_info": {m: METRICS[m] for m in
                                                               ("clean_acc", "asr", "retune_asr", "lmc_t", "lmc_asr")}})
    check_all_formats(recs)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.fixed_dictionaries({"dataset": st.one_of(name, text), "defense": st.one_of(name, text),
                                       "attack": st.one_of(name, text), "grid": value, "curve": value,
                                       "metric": st.sampled_from(["lmc_asr", "lmc_$\\alpha$_asr", "lmc_/../b_asr"])}),
                min_size=1, max_size=3))
@example([{"dataset": "a\x00b", "defense": "$\\frac{a}{$", "attack": "x" * 300, "metric": "lmc_asr",
           "grid": [0.0, 0.5, 1.0], "curve": [0.9, 0.5, 0.1]}])
def test_curve_plots_are_written_whatever_the_records(tmp_path_factory, curves_in):
    """The PNG/SVG curve plots (``harness run``): odd names make plain file names inside the folder, odd
    numbers no crash, mathtext in a label is drawn as text."""
    from test_leaderboard import ev

    folder = tmp_path_factory.mktemp("plots")
    recs = [ev(c["defense"], c["attack"], 0, {"lmc_t": c["grid"], c["metric"]: c["curve"]}, evaluator="lmc",
               dataset=c["dataset"]) for c in curves_in]
    written = write_curve_plots(recs, folder)
    for path in written:
        assert path.parent == folder and path.exists() and len(path.name.encode()) <= 255
        assert re.fullmatch(r"[\w.+-]+", path.name, re.ASCII)
