"""npe2 sample data: the built-in sample (:mod:`napari_smsdl.sample`) as three layers in µm.

All three cover the same field of view (1280 µm × 1280 µm) and share its top-left corner, so
they overlay exactly: the H&E at 2.5 µm, the measured low-resolution MSI at 40 µm and the
ground truth on the super-resolution grid at 10 µm (see :func:`napari_smsdl._reader.grid_placement`).
The MSI holds ion counts and the ground truth is a separate, noisy 10 µm acquisition on the same
count scale; some ions follow the stained compartments and some do not (see :mod:`napari_smsdl.sample`).
"""

from __future__ import annotations

from ._reader import LayerDataTuple, he_layer, ion_stack_layer


def smsdl_sample() -> list[LayerDataTuple]:
    """The built-in sample: H&E (RGB), MSI (5, 32, 32) and ground truth (5, 128, 128)."""
    from .sample import make_sample

    sample = make_sample()
    names = [f"m/z {mz:.4f} {name}" for mz, name in zip(sample.mz, sample.channel_names, strict=True)]
    sr_pixel_size_um = sample.msi_pixel_size_um / sample.factor
    common = {"source_path": None, "sample": "smsdl_sample", "factor": sample.factor}
    return [
        he_layer(sample.he_rgb, sample.he_pixel_size_um, name="sample H&E", metadata=common),
        ion_stack_layer(
            sample.msi,
            names,
            sample.msi_pixel_size_um,
            name=f"sample MSI ({sample.msi_pixel_size_um:g} µm)",
            mz=sample.mz,
            metadata=dict(common, kind="measured"),
        ),
        _hidden(
            ion_stack_layer(
                sample.ground_truth,
                names,
                sr_pixel_size_um,
                name=f"sample ground truth ({sr_pixel_size_um:g} µm)",
                mz=sample.mz,
                metadata=dict(common, kind="ground_truth", role="reference"),
            )
        ),
    ]


def _hidden(layer: LayerDataTuple) -> LayerDataTuple:
    data, kwargs, layer_type = layer
    return data, dict(kwargs, visible=False), layer_type
