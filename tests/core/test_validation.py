"""Matrix validation gaps (issue 18, item 6): every bad value fails at `harness validate` /
load_matrix with one HarnessError naming the file and the key, and exit 2; plus a bounded fuzz
test over matrix files (never a traceback)."""

from __future__ import annotations

import types

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backdoor_harness as bh
from backdoor_harness import HarnessError, cli, registry
from backdoor_harness.data import ImageSet, cached_num_classes, load_source
from backdoor_harness.matrix import load_matrix

from helpers import GOOD_MATRIX as GOOD
from helpers import matrix_error, write_matrix


def test_the_good_matrix_validates(tmp_path, capsys):
    assert cli.main(["validate", str(write_matrix(tmp_path, GOOD))]) == 0


@pytest.mark.parametrize("rate", ["-0.2", "1.5", ".nan", ".inf"])
def test_poison_rate_outside_0_1_is_refused(tmp_path, rate):
    msg = matrix_error(tmp_path, GOOD.replace("{stamp: after_augment}", f"{{poison_rate: {rate}}}"))
    assert "attacks[0]" in msg and "poison_rate" in msg


def test_a_negative_target_is_refused(tmp_path):
    msg = matrix_error(tmp_path, GOOD.replace("{stamp: after_augment}", "{target: -1}"))
    assert "attacks[0]" in msg and "target" in msg and "greater than or equal to 0" in msg


# -- a data set source for tests: 3 classes of 12x12 noise (its class count unknown unloaded) ------------


class Noise(bh.DatasetSource):
    name = "test_noise"
    version = "1"
    summary = "noise"
    paper = "-"

    def load(self):
        g = torch.Generator().manual_seed(0)

        def part(n):
            images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g)
            return ImageSet(images, torch.arange(n) % 3, ["a", "b", "c"])

        return part(24), part(12)


class KnownNoise(Noise):
    name = "test_known_noise"
    classes = 3


@pytest.fixture
def noise(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    registry.register(types.SimpleNamespace(harness_datasets=bh.hookimpl(lambda: [Noise, KnownNoise])),
                      name="test-validation-datasets")
    yield
    registry.reset()


def test_a_target_beyond_the_classes_is_refused_when_the_class_count_is_declared(tmp_path, noise):
    msg = matrix_error(tmp_path, GOOD.replace("name: cifar10, train_per_class: 10", "name: test_known_noise")
                   .replace("{stamp: after_augment}", "{target: 3}"))
    assert "attacks[0].config.target" in msg and "3 classes" in msg and "test_known_noise" in msg


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100), ("gtsrb", 43), ("tiny_imagenet", 200)])
def test_the_builtin_data_sets_declare_their_class_count(tmp_path, name, classes):
    """So a target beyond them fails at validation, without any data on this machine."""
    assert registry.instance("dataset", name).num_classes() == classes
    msg = matrix_error(tmp_path, GOOD.replace("name: cifar10, train_per_class: 10", f"name: {name}")
                   .replace("{stamp: after_augment}", f"{{target: {classes}}}"))
    assert "attacks[0].config.target" in msg and f"{classes} classes" in msg


def test_a_target_beyond_the_classes_is_refused_once_the_data_set_was_decoded(tmp_path, noise):
    text = GOOD.replace("name: cifar10, train_per_class: 10", "name: test_noise").replace(
        "{stamp: after_augment}", "{target: 7}")
    load_matrix(write_matrix(tmp_path, text))  # never decoded here: the class count is unknown (checked at run time)
    source = registry.create("dataset", "test_noise")
    assert cached_num_classes(source) is None
    load_source(source)
    assert cached_num_classes(source) == 3
    msg = matrix_error(tmp_path, text)
    assert "attacks[0].config.target: 7" in msg and "3 classes" in msg


@pytest.mark.integration
def test_a_target_beyond_the_classes_fails_the_train_job_before_training(tmp_path, noise):
    from backdoor_harness.matrix import MatrixSpec
    from backdoor_harness.scheduler import run_matrix
    from backdoor_harness.store import Store

    spec = MatrixSpec.model_validate({
        "datasets": ["test_noise"], "models": [{"name": "tiny_cnn", "kwargs": {"width": 4}}],
        "attacks": [{"name": "badnets", "config": {"target": 5, "patch_size": 2}}], "defenses": ["none"],
        "evaluators": ["clean_acc"], "recipe": {"base": "cpu-quick", "epochs": 1}})
    counts = run_matrix(spec, tmp_path / "run", progress=False, log=lambda *a: None)
    assert counts["failed"] == 1 and counts["done"] == 0
    store = Store(tmp_path / "run")
    train = next(store.records("train"))
    store.close()
    assert train.status == "failed" and "has target 5, but the data set has 3 classes" in train.error
    assert "train_wall_s" not in train.metrics


@pytest.mark.parametrize("key,value", [("lr", ".inf"), ("lr", ".nan"), ("weight_decay", ".inf"),
                                       ("weight_decay", "-.inf"), ("weight_decay", ".nan")])
def test_a_recipe_lr_or_weight_decay_that_is_not_finite_is_refused(tmp_path, key, value):
    msg = matrix_error(tmp_path, GOOD.replace("recipe: cpu-quick", f"recipe: {{base: cpu-quick, {key}: {value}}}"))
    assert f"recipe.{key}" in msg


