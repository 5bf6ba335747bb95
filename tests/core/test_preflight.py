"""The preflight: every registered plugin in one tiny job, its exit codes and lines, its budget, and the
CPU device audit that catches a CPU generator drawing into a tensor on the device."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
from pydantic import BaseModel

import backdoor_harness as bh
from backdoor_harness import cli, preflight, registry
from backdoor_harness.preflight import AUDIT_DEVICE, DeviceAudit, quick_config

KINDS = ("attack", "defense", "evaluator")


class Broken(bh.Defense):
    """Raises in purify: the preflight must name it in one FAIL line."""

    name = "test_preflight_broken"
    version = "1"
    summary = "raises"
    paper = "-"

    def purify(self, model, ctx):
        raise ValueError("broken on purpose")


class DrawsOnDevice(bh.Defense):
    """The bug that cost a GPU run 18 jobs: a copy of the model (on the device) re-initialised in
    place from the cell's CPU generator. Fine on the CPU, an error on CUDA."""

    name = "test_preflight_cpu_generator"
    version = "1"
    summary = "draws from the CPU generator into the model's weights"
    paper = "-"

    def purify(self, model, ctx):
        out = copy.deepcopy(model)
        head = list(out.parameters())[-2]
        with torch.no_grad():
            head.uniform_(-0.1, 0.1, generator=ctx.generator)
        return bh.Purified(out.eval())


def register(*classes):
    registry.register(types.SimpleNamespace(harness_defenses=bh.hookimpl(lambda: list(classes))),
                      name="test-preflight-defenses")


@pytest.fixture
def broken_plugins():
    register(Broken, DrawsOnDevice)
    yield
    registry.reset()


@pytest.fixture
def generator_plugin():
    register(DrawsOnDevice)
    yield
    registry.reset()


def report(out_dir) -> dict:
    return json.loads((out_dir / "preflight.json").read_text())


def statuses(rep: dict) -> dict[tuple[str, str], str]:
    return {(p["kind"], p["name"]): p["status"] for p in rep["plugins"]}


def test_every_plugin_passes_and_broken_ones_fail_with_one_line_each(tmp_path, broken_plugins, capsys):
    """On the CPU with the device audit: every built-in plugin passes; the raising defense and the one
    drawing from the CPU generator into the model on the device fail, each in one FAIL line."""
    assert preflight.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    fails = [line for line in lines if line.startswith("FAIL")]
    assert fails[0] == "FAIL defense test_preflight_broken: ValueError: broken on purpose"
    assert fails[1].startswith("FAIL defense test_preflight_cpu_generator: RuntimeError: device audit: ")
    assert "CPU torch.Generator" in fails[1] and len(fails) == 2
    assert lines[-1].startswith("preflight FAILED on cpu") and "2 fail" in lines[-1]

    rep = report(tmp_path)
    got = statuses(rep)
    expected = {(k, n) for k in KINDS for n in registry.names(k)}
    assert set(got) == expected | {("core", "clean_model")}
    assert {key: s for key, s in got.items() if s != "pass"} == {
        ("defense", "test_preflight_broken"): "fail", ("defense", "test_preflight_cpu_generator"): "fail"}
    assert rep["device_audit"]["draws_checked"] > 0 and len(rep["device_audit"]["violations"]) == 1
    jobs = {(p["kind"], p["name"]): p["jobs"] for p in rep["plugins"]}
    for name in registry.names("attack"):  # its train job, after its prepare job where it has one
        kinds = [label.split()[0] for label in jobs[("attack", name)]]
        assert kinds == (["prepare", "train"] if registry.get_class("attack", name).prepares() else ["train"])
    assert all(label.startswith("purify") for name in registry.names("defense")
               for label in jobs[("defense", name)])
    assert all(label.startswith("evaluate") for name in registry.names("evaluator")
               for label in jobs[("evaluator", name)])
    log = (tmp_path / "preflight.log").read_text()
    assert "Traceback" in log and 'raise ValueError("broken on purpose")' in log


def test_it_passes_on_the_cpu_and_only_the_audit_sees_the_generator_bug(tmp_path, generator_plugin, capsys):
    threads = torch.get_num_threads()
    assert preflight.main(["--device", "cpu", "--out", str(tmp_path), "--no-audit"]) == 0
    assert torch.get_num_threads() == threads  # one thread while it ran, then as before
    lines = capsys.readouterr().out.splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("preflight PASSED on cpu")
    rep = report(tmp_path)
    assert set(statuses(rep).values()) == {"pass"} and rep["device_audit"] is None
    assert rep["counts"] == {"pass": len(rep["plugins"]), "fail": 0, "skip": 0}


