"""Loading a model folder runs no code from it (issue 27, item 2).

``model.pt`` and ``train_state.pt`` are read with ``weights_only=True`` and the allow-list
of ``pyro_scvi.io.pickling``. A file crafted to run code on unpickling (valid manifest and
checksum: whoever writes the file writes those too) is refused by ``SCVI.load``, the
command line and ``--resume`` without running anything; a folder of a user's own
component class loads only with ``trust=True`` / ``--trust-model``, with a warning; every
model and checkpoint of pyro_scvi's own components loads without it.
"""

import functools
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import anndata
import numpy as np
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from _cli import run_cli
from pyro_scvi.datasets import synthetic_zinb

import pyro_scvi
from pyro_scvi import SCVI, ModelFileError
from pyro_scvi.cli import COMMANDS, build_parser
from pyro_scvi.errors import TrainingInterrupted, UnsafeModelFileError
from pyro_scvi.io import pickling, write_model_dir
from pyro_scvi.model.schemes import BayesianDecoder

# Stepper.step is the documented fault-injection seam (pyro_scvi.train.stepper)
from pyro_scvi.train.stepper import Stepper

DATA = Path(__file__).parent / "data"
FAST = ["--max-epochs", "2", "--batch-size", "64", "--n-latent", "2", "--quiet"]


class RunsCode:
    """Unpickled, it writes ``marker``: what a hostile ``model.pt`` would do (os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


class ShiftedNormal(pyro_scvi.Prior):
    """A user's own prior class, defined in the user's module (here, this test module)."""

    def setup(self, n_latent):
        super().setup(n_latent)
        self.shift = torch.nn.Parameter(torch.zeros(n_latent))

    def forward(self):
        return dist.Normal(self.shift, torch.ones_like(self.shift)).to_event(1)


#: the CLI in-process; its stdout (reports) is not under test here
_run = functools.partial(run_cli, stdout="drop")


@pytest.fixture(scope="module")
def adata():
    return synthetic_zinb(n_cells=120, n_genes=15, n_batches=2, seed=2)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A CLI fit (model folder) and a finished checkpoint of it, written once."""
    tmp = tmp_path_factory.mktemp("fitted")
    synthetic_zinb(n_cells=150, n_genes=20, n_batches=2, seed=0).write_h5ad(tmp / "in.h5ad")
    argv = ["fit", tmp / "in.h5ad", "-o", tmp / "out.h5ad", *FAST, "--batch-key", "batch"]
    status, stderr = _run([*argv, "--checkpoint-dir", tmp / "ckpt", "--checkpoint-every", "1"])
    assert status == 0, stderr
    return tmp


def _craft(source, target, marker, *, where="model.pt"):
    """Copy the folder ``source`` to ``target`` with a payload that runs code in ``where``.

    The manifest lists the new file with its true size and checksum, as an attacker would.
    """
    files = {name: torch.load(source / name, weights_only=False) for name in _payloads(source)}
    files[where]["extra"] = RunsCode(marker)
    manifest = json.loads((source / "manifest.json").read_text())
    target.mkdir()
    write_model_dir(
        target, files["model.pt"], manifest=manifest, train_state=files.get("train_state.pt")
    )
    return target


def _payloads(folder):
    return [n for n in ("model.pt", "train_state.pt") if (folder / n).exists()]


def _assert_the_file_runs_code(path, marker):
    """The control: fully unpickled (what pyro_scvi did before), the file runs its code."""
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()


# ------------------------------------------------------------- a crafted pickle runs nothing


def test_a_crafted_model_file_runs_nothing_under_scvi_load(fitted, adata, tmp_path):
    marker = tmp_path / "marker"
    folder = _craft(fitted / "out_model", tmp_path / "m", marker)
    _assert_the_file_runs_code(folder / "model.pt", marker)
    data = anndata.read_h5ad(fitted / "in.h5ad")
    with pytest.raises(UnsafeModelFileError, match="builtins.exec") as err:
        SCVI.load(folder, data)
    assert isinstance(err.value, ModelFileError) and err.value.names == ["builtins.exec"]
    message = str(err.value)
    assert "trust=True" in message and "--trust-model" in message and "\n" not in message
    with pytest.raises(ModelFileError, match="--trust-model"):
        SCVI.load_query_data(data, folder)
    assert not marker.exists()  # before: SCVI.load ran it


def test_a_crafted_format0_folder_runs_nothing(tmp_path):
    """A folder without a manifest (the old format) is read the same way."""
    marker = tmp_path / "marker"
    folder = tmp_path / "old"
    shutil.copytree(DATA / "model_format0", folder)
    with warnings.catch_warnings():  # it names its classes by the flat paths of 0.1
        warnings.simplefilter("ignore", DeprecationWarning)
        state = torch.load(folder / "model.pt", weights_only=False)
    state["extra"] = RunsCode(marker)
    torch.save(state, folder / "model.pt")
    adata = synthetic_zinb(n_cells=60, n_genes=12, n_batches=2, seed=3)
    with pytest.raises(ModelFileError, match="--trust-model"):
        SCVI.load(folder, adata)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "de", "ppc", "map-query"])
