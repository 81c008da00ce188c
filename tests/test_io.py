"""Model folders: manifest, checks on loading, migration, safe replacement (pyro_scvi.io,
pyro_scvi.io.files)."""

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import SCVI, InputError, io
from pyro_scvi.io import ModelFileError, files
from pyro_scvi.io.files import OutputError

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def adata():
    return synthetic_zinb(n_cells=80, n_genes=12, n_batches=2, seed=1)


@pytest.fixture(scope="module")
def trained(adata):
    return SCVI(adata, batch_key="batch", n_latent=2, n_hidden=8).train(
        1, batch_size=32, progress_bar=False
    )


@pytest.fixture
def saved(trained, tmp_path):
    trained.save(tmp_path / "m")
    return tmp_path / "m"


# ----------------------------------------------------------------------------- manifest


def test_save_writes_a_versioned_manifest(trained, saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format"] == "pyro_scvi model"
    assert manifest["format_version"] == io.FORMAT_VERSION == 1
    assert manifest["package_version"] == io.package_version()
    assert manifest["kind"] == "model" and manifest["engine"] == trained.engine
    assert manifest["settings"] == trained.settings
    assert manifest["n_genes"] == 12 and manifest["batch_categories"] == ["batch0", "batch1"]
    entry = manifest["files"]["model.pt"]
    assert entry["bytes"] == (saved / "model.pt").stat().st_size and len(entry["sha256"]) == 64
    assert SCVI.load(saved, trained.adata, device="cpu").manifest["run_id"] == manifest["run_id"]


def test_a_model_of_the_previous_format_is_migrated():
    """tests/data/model_format0 was written by the code before manifests (see its README)."""
    adata = synthetic_zinb(n_cells=60, n_genes=12, n_batches=2, seed=3)
    assert sorted(p.name for p in (DATA / "model_format0").iterdir()) == [
        "model.pt",
        "settings.json",
    ]
    model = SCVI.load(DATA / "model_format0", adata, device="cpu")
    assert model.manifest["format_version"] == 0
    assert model.is_trained and len(model.history) == 2
    np.testing.assert_allclose(
        model.get_latent_representation(),
        np.load(DATA / "model_format0_latent.npy"),
        rtol=1e-5,
        atol=1e-6,
    )
    # our own old folder counts as ours: a new save may replace it
    assert io.is_model_dir(DATA / "model_format0")


def test_saving_over_an_old_format_folder_upgrades_it(tmp_path):
    adata = synthetic_zinb(n_cells=60, n_genes=12, n_batches=2, seed=3)
    old = tmp_path / "old"
    shutil.copytree(DATA / "model_format0", old)
    model = SCVI.load(old, adata, device="cpu")
    model.save(old, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == ["manifest.json", "model.pt"]
    assert SCVI.load(old, adata, device="cpu").manifest["format_version"] == 1


# ------------------------------------------------------------------ damaged and foreign


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_truncate, id="truncated"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_text("just some text\n"), id="text"),
    ],
)
@pytest.mark.parametrize("with_manifest", [True, False])
def test_a_damaged_model_file_gives_one_clear_error(saved, adata, damage, with_manifest):
    if not with_manifest:  # an old-format folder has no checksum to catch it
        (saved / "manifest.json").unlink()
    damage(saved / "model.pt")
    with pytest.raises(ModelFileError, match="damaged") as info:
        SCVI.load(saved, adata, device="cpu")
    assert "\n" not in str(info.value)


def test_a_foreign_manifest(saved, adata):
    (saved / "manifest.json").write_text(json.dumps({"format": "keras model", "version": 3}))
    with pytest.raises(ModelFileError, match="not a pyro_scvi model folder"):
        SCVI.load(saved, adata, device="cpu")
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="damaged"):
        SCVI.load(saved, adata, device="cpu")


def test_a_foreign_model_file_without_manifest(tmp_path, adata):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(3)}}, folder / "model.pt")
    with pytest.raises(ModelFileError, match="not a pyro_scvi model"):
        SCVI.load(folder, adata, device="cpu")
    torch.save(torch.zeros(3), folder / "model.pt")
    with pytest.raises(ModelFileError, match="not a pyro_scvi model"):
        SCVI.load(folder, adata, device="cpu")


def test_a_future_format_asks_to_upgrade(saved, adata):
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest.update(format_version=io.FORMAT_VERSION + 1, package_version="9.0")
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"pyro_scvi 9\.0 in model format 2.*Upgrade"):
        SCVI.load(saved, adata, device="cpu")


def _rewrite(folder, edit):
    """Edit model.pt's payload and write it back with a valid manifest (a consistent but
    wrong file, as another program or a hand edit would leave)."""
    state = torch.load(folder / "model.pt", weights_only=False)
    edit(state)
    shutil.rmtree(folder)
    folder.mkdir()
    io.write_model_dir(folder, state, manifest={})


