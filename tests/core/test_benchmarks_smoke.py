"""The GPU benchmarks run on the CPU too, so they cannot rot between GPU runs: benchmarks/grid.py end to
end on a tiny grid (its table, not its speed), and the benchmarks' compile-mode options refused early."""

from __future__ import annotations

import re

import pytest

from helpers import ROOT


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import their neighbour `machine`
    monkeypatch.delenv("HARNESS_COMPILE", raising=False)  # they set it for the runs they start


def test_grid_prints_a_row_per_k(benchmarks, tmp_path, capsys):
    import grid

    assert grid.main(["--model", "tiny_cnn", "--per-class", "10", "--test-per-class", "2", "--reserve-per-class", "2",
                      "--epochs", "1", "--defense-epochs", "1", "--seeds", "1", "--batch", "64", "--k", "1", "2",
                      "--device", "cpu", "--workdir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tiny_cnn, BadNets + Blended x 1 seed(s)" in out and "20 jobs" in out and "(lr 0.005)" in out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if re.match(r"\| \d+ ", line)]
    assert [r[0] for r in rows] == ["1", "2"]
    for r in rows:
        assert r[1] == "20" and r[3] == "200"  # every job; 2 attacked models x 1 epoch x 100 images
        assert float(r[4].replace(",", "")) > 0 and r[6] == r[7] == "-"  # no GPU memory on the CPU
        assert r[8] in ("met", "NOT met")
    assert re.search(r"target \(issue 16; .*\): >= 50,000 images/s: (met|NOT met) \(best: k=[12], ", out)
    assert (tmp_path / "k2" / "results.sqlite").exists()


@pytest.mark.parametrize("script, argv", [("grid", ["--compile", "fast"]), ("fast_recipe", ["--compile", "fast"]),
                                          ("trainer", ["--compile", "default", "fast"])])
def test_a_bad_compile_mode_is_refused_before_anything_runs(benchmarks, capsys, script, argv):
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    assert "unknown torch.compile mode 'fast'" in capsys.readouterr().err


def test_the_trainer_benchmarks_compile_and_lr_options(benchmarks):
    import trainer

    assert trainer.parse_modes(None) == [] and trainer.parse_modes([]) == ["default"]
    assert trainer.parse_modes(["1", "default", "reduce-overhead"]) == ["default", "reduce-overhead"]
    assert trainer.recipe_for(512, 3, "linear").effective_lr == pytest.approx(0.04)  # 0.01 at batch 128
    assert trainer.recipe_for(512, 3, None).effective_lr == 0.01
    rows = [{"model": "preact_resnet18", "trainer": "baseline", "ips": 3_000.0, "baseline": True},
            {"model": "preact_resnet18", "trainer": "harness, batch 512", "ips": 31_000.0, "baseline": False},
            {"model": "preact_resnet18", "trainer": "harness, batch 128", "ips": 12_000.0, "baseline": False}]
    lines = trainer.targets(rows, "GPU")
    assert "met (31,000 images/s, harness, batch 512)" in lines[1] and "NOT" not in lines[1]
    assert "met (10.33x" in lines[2] and "NOT" not in lines[2]
    rows[0]["ips"] = 4_000.0
    assert "NOT met (7.75x" in trainer.targets(rows, "GPU")[2]
    assert "not measured" in trainer.targets(rows[:0], "GPU")[1]
