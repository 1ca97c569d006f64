"""imzML reading: round trips in both modes, ion images against pyimzML, and every bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from pyimzml.ImzMLParser import ImzMLParser, getionimage

from napari_smsdl.errors import ImzMLError
from napari_smsdl.io import make_windows, open_imzml, parse_tolerance, write_imzml


def test_round_trip_grid_mode_and_metadata(imzml_file):
    path, mode, spectra = imzml_file
    ds = open_imzml(path)
    assert ds.mode == mode
    assert ds.shape == (6, 8)
    assert ds.n_spectra == len(spectra) == 47
    assert ds.pixel_size_um == 20.0
    assert not ds.mask[2, 3] and ds.mask.sum() == 47
    spec = ds.spectrum(5)
    np.testing.assert_allclose(spec.mz, spectra[5][2])
    np.testing.assert_allclose(spec.intensity, spectra[5][3])


def test_ion_images_match_pyimzml_getionimage(imzml_file):
    path, _, _ = imzml_file
    ds = open_imzml(path)
    centres = [500.0, 650.0, 750.0]
    ours = ds.ion_images(centres, "0.3da").data
    parser = ImzMLParser(str(path))
    for k, mz in enumerate(centres):
        reference = getionimage(parser, mz, tol=0.3)
        acquired = ds.mask
        np.testing.assert_allclose(ours[k][acquired], reference[acquired], rtol=1e-5)
        assert np.isnan(ours[k][~acquired]).all()  # not acquired: NaN, never a silent 0


def test_planted_ion_image_rows_are_y_minus_one(imzml_file):
    path, mode, _ = imzml_file
    ds = open_imzml(path)
    image = ds.ion_images([500.0], "1ppm").data[0]
    rows, cols = np.mgrid[0:6, 0:8]
    expected = 100.0 + rows * 10 + cols
    if mode == "continuous":  # 500.0 is not on the shared axis exactly: window of 1 ppm is empty
        image = ds.ion_images([500.0], "0.6da").data[0]
        assert np.nanmin(image) >= 0
    else:
        acquired = ds.mask
        np.testing.assert_allclose(image[acquired], expected[acquired])


def test_tic_and_normalisation(imzml_file):
    path, _, spectra = imzml_file
    ds = open_imzml(path)
    tic = ds.tic_image()
    for row, col, _, intensity in spectra[:5]:
        assert tic[row, col] == pytest.approx(float(np.sum(intensity)), rel=1e-5)
    raw = ds.ion_images([750.0], "0.5da").data[0]
    tic_norm = ds.ion_images([750.0], "0.5da", norm="tic").data[0]
    ratio = tic_norm / raw
    finite = np.isfinite(ratio) & (raw > 0)
    # dividing by TIC: ratio * TIC is the same constant (the median TIC) for every pixel
    np.testing.assert_allclose((ratio * tic)[finite], np.median(tic[np.isfinite(tic)]), rtol=1e-4)
    rms = ds.ion_images([750.0], "0.5da", norm="rms").data[0]
    assert np.isfinite(rms[ds.mask]).all() and not np.allclose(rms[finite], raw[finite])


def test_mean_spectrum_and_peak_picking(tmp_path):
    rng = np.random.default_rng(1)
    planted = np.array([600.1234, 700.5, 812.25])
    spectra = []
    for row in range(5):
        for col in range(5):
            mz = np.sort(np.concatenate([planted * (1 + rng.normal(0, 1e-6, 3)), rng.uniform(500, 900, 20)]))
            intensity = np.where(np.isin(np.round(mz), np.round(planted)), 1000.0, rng.uniform(0, 5, len(mz)))
            spectra.append((row, col, mz, intensity.astype(np.float32)))
    ds = open_imzml(write_imzml(tmp_path / "peaks.imzML", spectra, mode="processed"))
    peaks = ds.pick_peaks(3)
    np.testing.assert_allclose(peaks, planted, rtol=5e-6)
    mean = ds.mean_spectrum()
    near = np.abs(mean.mz - planted[0]) / planted[0] < 10e-6  # the peak may straddle two bins
    assert mean.intensity[near].sum() == pytest.approx(1000.0, rel=0.01)


def test_chunked_reading_equals_single_chunk(imzml_file, monkeypatch):
    path, _, _ = imzml_file
    whole = open_imzml(path).ion_images([500.0, 750.0], "0.5da").data
    import napari_smsdl.io._imzml as msi

    monkeypatch.setattr(msi, "CHUNK_BYTES", 64)  # forces one spectrum per chunk
    chunked = open_imzml(path).ion_images([500.0, 750.0], "0.5da").data
    np.testing.assert_array_equal(np.isnan(whole), np.isnan(chunked))
    np.testing.assert_allclose(np.nan_to_num(whole), np.nan_to_num(chunked), rtol=1e-6)


@pytest.mark.parametrize(
    "text, expected",
    [("10ppm", (10.0, "ppm")), ("0.01da", (0.01, "da")), ("5 mDa", (0.005, "da")), (0.2, (0.2, "da"))],
)
def test_parse_tolerance(text, expected):
    value, unit = parse_tolerance(text)
    assert value == pytest.approx(expected[0]) and unit == expected[1]


def test_windows_in_ppm_and_da():
    (w,) = make_windows([1000.0], "10ppm")
    assert (w.low, w.high) == pytest.approx((999.99, 1000.01))
    (w,) = make_windows([1000.0], "0.5da")
    assert (w.low, w.high) == pytest.approx((999.5, 1000.5))
    with pytest.raises(ValueError, match="tolerance"):
        make_windows([1000.0], "ten ppm")


# ---------------------------------------------------------------------- bad input
def _copy(path, tmp_path, name="copy"):
    dest = tmp_path / name
    dest.mkdir()
    shutil.copy(path, dest / path.name)
    shutil.copy(path.with_suffix(".ibd"), dest / path.with_suffix(".ibd").name)
    return dest / path.name


def test_missing_ibd(imzml_file, tmp_path):
    path = _copy(imzml_file[0], tmp_path)
    path.with_suffix(".ibd").unlink()
    with pytest.raises(ImzMLError, match=r"\.ibd not found") as info:
        open_imzml(path)
    assert path.name in str(info.value)


def test_truncated_ibd(imzml_file, tmp_path):
    path = _copy(imzml_file[0], tmp_path)
    ibd = path.with_suffix(".ibd")
    ibd.write_bytes(ibd.read_bytes()[:-100])
    with pytest.raises(ImzMLError, match="truncated") as info:
        open_imzml(path)
    assert path.name in str(info.value)


def test_uuid_mismatch(imzml_file, tmp_path):
    path = _copy(imzml_file[0], tmp_path)
    ibd = path.with_suffix(".ibd")
    data = bytearray(ibd.read_bytes())
    data[:16] = bytes(range(16))
    ibd.write_bytes(bytes(data))
    with pytest.raises(ImzMLError, match="UUID mismatch"):
        open_imzml(path)


def test_malformed_xml(imzml_file, tmp_path):
    path = _copy(imzml_file[0], tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # cut in the middle of the XML
    with pytest.raises(ImzMLError, match="malformed") as info:
        open_imzml(path)
    assert str(path) in str(info.value)


def test_empty_and_missing_file(tmp_path):
    empty = tmp_path / "empty.imzML"
    empty.touch()
    with pytest.raises(ImzMLError, match="empty file"):
        open_imzml(empty)
    with pytest.raises(ImzMLError, match="not found"):
        open_imzml(tmp_path / "nope.imzML")


def test_coordinates_out_of_range(imzml_file, tmp_path):
    path = _copy(imzml_file[0], tmp_path)
    text = path.read_text()
    text = text.replace('name="position x" value="1"', 'name="position x" value="0"', 1)
    path.write_text(text)
    with pytest.raises(ImzMLError, match="out of range"):
        open_imzml(path)


def test_coordinates_beyond_declared_grid(imzml_file, tmp_path):
    path = _copy(imzml_file[0], tmp_path)
    text = path.read_text().replace('name="max count of pixels x" value="8"', 'name="max count of pixels x" value="5"')
    path.write_text(text)
    with pytest.raises(ImzMLError, match="out of range"):
        open_imzml(path)


@pytest.mark.parametrize("layout", ["strided", "variable", "unaligned", "out_of_order"])
def test_gather_paths_agree(layout):
    from napari_smsdl.io._imzml import _gather

    rng = np.random.default_rng(0)
    lengths = np.full(5, 4) if layout == "strided" else rng.integers(0, 7, 5)
    values = [rng.normal(size=n) for n in lengths]
    gap = 3 if layout == "unaligned" else 8
    buf, offsets = bytearray(), []
    for v in values:
        buf += b"\0" * (gap if layout == "unaligned" else 8)
        offsets.append(len(buf))
        buf += v.astype(np.float64).tobytes()
    offsets = np.array(offsets)
    if layout == "out_of_order":
        order = np.array([2, 0, 4, 1, 3])
        offsets, lengths, values = offsets[order], lengths[order], [values[i] for i in order]
    got = _gather(bytes(buf), offsets, lengths, np.float64)
    np.testing.assert_array_equal(got, np.concatenate(values))


def test_overlapping_windows_are_each_summed(imzml_file):
    path, _, _ = imzml_file
    ds = open_imzml(path)
    wide, narrow = ds.ion_images([500.0], "1da").data[0], ds.ion_images([500.2], "0.5da").data[0]
    both = ds.ion_images([500.0, 500.2], "1da").data
    np.testing.assert_allclose(both[0], wide, equal_nan=True)
    assert np.nanmax(np.abs(both[1] - ds.ion_images([500.2], "1da").data[0])) == 0
    assert narrow.shape == wide.shape


def test_peaks_outside_all_windows_never_count(tmp_path):
    """Peaks below the lowest and above the highest window must not leak in through the lookup table."""
    spectra = [(0, 0, np.array([100.0, 500.0, 900.0]), np.array([7.0, 1.0, 9.0], np.float32)),
               (0, 1, np.array([499.0, 501.0]), np.array([3.0, 4.0], np.float32))]
    ds = open_imzml(write_imzml(tmp_path / "edges.imzML", spectra, mode="processed"))
    image = ds.ion_images([500.0, 501.0], "0.001da").data
    np.testing.assert_array_equal(image[:, 0, :], [[1.0, 0.0], [0.0, 4.0]])


def test_mz_outside_the_files_range_is_refused_with_the_range(imzml_file):
    from napari_smsdl.errors import InputError

    path = imzml_file[0]
    ds = open_imzml(path)
    low, high = ds.mz_range
    with pytest.raises(InputError, match=r"outside the file's m/z range") as err:
        ds.ion_images([high + 50.0], "10ppm")
    assert f"{low:.4f}" in str(err.value) and path.name in str(err.value)
    inside = ds.ion_images([(low + high) / 2], "10ppm")  # inside the range: allowed even where it is empty
    assert inside.data.shape[0] == 1
    with pytest.raises(InputError, match="tolerance must be positive .*got '-5ppm'"):
        ds.ion_images([low], "-5ppm")
    with pytest.raises(InputError, match="tolerance must be positive"):
        ds.ion_images([low], "0ppm")


def _write_typed(path, values, dtype, mode="processed"):
    """An imzML whose intensities are stored as ``dtype`` (pyimzML's writer, which takes intensity_dtype)."""
    from pyimzml.ImzMLWriter import ImzMLWriter

    mz = np.array([100.0, 200.0, 300.0])
    with ImzMLWriter(str(path), intensity_dtype=dtype, mode=mode) as writer:
        for i, v in enumerate(values):
            writer.addSpectrum(mz, np.asarray(v, dtype), (i + 1, 1))
    return mz


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("mode", ["processed", "continuous"])
def test_every_intensity_type_pyimzml_writes_reads_its_values(tmp_path, dtype, mode):
    values = [[3, 7, 120], [0, 9, 2047]]
    _write_typed(tmp_path / "t.imzML", values, dtype, mode)
    ds = open_imzml(tmp_path / "t.imzML")
    assert ds.intensity_dtype == np.dtype(dtype)
    for i, v in enumerate(values):
        np.testing.assert_array_equal(ds.spectrum(i).intensity, v)
    np.testing.assert_array_equal(ds.ion_images([300.0], "0.5da").data[0], [[120, 2047]])


@pytest.mark.parametrize(("name", "accession", "dtype"), [("16-bit integer", "IMS:1100001", "<i2"),
                                                         ("8-bit integer", "IMS:1100000", "<i1")])
def test_small_integer_intensities_read_their_values_not_float32_garbage(tmp_path, name, accession, dtype):
    """Issue 16 item 8: a "16-bit integer" file read as float32 gave values like 3.3e-32.

    pyimzML's writer cannot write 8/16-bit integers, so a 16-bit float file (same item size for
    16 bits) is written and its intensity bytes and declaration rewritten as the standard spells them.
    """
    import re

    values = [np.array([3, -7, 120], dtype), np.array([5, 9, 100], dtype)]
    path = tmp_path / "t.imzML"
    size = np.dtype(dtype).itemsize
    _write_typed(path, [v.astype(np.float16) for v in values], np.float16)
    parser = ImzMLParser(str(path))
    ibd = bytearray(path.with_suffix(".ibd").read_bytes())
    for offset, v in zip(parser.intensityOffsets, values):
        ibd[offset : offset + 2 * len(v)] = b"\0" * 2 * len(v)
        ibd[offset : offset + size * len(v)] = v.tobytes()
    path.with_suffix(".ibd").write_bytes(bytes(ibd))
    xml = path.read_text()
    xml = xml.replace('accession="MS:1000520" name="16-bit float"', f'accession="{accession}" name="{name}"')
    if size == 1:  # one byte per value: the encoded lengths halve
        xml = re.sub(r'(name="encoded length" value=")(\d+)"', lambda m: f'{m.group(1)}{int(m.group(2)) // 2}"', xml)
    path.write_text(xml)
    ds = open_imzml(path)
    assert ds.intensity_dtype == np.dtype(dtype)
    for i, v in enumerate(values):
        np.testing.assert_array_equal(ds.spectrum(i).intensity, v)
    np.testing.assert_array_equal(ds.tic_image(), [[116, 114]])


def test_an_unsupported_intensity_type_is_refused_by_name(tmp_path):
    path = tmp_path / "t.imzML"
    _write_typed(path, [[1, 2, 3]], np.float32)
    path.write_text(path.read_text().replace('accession="MS:1000521" name="32-bit float"',
                                             'accession="IMS:9999999" name="12-bit integer"'))
    with pytest.raises(ImzMLError, match="intensity array data type '12-bit integer' is not supported") as err:
        open_imzml(path)
    assert str(path) in str(err.value) and "16-bit integer" in str(err.value)