def test_the_budget_stops_it_with_skips(tmp_path, monkeypatch, capsys):
    ticks = iter(range(10_000))
    monkeypatch.setattr(preflight.Preflight, "elapsed", lambda self: float(next(ticks)))  # a second per look
    assert preflight.main(["--device", "cpu", "--out", str(tmp_path), "--budget-s", "6", "--no-audit"]) == 1
    out = capsys.readouterr().out
    rep = report(tmp_path)
    counts = rep["counts"]
    assert counts["pass"] >= 1 and counts["skip"] >= 20 and counts["fail"] == 0
    skipped = [p for p in rep["plugins"] if p["status"] == "skip"]
    assert all(p["error"].startswith("budget (6 s) spent") for p in skipped)
    assert all(p["seconds"] == 0 for p in skipped if p["kind"] == "evaluator")  # nothing started after it
    assert f"SKIP evaluator {registry.names('evaluator')[-1]}: budget" in out
    assert f"{counts['skip']} skip ({counts['skip']} for the budget)" in out.splitlines()[-1]


def test_a_real_clock_budget_skips_everything(tmp_path, capsys):
    assert preflight.main(["--device", "cpu", "--out", str(tmp_path), "--budget-s", "1e-6"]) == 1
    rep = report(tmp_path)
    assert rep["counts"]["pass"] == 0 and rep["counts"]["skip"] == len(rep["plugins"]) > 20


