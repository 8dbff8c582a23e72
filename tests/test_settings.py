"""vtn_tf.registration.settings: the presets, the overrides and the record beside the outputs."""

import dataclasses
import json

import pytest

from tests.conftest import REPO
from vtn_tf.io import InputError
from vtn_tf.registration import settings
from vtn_tf.registration.settings import (
    AlignmentSettings,
    NetworkSettings,
    OutputSettings,
    RefineSettings,
    RegistrationSettings,
)

# What `vtn-register --recommended` ran with for each config's register section: its words read
# as the command-line flags read them (--refine 60x60x60x60x10 -> (60, 60, 60, 60, 10); a list
# of resolutions -> floats), every other setting at its flag's default.
RECOMMENDED = {
    "brain-cpu.json": RegistrationSettings(
        AlignmentSettings(init="best", steps=50), NetworkSettings(passes=1),
        RefineSettings(steps=(60, 60, 60, 60, 10), resolution=(0.167, 0.25, 0.33, 0.5, 1.0), smoothness=1.0,
                       rate=0.5, folding=3.0, similarity="ncc", window=5, anneal=False, seconds=None)),
    "hippocampus-cpu.json": RegistrationSettings(
        AlignmentSettings(init="none", steps=50), NetworkSettings(passes=2),
        RefineSettings(steps=(40, 12), resolution=(0.5, 1.0), smoothness=1.25, folding=3.0, rate=0.5)),
}


def register_section(name):
    return json.loads((REPO / "experiments" / name).read_text())["register"]


@pytest.mark.parametrize("name", sorted(RECOMMENDED))
def test_the_accurate_preset_is_the_config_s_validated_schedule(name):
    assert settings.preset("accurate", register_section(name)) == RECOMMENDED[name]


@pytest.mark.parametrize("name", sorted(RECOMMENDED))
def test_the_optimiser_preset_differs_from_accurate_only_by_not_running_the_network(name):
    accurate, optimiser = (settings.preset(p, register_section(name)) for p in ("accurate", "optimiser"))
    assert optimiser.network.passes == 0
    assert dataclasses.replace(optimiser, network=accurate.network) == accurate


@pytest.mark.parametrize("name", sorted(RECOMMENDED))
def test_the_fast_preset_is_the_network_alone(name):
    accurate, fast = (settings.preset(p, register_section(name)) for p in ("accurate", "fast"))
    assert not fast.refine.active and fast.refine == RegistrationSettings().refine
    assert fast.alignment == accurate.alignment and fast.network == accurate.network


def test_a_model_without_a_register_section_registers_with_the_defaults(tmp_path):
    assert settings.resolve(tmp_path) == RegistrationSettings()
    (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
    lines = []
    assert settings.resolve(tmp_path, "accurate", log=lines.append) == RegistrationSettings()
    assert "recommends no test-time settings" in lines[0]


def test_overrides_take_the_words_of_the_command_line():
    changed = RegistrationSettings().with_overrides(
        ["refine.steps=60x60x20", "refine.resolution=0.25,0.5,1", "refine.rate=0.5", "refine.anneal=true",
         "network.passes=2", "network.precision=bfloat16", "alignment.init=none", "output.compression=0",
         "refine.seconds=30"])
    assert changed.refine == RefineSettings(steps=(60, 60, 20), resolution=(0.25, 0.5, 1.0), rate=0.5, anneal=True,
                                            seconds=30.0)
    assert changed.network == NetworkSettings(passes=2, precision="bfloat16")
    assert changed.alignment.init == "none" and changed.output == OutputSettings(compression=0)


@pytest.mark.parametrize("item, problem", [
    ("refine.speed=2", "unknown setting 'refine.speed'"), ("passes=2", "section.field=value"),
    ("network.passes=1.5", "whole number"), ("refine.steps=60x-1", ">= 0"), ("alignment.init=sideways", "one of"),
    ("output.compression=12", "gzip level"), ("refine.window=4", "odd"), ("refine.anneal=maybe", "true or false"),
])
def test_a_bad_override_is_a_user_error_naming_it(tmp_path, item, problem):
    with pytest.raises(InputError, match=problem):
        settings.resolve(tmp_path, "accurate", [item])


def test_the_record_repeats_the_registration_exactly():
    accurate = settings.preset("accurate", register_section("hippocampus-cpu.json"))
    chosen = accurate.with_overrides(["output.inverse=true"])
    record = json.loads(json.dumps(chosen.to_json()))
    assert RegistrationSettings.from_json(record) == chosen


def test_an_unknown_preset_or_register_word_is_refused(tmp_path):
    with pytest.raises(InputError, match="preset must be one of"):
        settings.resolve(tmp_path, "slow")
    (tmp_path / "config.json").write_text(json.dumps({"register": {"refine_speed": 2}}))
    with pytest.raises(InputError, match="refine_speed"):
        settings.resolve(tmp_path)
