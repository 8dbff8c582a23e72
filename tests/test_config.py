import json

import pytest

from vtn_tf.training import config as config_lib


def test_defaults_are_the_paper_schedule():
    config = config_lib.load_config()
    assert config["train"]["learning_rate"] == 1e-4
    assert config["train"]["batch_size"] == 8
    assert config["train"]["epochs"] * config["train"]["steps_per_epoch"] == 100000
    assert config["model"]["spec"] == "ADDD"


def test_learning_rate_halves_every_epoch_after_the_fourth():
    config = config_lib.load_config(overrides=["train.steps_per_epoch=10"])
    rates = [config_lib.learning_rate_at(config, step) for step in (0, 39, 40, 49, 50)]
    assert rates == [1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5]


# A small config: 1e-3, 3 steps per epoch, halving after epoch 2 (epochs count from 1).
SMALL_SCHEDULE = ["train.learning_rate=0.001", "train.steps_per_epoch=3", "train.halve_after_epoch=2"]
SMALL_RATES = {0: 1e-3, 2: 1e-3, 3: 1e-3, 5: 1e-3, 6: 5e-4, 8: 5e-4, 9: 2.5e-4, 11: 2.5e-4, 12: 1.25e-4,
               30: 1.953125e-6}


def test_learning_rate_schedule_of_a_small_config():
    config = config_lib.load_config(overrides=SMALL_SCHEDULE)
    assert {step: config_lib.learning_rate_at(config, step) for step in SMALL_RATES} == SMALL_RATES


def test_overrides_parse_json_and_strings():
    config = config_lib.load_config(overrides=["train.batch_size=2", "model.spec=ADD",
                                               "model.similarity_weights=[1, 0, 1]"])
    assert config["train"]["batch_size"] == 2
    assert config["model"]["spec"] == "ADD"
    assert config["model"]["similarity_weights"] == [1, 0, 1]


@pytest.mark.parametrize("override, message", [
    ("train.batchsize=2", "unknown field train.batchsize"),
    ("optimiser.rate=1", "unknown section"),
    ("model.spec=DA", "model.spec"),
    ("model.spec=AA", "model.spec"),
    ("train.batch_size=0", "positive integer"),
    ("train.on_nonfinite=ignore", "on_nonfinite"),
    ("batch_size=2", "section.field=value"),
    ("data.scale=1.0", "data.scale"),
    ("data.rotation_degrees=200", "data.rotation_degrees"),
    ("data.translation_mm=-5", "data.translation_mm"),
    ("data.shear=\"a lot\"", "data.shear"),
    ("data.affine_augment=1", "data.affine_augment"),
])
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load_config(overrides=[override])


def test_extends_and_file_errors(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"model": {"spec": "ADD"}, "train": {"batch_size": 4}}))
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"extends": "base.json", "train": {"batch_size": 2}}))
    config = config_lib.load_config(child)
    assert (config["model"]["spec"], config["train"]["batch_size"]) == ("ADD", 2)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(config_lib.ConfigError, match="not valid JSON"):
        config_lib.load_config(tmp_path / "bad.json")
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config(tmp_path / "missing.json")
    (tmp_path / "typo.json").write_text(json.dumps({"model": {"spex": "D"}}))
    with pytest.raises(config_lib.ConfigError, match="unknown field model.spex"):
        config_lib.load_config(tmp_path / "typo.json")


def test_every_shipped_experiment_loads():
    import pathlib
    for path in sorted(pathlib.Path(__file__).parents[1].glob("experiments/*.json")):
        config = config_lib.load_config(path)
        assert config["model"]["spec"]


def test_affine_augmentation_defaults_off_with_ranges():
    data = config_lib.load_config()["data"]
    assert data["affine_augment"] is False
    assert (data["rotation_degrees"], data["scale"], data["shear"], data["translation_mm"]) == (
        15.0, 0.1, 0.05, 20.0)
    assert config_lib.load_config(overrides=["data.affine_augment=true", "data.scale=0"])[
        "data"]["affine_augment"] is True


def test_affine_augmentation_in_the_shipped_experiments():
    import pathlib
    folder = pathlib.Path(__file__).parents[1] / "experiments"
    for path in folder.glob("paper-*.json"):  # the paper's setup: B-spline augmentation only
        assert config_lib.load_config(path)["data"]["affine_augment"] is False, path.name
    for name in ("brain-cpu.json", "brain-accuracy.json", "brain-accuracy-cc.json"):
        assert config_lib.load_config(folder / name)["data"]["affine_augment"] is True, name
