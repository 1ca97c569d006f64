"""The npe2 manifest: valid, importable, with the contributions the docs promise."""

from __future__ import annotations

from npe2 import PluginManifest


def test_manifest_contributions_import():
    manifest = PluginManifest.from_distribution("napari-smsdl")
    manifest.validate_imports()  # every python_name resolves
    contrib = manifest.contributions
    assert {"*.imzML", "*.imzml"} <= set(contrib.readers[0].filename_patterns)
    assert [s.key for s in contrib.sample_data] == ["smsdl_sample"]
    assert {"Load", "Register", "Train", "Compare", "Export & project"} <= {w.display_name for w in contrib.widgets}
    ids = {c.id for c in contrib.commands}
    assert all(c.id.startswith("napari-smsdl.") for c in contrib.commands) and len(ids) == len(contrib.commands)