@pytest.mark.parametrize("argv, says", [
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "cpu:1"], "plain cpu"),
    (["--device", "cpu", "--budget-s", "0"], "--budget-s 0.0: give a positive number"),
    (["--device", "cpu", "--budget-s", "-5"], "--budget-s -5.0"),
    (["--device", "cpu", "--budget-s", "inf"], "--budget-s inf"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, says):
    assert preflight.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("preflight: error: ") and says in err
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert preflight.main(["--device", "cpu", "--out", str(tmp_path / "f")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_bad_argument(tmp_path, capsys):
    assert preflight.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert cli.main(["preflight", "--device", "cuda", "--out", str(tmp_path)]) == 2  # `harness preflight`


@pytest.mark.parametrize("argv", [["--device", "cpu"], ["--device", "cpu", "--out", "x", "--budget-s", "soon"],
                                  ["--out", "x"], ["--device", "cpu", "--out", "x", "--frobnicate"]])
def test_unparsable_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        preflight.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("preflight: error: ") and "usage: python -m" in err


def test_the_module_runs_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "backdoor_harness.preflight", "--device", "cpu", "--out", "x",
                           "--budget-s", "soon"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "argument --budget-s: invalid float value: 'soon'" in proc.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_quick_config_sets_every_loop_count_to_one(kind):
    for name in registry.names(kind):
        cfg = quick_config(name, kind)
        plugin = registry.create(kind, name, **cfg)

        def check(config, default, where):
            for field, info in type(config).model_fields.items():
                value = getattr(config, field)
                if info.annotation is int and is_loop(field):
                    assert value == 1, f"{where}.{field}"
                elif isinstance(value, BaseModel):  # a nested config: its loops at 1, the rest its default
                    check(value, getattr(default, field), f"{where}.{field}")
                elif field != "generator_width" and default is not None:
                    assert value == getattr(default, field), f"{where}.{field} changed"

        check(plugin.config, registry.create(kind, name).config, f"{kind} {name}")


def is_loop(field: str) -> bool:
    return any(field == b or field.endswith("_" + b) for b in preflight.BUDGET)


def test_quick_config_reaches_into_nested_configs():
    nested = [(n, f) for n in registry.names("evaluator") for f, v in quick_config(n, "evaluator").items()
              if isinstance(v, dict)]
    assert nested  # e.g. an evaluator's own retuning config
    for name, field in nested:
        inner = getattr(registry.create("evaluator", name, **quick_config(name, "evaluator")).config, field)
        loops = [k for k, info in type(inner).model_fields.items() if info.annotation is int and is_loop(k)]
        assert loops and all(getattr(inner, k) == 1 for k in loops)


# -- the device audit on its own ------------------------------------------------------------------------


def _linear_there():
    return nn.Linear(3, 3).to(AUDIT_DEVICE)


G = torch.Generator().manual_seed(0)
FLAGGED = {  # each raises on CUDA with a CPU generator: "Expected a 'cuda' device type for generator"
    "factory with device=ctx.device": lambda: torch.randn(3, device=AUDIT_DEVICE, generator=G),
    "in place on a moved weight": lambda: _linear_there().weight.data.uniform_(generator=G),
    "nn.init on a moved weight": lambda: nn.init.kaiming_uniform_(_linear_there().weight, generator=G),
    "in place on a deep copy": lambda: [p.data.normal_(generator=G) for p in copy.deepcopy(_linear_there()).parameters()],
    "in place on a state-dict tensor": lambda: _linear_there().state_dict()["bias"].uniform_(generator=G),
    "in place on an activation": lambda: (_linear_there()(torch.rand(2, 3).to(AUDIT_DEVICE)).detach() * 2).normal_(
        generator=G),
    "bernoulli of device probabilities": lambda: torch.bernoulli(
        torch.sigmoid(torch.rand(4).to(AUDIT_DEVICE)), generator=G),
    "multinomial of device weights": lambda: torch.multinomial(torch.rand(4).to(AUDIT_DEVICE), 1, generator=G),
}
ALLOWED = {  # the CPU-generator patterns that work on CUDA
    "draw on the CPU, then move": lambda: torch.randn(3, generator=G).to(AUDIT_DEVICE),
    "initialise, then move the module": lambda: (nn.init.kaiming_uniform_((m := nn.Linear(3, 3)).weight, generator=G),
                                                 m.to(AUDIT_DEVICE)),
    "draw on the CPU, copy into the weight": lambda: _linear_there().weight.data.copy_(
        torch.empty(3, 3).uniform_(generator=G)),
    "back on the host with .cpu()": lambda: torch.rand(3).to(AUDIT_DEVICE).cpu().uniform_(generator=G),
    "back on the host with .to('cpu')": lambda: torch.rand(3).to(AUDIT_DEVICE).to("cpu").uniform_(generator=G),
    "a fresh model loading device weights": lambda: (lambda n: (n.load_state_dict(_linear_there().state_dict()),
                                                                n.weight.data.uniform_(generator=G)))(nn.Linear(3, 3)),
    "randperm": lambda: torch.randperm(10, generator=G),
    "device draws without a generator": lambda: torch.randn(3, device=AUDIT_DEVICE).uniform_(),
}


@pytest.mark.parametrize("case", sorted(FLAGGED))
def test_the_audit_flags_a_cpu_generator_drawing_on_the_device(case):
    with DeviceAudit() as audit, pytest.raises(RuntimeError, match="device audit: .* CPU torch.Generator"):
        FLAGGED[case]()
    assert len(audit.violations) == 1
    FLAGGED[case]()  # outside the audit it runs: on the CPU this bug is invisible


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_the_audit_allows_what_cuda_allows(case):
    with DeviceAudit() as audit:
        ALLOWED[case]()
    assert audit.violations == []


def test_the_audit_keeps_cuda_semantics_of_to():
    with DeviceAudit() as audit:
        x = torch.rand(4).to(AUDIT_DEVICE)
        assert x.to(AUDIT_DEVICE) is x  # already there: the same tensor, as on CUDA
        for y in (x.to(torch.float64), x.to(AUDIT_DEVICE, torch.float64), x.to(dtype=torch.float64),
                  x.to(torch.zeros(1, dtype=torch.float64).to(AUDIT_DEVICE)), x.to(memory_format=torch.contiguous_format)):
            assert audit.lives_there(y) and torch.equal(y, x.double()) and y.dtype == (
                x.dtype if y is x else torch.float64)
        assert audit.lives_there(x[1:]) and x.to(torch.zeros(1).to(AUDIT_DEVICE)) is x
        host = x.cpu()
        assert host is not x and torch.equal(host, x) and not audit.lives_there(host)  # a copy, as from CUDA
        model = nn.Linear(4, 2)
        before = model(torch.ones(1, 4)).detach()
        model.to(AUDIT_DEVICE)
        assert all(audit.lives_there(p) for p in model.parameters())
        assert torch.equal(model(torch.ones(1, 4).to(AUDIT_DEVICE)).detach(), before)


def test_the_audit_device_must_be_an_indexed_cpu():
    with pytest.raises(bh.HarnessError, match="cpu:0"):
        DeviceAudit(torch.device("cpu"))