def test_a_crafted_model_runs_nothing_on_the_command_line(fitted, tmp_path, command):
    marker = tmp_path / "marker"
    folder = _craft(fitted / "out_model", tmp_path / "m", marker)
    data = fitted / "in.h5ad"
    argv = {
        "evaluate": ["evaluate", folder, data, "--n-samples", "2"],
        "de": ["de", folder, data, "--groupby", "batch", "-o", tmp_path / "d.csv"],
        "ppc": ["ppc", folder, data, "-o", tmp_path / "p.nc"],
        "map-query": ["map-query", folder, data, "-o", tmp_path / "q.h5ad", *FAST[:2]],
    }[command]
    status, stderr = _run(argv)
    assert status == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "--trust-model" in stderr and "trust" in stderr
    assert not marker.exists()  # before: `pyro-scvi evaluate` ran it, exit 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing written


@pytest.mark.parametrize("where", ["model.pt", "train_state.pt"])
def test_a_crafted_checkpoint_runs_nothing_under_resume(fitted, tmp_path, where):
    marker = tmp_path / "marker"
    ckpt = _craft(fitted / "ckpt", tmp_path / "ckpt", marker, where=where)
    _assert_the_file_runs_code(ckpt / where, marker)
    argv = ["fit", fitted / "in.h5ad", "-o", tmp_path / "out.h5ad", *FAST]
    status, stderr = _run([*argv, "--batch-key", "batch", "--checkpoint-dir", ckpt, "--resume"])
    assert status == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "--trust-model" in stderr
    assert where in stderr
    assert not marker.exists()  # before: --resume ran it


# ------------------------------------------------------------- a user's own component class


def test_a_users_prior_class_loads_only_with_trust_and_a_warning(adata, tmp_path):
    model = SCVI(adata, batch_key="batch", prior=ShiftedNormal(), n_latent=2, n_hidden=8)
    model.train(2, progress_bar=False)
    with pytest.warns(UserWarning, match="test_io_safety.ShiftedNormal.*trust=True"):
        model.save(tmp_path / "m")
    with pytest.raises(ModelFileError, match="test_io_safety.ShiftedNormal.*--trust-model"):
        SCVI.load(tmp_path / "m", adata)
    with pytest.warns(UserWarning, match="full unpickling"):
        loaded = SCVI.load(tmp_path / "m", adata, trust=True, device="cpu")
    assert type(loaded.model.prior) is ShiftedNormal
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )


def test_trust_model_loads_a_users_class_on_the_command_line(adata, tmp_path):
    adata.write_h5ad(tmp_path / "in.h5ad")
    model = SCVI(adata, batch_key="batch", prior=ShiftedNormal(), n_latent=2, n_hidden=8)
    with pytest.warns(UserWarning, match="trust=True"):
        model.train(1, progress_bar=False).save(tmp_path / "m")
    argv = ["evaluate", tmp_path / "m", tmp_path / "in.h5ad", "--n-samples", "2"]
    status, stderr = _run(argv)
    assert status == 2 and "--trust-model" in stderr
    with pytest.warns(UserWarning, match="full unpickling"):
        status, stderr = _run([*argv, "--trust-model"])
    assert status == 0, stderr


def test_every_command_that_reads_a_model_takes_trust_model():
    parser = build_parser()
    for command in COMMANDS:
        args = parser.parse_args(
            {
                "fit": ["fit", "in.h5ad", "-o", "o.h5ad", "--resume"],
                "evaluate": ["evaluate", "m", "in.h5ad"],
                "ppc": ["ppc", "m", "in.h5ad", "-o", "o.nc"],
                "de": ["de", "m", "in.h5ad", "--groupby", "g", "-o", "o.csv"],
                "plot": ["plot", "in.h5ad", "-o", "o.png"],
                "map-query": ["map-query", "r", "in.h5ad", "-o", "o.h5ad"],
            }[command]
        )
        # plot reads no model; every other command reads one (fit with --resume)
        assert hasattr(args, "trust_model") == (command != "plot"), command


