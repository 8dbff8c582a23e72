"""vtn_tf.preprocessing.preparation: the input contract, and data_prep and registration preparing alike."""

import json

import numpy as np
import pytest
from scipy import ndimage

from data_prep import prepare
from vtn_tf import io
from vtn_tf.preprocessing import preparation
from vtn_tf.registration import inputs


def brainish(shape=(70, 80, 60), seed=0):
    """A bright ellipsoid with texture on a zero background, off-centre."""
    rng = np.random.default_rng(seed)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    inside = np.sum(((index - [38, 36, 28]) / [22, 26, 18]) ** 2, -1) <= 1
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return (inside * (200 + 300 * (texture - texture.min()) / np.ptp(texture))).astype(np.float32)


def test_percentile_map_and_histogram_matching_against_numpy():
    data = brainish()
    contract = preparation.InputContract(modality="MRI", grid=(64, 64, 64), reference_quantiles=None)
    mapping, mask = preparation.fit_intensity(data, contract)
    low, high = np.percentile(data, [0.5, 99.5])
    np.testing.assert_allclose(mapping(data), np.clip((data - low) / (high - low), 0, 1), atol=1e-6)
    np.testing.assert_array_equal(mask, np.clip((data - low) / (high - low), 0, 1) > 0.1)
    # Matching to a reference: the matched foreground's quantiles are the reference's.
    reference = np.linspace(0.2, 0.9, 101)
    matched, mask = preparation.fit_intensity(data, contract, reference)
    out = matched(data)
    np.testing.assert_allclose(np.quantile(out[mask], [0.1, 0.5, 0.9]), np.interp([0.1, 0.5, 0.9],
                               np.linspace(0, 1, 101), reference), atol=0.01)


def test_ct_window_and_foreground_crop_use_no_labels():
    hounsfield = np.full((40, 40, 40), -1000.0, np.float32)
    hounsfield[10:30, 12:28, 5:35] = 40.0
    contract = preparation.InputContract(modality="CT", grid=(64, 64, 64), margin_mm=2.0)
    mapping, _ = preparation.fit_intensity(hounsfield, contract)
    np.testing.assert_allclose(mapping(np.array([-1000.0, -25.0, 120.0, 265.0, 400.0])), [0, 0, 0.5, 1, 1])
    low, high = preparation.crop_box(hounsfield, (1.0, 1.0, 2.0), contract)
    np.testing.assert_array_equal(low, [8, 10, 4])
    np.testing.assert_array_equal(high, [32, 30, 36])


def test_contract_round_trip_and_label_crops_refused(tmp_path):
    contract = preparation.InputContract(modality="MRI", grid=(64, 64, 64),
                                         reference_quantiles=tuple(np.linspace(0, 1, 101)))
    path = tmp_path / "preprocessing.json"
    path.write_text(json.dumps(contract.to_json()))
    again = preparation.InputContract.from_json(json.loads(path.read_text()))
    assert again.grid == (64, 64, 64) and again.crop == "foreground"
    np.testing.assert_allclose(again.reference_quantiles, contract.reference_quantiles, atol=1e-6)
    with pytest.raises(ValueError, match="cropped around labels"):
        preparation.contract_from_settings({"crop": "labels", "modality": "CT"}, (64, 64, 64))
    with pytest.raises(ValueError, match="not an input contract"):
        preparation.InputContract.from_json({"grid": [64, 64, 64]})


def test_registration_prepares_a_scan_exactly_as_data_prep_did():
    """One implementation: data_prep's crop + scipy resampling + intensity map and
    registration's crop + TensorFlow resampling + the same map give the same volume."""
    data = brainish()
    affine = np.diag([1.2, 1.0, 1.5, 1.0])
    reference = tuple(np.linspace(0.15, 0.95, 101))
    contract = preparation.InputContract(modality="MRI", grid=(64, 64, 64), reference_quantiles=reference)
    settings = prepare.Settings(layout="folder", input=".", output=".", modality="MRI", grid=(64, 64, 64),
                                crop="foreground")
    volume = io.Volume(data, affine, (1.2, 1.0, 1.5), "scan.nii.gz")
    box = prepare.crop_box(volume, None, settings, "scan")
    expected = prepare.resample(data, box, settings.grid, order=1)
    expected = preparation.fit_intensity(expected, prepare.contract_of(settings), reference)[0](expected)
    mine, G, _ = inputs.prepare_image(volume, contract, "fixed image")
    np.testing.assert_allclose(G, preparation.grid_map(box, (64, 64, 64)))
    np.testing.assert_allclose(mine, expected, atol=2e-3)