def test_two_data_sets_sharing_a_label_are_refused(tmp_path):
    msg = matrix_error(tmp_path, GOOD.replace("[{name: cifar10, train_per_class: 10}]",
                                          "[{name: cifar10, train_per_class: 10}, {name: cifar10, label: cifar10}]"))
    assert "datasets[0], datasets[1]" in msg and "'cifar10'" in msg and "label" in msg


def test_two_models_sharing_a_label_are_refused(tmp_path):
    msg = matrix_error(tmp_path, GOOD.replace("models: [tiny_cnn]",
                                          "models: [tiny_cnn, {name: tiny_cnn, kwargs: {width: 8}}]"))
    assert "models[0], models[1]" in msg and "'tiny_cnn'" in msg and "label" in msg
    # with labels they are two cells
    load_matrix(write_matrix(tmp_path, GOOD.replace(
        "models: [tiny_cnn]", "models: [tiny_cnn, {name: tiny_cnn, kwargs: {width: 8}, label: tiny8}]")))


@pytest.mark.parametrize("model", ["{name: tiny_cnn, kwargs: {widht: 8}}", "{name: resnet18, kwargs: {dropp: 0.1}}",
                                   "{name: tiny_cnn, kwargs: {num_classes: 3}}"])
def test_an_unknown_model_kwarg_is_refused(tmp_path, model):
    msg = matrix_error(tmp_path, GOOD.replace("models: [tiny_cnn]", f"models: [{model}]"))
    assert "models[0]" in msg and "kwargs" in msg and "keyword argument" in msg


def test_known_model_kwargs_pass(tmp_path):
    load_matrix(write_matrix(tmp_path, GOOD.replace("models: [tiny_cnn]", "models: [{name: tiny_cnn, kwargs: {width: 8}}, "
                                             "{name: resnet18, kwargs: {drop_rate: 0.1}}]")))


def test_a_missing_imagefolder_root_is_refused(tmp_path):
    msg = matrix_error(tmp_path, GOOD.replace("{name: cifar10, train_per_class: 10}",
                                          f"{{name: imagefolder, options: {{root: {tmp_path / 'nowhere'}}}}}"))
    assert "datasets[0]" in msg and "options.root" in msg and "nowhere" in msg and "does not exist" in msg


def test_a_missing_data_directory_is_refused(tmp_path, monkeypatch):
    msg = matrix_error(tmp_path, GOOD.replace("train_per_class: 10", f"options: {{root: {tmp_path / 'gone'}}}"))
    assert "datasets[0]" in msg and "options.root" in msg and "gone" in msg
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "no-data-here"))
    msg = matrix_error(tmp_path, GOOD)
    assert "datasets[0]" in msg and "HARNESS_DATA" in msg and "no-data-here" in msg
    # only where data sets are checked
    load_matrix(write_matrix(tmp_path, GOOD), check_data=False)


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../up", "a/b", "..", "a\\\\b", "''"])
def test_a_matrix_name_that_is_a_path_is_refused(tmp_path, name, capsys):
    path = write_matrix(tmp_path, f"name: {name}\n{GOOD}")
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "matrix.yaml: name:" in err and "--workdir" in err and "Traceback" not in err


def test_each_gap_exits_2_with_one_message_through_the_cli(tmp_path, capsys):
    path = write_matrix(tmp_path, GOOD.replace("{stamp: after_augment}", "{poison_rate: -0.2}"))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "matrix.yaml: attacks[0]" in err and "Traceback" not in err


# -- fuzz: random documents and mutated valid matrices through `harness validate` --------------------------

BASE = yaml.safe_load(GOOD)
SECTIONS = ["name", "datasets", "models", "attacks", "defenses", "evaluators", "seeds", "recipe"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["cifar10", "tiny_cnn", "badnets", "none", "ft", "asr",
                                                           "clean_acc", "cpu-quick", "../x", "/abs", "lmc", "qra"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(
        ["name", "config", "label", "kwargs", "options", "target", "poison_rate", "lr", "epochs", "root",
         "per_attack", "base", "train_per_class", "weight_decay"])), inner, max_size=3)), max_leaves=8)


@st.composite
def matrices(draw):
    """A mutated valid matrix (a section replaced, removed, or an entry's value replaced), or any document."""
    how = draw(st.sampled_from(["replace", "remove", "deep", "any"]))
    doc = {k: v for k, v in BASE.items()}
    if how == "any":
        return draw(values)
    key = draw(st.sampled_from(SECTIONS))
    if how == "remove":
        doc.pop(key, None)
    elif how == "replace":
        doc[key] = draw(values)
    else:
        entry = draw(st.sampled_from(["name", "config", "label", "kwargs", "options"]))
        doc[key] = [{"name": doc[key][0]} if isinstance(doc.get(key), list) and isinstance(doc[key][0], str)
                    else (doc.get(key) or [{}])[0]]
        if isinstance(doc[key][0], dict):
            doc[key][0] = {**doc[key][0], entry: draw(values)}
    return doc


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=matrices(), raw=st.booleans())
def test_fuzzed_matrix_files_validate_or_give_one_clear_message(tmp_path, capsys, doc, raw):
    text = yaml.safe_dump(doc) if not raw or not isinstance(doc, str) else doc
    path = write_matrix(tmp_path, text)
    code = cli.main(["validate", str(path)])
    out = capsys.readouterr()
    assert code in (0, 2), out
    assert "Traceback" not in out.err + out.out
    if code == 2:
        assert out.err.startswith("error: ") and str(path) in out.err