# ------------------------------------------------- pyro_scvi's own models load without trust


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"prior": "mog", "likelihood": pyro_scvi.NB()},
        {"prior": "vamp", "use_observed_lib_size": True},
        {"scheme": BayesianDecoder()},
    ],
    ids=["default", "mog-nb", "vamp-observed", "bayesian-decoder"],
)
def test_own_models_and_checkpoints_load_with_weights_only(adata, tmp_path, options, monkeypatch):
    options = dict(options)
    priors = {
        "mog": lambda: pyro_scvi.MixtureOfGaussians(3),
        "vamp": lambda: pyro_scvi.VampPrior(3),
    }
    if "prior" in options:
        options["prior"] = priors[options["prior"]]()
    model = SCVI(adata, batch_key="batch", n_latent=2, n_hidden=8, **options)
    # interrupted in its second epoch: the checkpoint holds minibatch orders, Adam's state,
    # the random states of torch, numpy and Python, and a copy of the last good epoch
    real, calls = Stepper.step, []

    def hooked(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "step", hooked)
    with pytest.raises(TrainingInterrupted):
        model.train(3, batch_size=64, checkpoint_dir=tmp_path / "ckpt", progress_bar=False)
    monkeypatch.setattr(Stepper, "step", real)
    for name in ("model.pt", "train_state.pt"):
        assert pickling.needs_trust(tmp_path / "ckpt" / name) == []
    resumed = SCVI.load_checkpoint(tmp_path / "ckpt", adata, device="cpu")
    assert resumed.interrupted
    resumed.resume(progress_bar=False)
    resumed.save(tmp_path / "m")
    assert pickling.needs_trust(tmp_path / "m" / "model.pt") == []
    loaded = SCVI.load(tmp_path / "m", adata, device="cpu")
    np.testing.assert_allclose(
        loaded.get_latent_representation(), resumed.get_latent_representation(), atol=1e-6
    )


class FlowGuide(pyro_scvi.Guide):
    """A guide with a Pyro normalizing flow on z's mean, as a later guide class may have."""

    def __init__(self, n_genes, n_latent):
        super().__init__()
        self.n_latent = n_latent
        self.loc = torch.nn.Linear(n_genes, n_latent)
        self.flow = T.affine_autoregressive(n_latent)  # pyro.nn layers, slices, masks
        self.l_log_scale = torch.nn.Parameter(torch.tensor(-2.0))

    def encode(self, x, batch_index, cell_index=None):
        z_loc = self.flow(self.loc(torch.log1p(x)))
        l_loc = torch.log(x.sum(-1, keepdim=True).clamp(min=1.0))
        return {
            "z_loc": z_loc,
            "z_scale": torch.full_like(z_loc, 0.1),
            "l_loc": l_loc,
            "l_scale": self.l_log_scale.exp().expand_as(l_loc),
        }


def test_a_component_class_added_to_pyro_scvi_model_loads_without_listing(
    adata, tmp_path, monkeypatch
):
    """The allow-list is read off the file: a guide class that lands in
    pyro_scvi.model.guides later (here put there by the test) needs no registration."""
    import pyro_scvi.model.guides

    monkeypatch.setattr(FlowGuide, "__module__", "pyro_scvi.model.guides")
    monkeypatch.setattr(pyro_scvi.model.guides, "FlowGuide", FlowGuide, raising=False)
    model = SCVI(adata, guide=FlowGuide(adata.n_vars, 2), n_latent=2, n_hidden=8)
    model.train(2, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "needs trust=True" warning
        model.save(tmp_path / "m")
        loaded = SCVI.load(tmp_path / "m", adata, device="cpu")
    assert type(loaded.guide) is FlowGuide
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )


@pytest.mark.parametrize("folder", ["model_format0", "model_observed_library"])
def test_the_shipped_old_folders_load_without_trust(folder):
    """Saved by older pyro_scvi (tests/data/README.md), under the flat module paths."""
    adata = synthetic_zinb(n_cells=60, n_genes=12, n_batches=2, seed=3)
    names = pickling.needs_trust(DATA / folder / "model.pt")
    assert names == []
    model = SCVI.load(DATA / folder, adata, device="cpu")
    expected = np.load(DATA / f"{folder}_latent.npy")
    np.testing.assert_allclose(model.get_latent_representation(), expected, atol=1e-5)


def test_the_allow_list_is_classes_of_pyro_scvi_model_not_functions():
    assert pickling.safe_global("pyro_scvi.model.guides.PerCellGuide") is not None
    assert pickling.safe_global("pyro_scvi.model.schemes.BayesianDecoder") is not None
    assert pickling.safe_global("pyro_scvi.guide.ScviGuide") is not None  # 0.1's path
    for name in (
        "posix.system",
        "builtins.exec",
        "os.system",
        "subprocess.Popen",
        "pyro_scvi.io.files.remove_path",  # a function of the package
        "pyro_scvi.model.priors.as_prior",  # a function of the components' package
        "pyro_scvi.train.hooks.Checkpoints",  # a class outside the components
        "torch.load",
        "test_io_safety.ShiftedNormal",
    ):
        assert pickling.safe_global(name) is None, name
