"""The npe2 manifest: valid, importable, with the contributions the docs promise."""

from __future__ import annotations

from npe2 import PluginManifest


def test_manifest_contributions_import():
    manifest = PluginManifest.from_distribution("napari-smsdl")
    manifest.validate_imports()  # every python_name resolves
    contrib = manifest.contributions
    assert {"*.imzML", "*.imzml"} <= set(contrib.readers[0].filename_patterns)
    assert [s.key for s in contrib.sample_data] == ["smsdl_sample"]
    names = {w.display_name for w in contrib.widgets}
    assert {"Load", "Register", "Train", "Compare", "Export & project"} <= names  # the single widgets stay
    flow = next(w for w in contrib.widgets if w.display_name == "SMSDL flow (all steps, one dock)")
    assert next(c for c in contrib.commands if c.id == flow.command).python_name == "napari_smsdl.widgets.flow:FlowWidget"
    ids = {c.id for c in contrib.commands}
    assert all(c.id.startswith("napari-smsdl.") for c in contrib.commands) and len(ids) == len(contrib.commands)
