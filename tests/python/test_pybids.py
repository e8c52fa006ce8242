"""Downstream reading: chimap's OUTPUT_DIR opened with pybids, as a derivative dataset.

Run with pytest. The chimap binary is $CHIMAP, else target/release/chimap, else `chimap` on
PATH. With $CHIMAP_OUTPUT_DIR set (and $CHIMAP_BIDS_DIR, default bids/example) the test reads
that existing output instead of running chimap on bids/example itself.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from bids import BIDSLayout

REPO = Path(__file__).resolve().parents[2]


def chimap_binary():
    if os.environ.get("CHIMAP"):
        return os.environ["CHIMAP"]
    built = REPO / "target" / "release" / "chimap"
    if built.is_file():
        return str(built)
    found = shutil.which("chimap")
    if not found:
        pytest.fail("no chimap binary: build it (cargo build --release) or set $CHIMAP")
    return found


def run(*args):
    done = subprocess.run([chimap_binary(), *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, f"chimap {' '.join(map(str, args))} failed:\n{done.stderr}"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(raw dataset, chimap output) for bids/example."""
    raw = Path(os.environ.get("CHIMAP_BIDS_DIR", REPO / "bids" / "example"))
    if os.environ.get("CHIMAP_OUTPUT_DIR"):
        return raw, Path(os.environ["CHIMAP_OUTPUT_DIR"])
    out = tmp_path_factory.mktemp("example") / "chimap"
    run(raw, out, "participant", "--nthreads", "2")
    return raw, out


@pytest.fixture(scope="module")
def with_sessions(tmp_path_factory):
    """(raw dataset, chimap output) for a tiny simulated dataset with two sessions."""
    root = tmp_path_factory.mktemp("sessions")
    raw, out = root / "raw", root / "chimap"
    run("simulate", raw, "--subjects", "1", "--sessions", "2", "--dims", "24", "24", "16",
        "--voxel-size", "4", "4", "4", "--echo-times", "4", "8", "12", "--seed", "3")
    run(raw, out, "participant", "--nthreads", "2")
    return raw, out


def acquisitions(raw):
    """(subject, session, acquisition) of every phase series in the raw dataset."""
    layout = BIDSLayout(raw, validate=False)
    phase = layout.get(part="phase", suffix="MEGRE", extension=".nii.gz")
    assert phase, f"no part-phase MEGRE series in {raw}"
    return {(f.entities["subject"], f.entities.get("session"), f.entities.get("acquisition"))
            for f in phase}


def check_chimaps(raw, out):
    expected = acquisitions(raw)
    # Standalone derivative dataset.
    layout = BIDSLayout(out, validate=False, is_derivative=True)
    maps = layout.get(suffix="Chimap", extension=".nii.gz")
    found = set()
    for m in maps:
        e = m.entities
        assert e["datatype"] == "anat", m.path
        assert e["desc"] == "tkd", m.path
        assert m.get_metadata()["Units"] == "ppm", m.path
        found.add((e["subject"], e.get("session"), e.get("acquisition")))
    assert found == expected, f"Chimaps for {sorted(found, key=str)}, acquisitions {sorted(expected, key=str)}"
    assert len(maps) == len(expected), "one Chimap per acquisition"

    # The same maps reached from the raw dataset, with OUTPUT_DIR attached as derivatives.
    joined = BIDSLayout(raw, validate=False, derivatives=str(out))
    names = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]["Name"]
    via_raw = joined.get(scope=names, suffix="Chimap", extension=".nii.gz")
    assert sorted(f.path for f in via_raw) == sorted(f.path for f in maps)
    # Every Chimap has its local field map and masks beside it, with units.
    for m in maps:
        e = {k: v for k, v in m.entities.items() if k in ("subject", "session", "acquisition")}
        local = layout.get(desc="local", suffix="fieldmap", extension=".nii.gz", **e)
        assert len(local) == 1 and local[0].get_metadata()["Units"] == "ppm", m.path
        masks = {f.entities["desc"] for f in layout.get(suffix="mask", extension=".nii.gz", **e)}
        assert {"brain", "eroded"} <= masks, f"{m.path}: masks {masks}"
    return maps


def test_example_output_reads_as_a_derivative_dataset(example):
    maps = check_chimaps(*example)
    assert all(m.entities.get("session") is None for m in maps)


def test_sessions_are_entities_of_the_maps(with_sessions):
    maps = check_chimaps(*with_sessions)
    assert {m.entities["session"] for m in maps} == {"1", "2"}
