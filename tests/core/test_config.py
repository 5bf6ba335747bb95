"""Matrix validation: one clear error per bad input, naming the file, the key and the fix."""

from __future__ import annotations

import pytest

from backdoor_harness import HarnessError, cli
from backdoor_harness.matrix import load_matrix

from helpers import GOOD_MATRIX as GOOD
from helpers import matrix_error, write_matrix


def test_good_matrix_loads(tmp_path):
    spec = load_matrix(write_matrix(tmp_path, GOOD))
    assert [a.name for a in spec.attacks] == ["badnets"] and spec.recipe.epochs == 6


def test_unknown_plugin_suggests(tmp_path):
    msg = matrix_error(tmp_path, GOOD.replace("name: badnets", "name: badnet"))
    assert "matrix.yaml" in msg and "attacks[0]" in msg
    assert "did you mean 'badnets'" in msg.lower()


def test_unknown_config_key_lists_valid_keys(tmp_path):
    msg = matrix_error(tmp_path, GOOD.replace("{stamp: after_augment}", "{patch: 3}"))
    assert "unknown key 'patch'" in msg and "patch_size" in msg and "attacks[0]" in msg


def test_wrong_type_names_the_key(tmp_path):
    msg = matrix_error(tmp_path, GOOD.replace("{stamp: after_augment}", "{poison_rate: lots}"))
    assert "poison_rate" in msg and "lots" in msg


def test_unknown_top_level_key(tmp_path):
    msg = matrix_error(tmp_path, GOOD + "epochs: 3\n")
    assert "unknown key 'epochs'" in msg and "matrix.yaml" in msg


def test_bad_yaml_names_the_line(tmp_path):
    msg = matrix_error(tmp_path, GOOD.replace("defenses: [none, ft]", "defenses: [none, ft"))
    assert "matrix.yaml:" in msg and "invalid YAML" in msg


def test_unknown_recipe_and_model(tmp_path):
    assert "cpu-quick" in matrix_error(tmp_path, GOOD.replace("recipe: cpu-quick", "recipe: fastest"))
    msg = matrix_error(tmp_path, GOOD.replace("[tiny_cnn]", "[resnet1]"))
    assert "models[0]" in msg and "did you mean" in msg.lower()


def test_missing_section(tmp_path):
    assert "missing required key 'attacks'" in matrix_error(tmp_path, GOOD.replace(
        "attacks: [{name: badnets, config: {stamp: after_augment}}]\n", ""))


def test_cli_exit_codes(tmp_path, capsys):
    assert cli.main(["validate", str(write_matrix(tmp_path, GOOD))]) == 0
    assert "valid" in capsys.readouterr().out
    assert cli.main(["validate", str(write_matrix(tmp_path, GOOD.replace("badnets", "badnet")))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