def test_missing_settings_keys(saved, adata):
    _rewrite(saved, lambda s: s["settings"].pop("n_hidden"))
    with pytest.raises(ModelFileError, match=r"lack \['n_hidden'\]"):
        SCVI.load(saved, adata, device="cpu")


def test_missing_state_keys(saved, adata):
    _rewrite(saved, lambda s: s.pop("guide_state"))
    with pytest.raises(ModelFileError, match="guide_state"):
        SCVI.load(saved, adata, device="cpu")


def test_another_architecture(saved, adata):
    _rewrite(saved, lambda s: s["settings"].update(n_hidden=16))
    with pytest.raises(ModelFileError, match="do not fit the architecture"):
        SCVI.load(saved, adata, device="cpu")


def test_a_folder_without_a_model(tmp_path, adata):
    with pytest.raises(ModelFileError, match="No saved model"):
        SCVI.load(tmp_path, adata, device="cpu")
    with pytest.raises(ModelFileError, match="No saved model"):
        SCVI.load(tmp_path / "missing", adata, device="cpu")


# --------------------------------------------------------------- replacing folders safely


def test_save_never_replaces_a_folder_holding_other_files(trained, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write.*notes.txt"):
        trained.save(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    # a model folder to which the user added a file is no longer only ours either
    trained.save(tmp_path / "m")
    (tmp_path / "m" / "plot.png").write_bytes(b"x")
    with pytest.raises(OutputError, match="plot.png"):
        trained.save(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "plot.png").exists()


def test_save_into_a_file_path_or_an_empty_folder(trained, tmp_path):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputError, match="is a file"):
        trained.save(tmp_path / "f", overwrite=True)
    assert (tmp_path / "f").read_text() == "a file"
    (tmp_path / "empty").mkdir()
    trained.save(tmp_path / "empty", overwrite=True)  # nothing to lose
    assert io.is_model_dir(tmp_path / "empty")


def test_replacing_a_model_folder_never_leaves_it_missing(trained, tmp_path):
    """Where the system has renameat2(RENAME_EXCHANGE), old and new are swapped in one
    rename: a reader polling the folder always finds a complete model."""
    target = tmp_path / "m"
    trained.save(target)
    probe = files.make_temp_dir(tmp_path / "x")
    (tmp_path / "y").mkdir()
    if not files.exchange(probe, tmp_path / "y"):
        pytest.skip("no atomic exchange on this system (two renames are used)")
    done, missing = threading.Event(), []

    def poll():
        while not done.is_set():
            if not (target / "manifest.json").exists():
                missing.append(1)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for _ in range(5):
            trained.save(target, overwrite=True)
    finally:
        done.set()
        reader.join()
    assert not missing


def test_concurrent_saves_to_one_folder_do_not_raise(trained, tmp_path, adata):
    target, errors = tmp_path / "m", []

    def save_a_few():
        try:
            for _ in range(4):
                trained.save(target, overwrite=True)
        except Exception as err:  # noqa: BLE001 - the test records any failure
            errors.append(err)

    threads = [threading.Thread(target=save_a_few) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporaries left
    SCVI.load(target, adata, device="cpu")


def test_replace_dir_without_exchange_falls_back_to_two_renames(
    trained, tmp_path, adata, monkeypatch
):
    asked = []
    monkeypatch.setattr(files, "exchange", lambda a, b: asked.append(Path(b)) or False)
    trained.save(tmp_path / "m")
    trained.save(tmp_path / "m", overwrite=True)
    assert asked == [tmp_path / "m"]  # the replacing save asked, and renamed twice instead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    SCVI.load(tmp_path / "m", adata, device="cpu")


def test_leftovers_of_a_killed_writer_are_swept(tmp_path):
    out = tmp_path / "out.h5ad"
    dead = tmp_path / f".out.h5ad{files.TMP_TAG}-{2**22 + 12345}-deadbeef.h5ad"
    mine = files.temp_name(out)
    other = tmp_path / f".other.h5ad{files.TMP_TAG}-{2**22 + 12345}-deadbeef.h5ad"
    for p in (dead, mine, other):
        p.write_text("partial")
    with files.atomic_path(out) as tmp:
        tmp.write_text("new")
    assert not dead.exists()  # its process is gone
    assert mine.exists() and other.exists()  # a live writer's, and another target's
    assert out.read_text() == "new"


def test_atomic_path_checks_free_space_and_removes_its_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda path: 2**20)
    with pytest.raises(OutputError, match="not enough free space"):
        with files.atomic_path(tmp_path / "big.h5ad", min_free=2**30):
            raise AssertionError("not reached")
    with pytest.raises(OSError):
        with files.atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_model_file_error_is_an_input_error():
    assert issubclass(ModelFileError, InputError) and issubclass(OutputError, InputError)


def test_is_model_dir_on_a_symlink(saved, tmp_path):
    link = tmp_path / "link"
    os.symlink(saved, link)
    assert io.is_model_dir(saved) and not io.is_model_dir(link)
