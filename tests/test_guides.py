"""Guides: the non-amortized PerCellGuide and plugging guides into SCVI."""

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro_scvi.datasets import synthetic_zinb
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import pyro_scvi
from pyro_scvi import SCVI, InputError
from pyro_scvi.model import ScviModel
from pyro_scvi.model.guides import PerCellGuide, ScviGuide, build_guide
from pyro_scvi.model.priors import LogNormalLibrary, ObservedLibrary
from pyro_scvi.posterior.gap import amortization_gap
from pyro_scvi.train.loop import KLWeight

N_CELLS, N_GENES, N_LATENT = 12, 9, 3


@pytest.fixture
def data():
    torch.manual_seed(1)
    x = torch.poisson(torch.rand(N_CELLS, N_GENES) * 20)
    x[:, 0] += 1
    return x, torch.arange(N_CELLS) % 2


def make_model(observed=False):
    lib = (
        ObservedLibrary()
        if observed
        else LogNormalLibrary(torch.tensor([3.0, 3.5]), torch.tensor([0.4, 0.6]))
    )
    return ScviModel(N_GENES, 2, lib, n_latent=N_LATENT, n_hidden=16)


@pytest.mark.parametrize("observed", [False, True])
def test_per_cell_guide_sites_match_the_model(data, observed):
    x, b = data
    model, guide = (
        make_model(observed),
        PerCellGuide(N_CELLS, N_LATENT, library=ObservedLibrary() if observed else None),
    )
    idx = torch.tensor([2, 5, 7])
    g = poutine.trace(guide).get_trace(x[idx], b[idx], idx, N_CELLS)
    m = poutine.trace(poutine.replay(model, g)).get_trace(x[idx], b[idx], idx, N_CELLS)
    plates = {"cells", "genes"}  # the plates' subsample sites
    expected = {"z"} if observed else {"z", "l"}
    assert set(g.stochastic_nodes) - plates == set(m.stochastic_nodes) - plates == expected
    assert g.nodes["z"]["value"].shape == (3, 1, N_LATENT)
    # the subsampled plate scales the guide's terms like the model's
    assert g.nodes["z"]["scale"] == pytest.approx(N_CELLS / 3)
    assert np.isfinite(Trace_ELBO().loss(model, guide, x[idx], b[idx], idx, N_CELLS))


def test_cell_index_picks_each_cells_own_rows(data):
    x, b = data
    guide = PerCellGuide(N_CELLS, N_LATENT)
    with torch.no_grad():
        guide.z_loc.copy_(torch.arange(N_CELLS * N_LATENT, dtype=torch.float).view(N_CELLS, -1))
    idx = torch.tensor([9, 0, 4])
    q = guide.encode(x[idx], b[idx], idx)
    torch.testing.assert_close(q["z_loc"], guide.z_loc[idx])
    # without cell_index the rows are the cells in order, all of them
    torch.testing.assert_close(guide.encode(x, b)["z_loc"], guide.z_loc)


def test_gradients_reach_only_the_minibatch_rows(data):
    x, b = data
    model, guide = make_model(), PerCellGuide(N_CELLS, N_LATENT)
    idx = torch.tensor([1, 6])
    Trace_ELBO().loss_and_grads(model, guide, x[idx], b[idx], idx, N_CELLS)
    moved = guide.z_loc.grad.abs().sum(-1) > 0
    assert moved.tolist() == [i in (1, 6) for i in range(N_CELLS)]
    assert guide.l_loc.grad[idx].abs().sum() > 0


def test_kl_weight_scales_the_guides_z_term(data):
    x, b = data
    guide = PerCellGuide(N_CELLS, N_LATENT)
    tr = poutine.trace(KLWeight(0.25)(guide)).get_trace(x, b)
    assert tr.nodes["z"]["scale"] == pytest.approx(0.25)
    assert tr.nodes["l"]["scale"] == pytest.approx(1.0)  # the library is never annealed


def test_unknown_cells_are_a_clear_error(data):
    x, b = data
    guide = PerCellGuide(N_CELLS, N_LATENT)
    with pytest.raises(ValueError, match=r"cells 0\.\.11 only.*refine"):
        guide(x[:2], b[:2], torch.tensor([3, 12]))
    with pytest.raises(ValueError, match="without one. Pass cell_index"):
        guide(x[:5], b[:5])


def test_from_guide_starts_exactly_at_the_encoder(data):
    adata = synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    m = SCVI(adata, n_latent=N_LATENT, n_hidden=8)
    m.train(max_epochs=2, progress_bar=False)
    cells = np.arange(5, 25)
    per_cell = PerCellGuide.from_guide(m.guide, m.data, cells)
    m.guide.eval()
    x, b = m.data.tensors(cells)
    q_enc, q_new = m.guide.encode(x, b), per_cell.encode(x, b)
    for k in ("z_loc", "z_scale", "l_loc", "l_scale"):
        torch.testing.assert_close(q_new[k], q_enc[k])
    # and so the same seed gives the same estimates, cell by cell: refined for no steps, the
    # per-cell guide (scored on its own cells, its rows 0..19) is the encoder
    gap = amortization_gap(m.model, m.guide, m.data, cells, n_steps=0, n_samples=10, seed=0)
    for column in ("elbo", "marginal_ll"):
        np.testing.assert_allclose(gap[f"{column}_refined"], gap[f"{column}_amortized"], rtol=1e-4)
    assert gap.index.tolist() == m.data.obs_names[cells].tolist()
    assert gap["elbo_amortized"].nunique() == len(cells)  # a row of another cell would differ


def test_build_guide_checks_cells_and_latent_dimension():
    data = SCVI(synthetic_zinb(n_cells=30, n_genes=10, seed=0)).data
    with pytest.raises(ValueError, match="10 cells but the data have 30"):
        build_guide(PerCellGuide(10, 2), data, n_latent=2)
    with pytest.raises(ValueError, match="n_latent=4, the model 2"):
        build_guide(PerCellGuide(30, 4), data, n_latent=2)
    with pytest.raises(TypeError, match="factory"):
        build_guide("per-cell", data, n_latent=2)
    amortized = ScviGuide(10, 1, n_latent=2)
    assert build_guide(amortized, data, n_latent=2) is amortized


@pytest.fixture(scope="module")
def per_cell_fit():
    torch.manual_seed(0)
    adata = synthetic_zinb(n_cells=300, n_genes=40, n_clusters=3, n_batches=2, seed=0)
    model = SCVI(adata, batch_key="batch", n_latent=4, n_hidden=32, guide=PerCellGuide.from_data)
    # full batch: every step moves every cell's parameters
    model.train(
        max_epochs=80,
        batch_size=300,
        lr=1e-2,
        train_size=1.0,
        kl_warmup_epochs=0,
        early_stopping=False,
        progress_bar=False,
    )
    return model


def test_scvi_trains_a_per_cell_guide(per_cell_fit):
    m = per_cell_fit
    assert isinstance(m.guide, PerCellGuide) and m.settings["guide"] == "PerCellGuide"
    h = m.history["train_elbo"].to_numpy()
    assert h[-1] > h[0] + 20  # nats per cell
    z = m.get_latent_representation()
    assert z.shape == (300, 4)
    # non-amortized inference finds the simulated clusters too
    labels = KMeans(3, n_init=10, random_state=0).fit_predict(z)
    assert adjusted_rand_score(m.adata.obs["cell_type"], labels) > 0.8
    # the latent mean is the guide's own z_loc, row by row
    np.testing.assert_allclose(z, m.guide.z_loc.detach().numpy(), rtol=1e-6)
    stats = m.get_fit_statistics(n_samples=20, seed=0)
    assert (stats["marginal_ll"] >= stats["elbo"]).all()
    assert m.get_latent_representation(give_mean=False, n_samples=3).shape == (3, 300, 4)
    assert m.get_normalized_expression().shape == (300, 40)


def test_per_cell_guide_refuses_what_it_cannot_answer(per_cell_fit):
    m = per_cell_fit
    with pytest.raises(InputError, match="only for the model's own 300 cells"):
        m.get_latent_representation(m.adata[:10].copy())
    with pytest.raises(InputError, match="train_size=1.0"):
        m.train(max_epochs=1, train_size=0.9, progress_bar=False)
    with pytest.raises(InputError, match="not amortized"):
        m.get_amortization_gap()


def test_per_cell_guide_object_and_wrong_size(small_adata):
    m = SCVI(small_adata, n_latent=2, guide=PerCellGuide(small_adata.n_obs, 2))
    assert m.guide.n_cells == 300
    with pytest.raises(InputError, match="299 cells but the data have 300"):
        SCVI(small_adata, n_latent=2, guide=PerCellGuide(299, 2))


def test_per_cell_guide_save_and_load(per_cell_fit, tmp_path):
    per_cell_fit.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", per_cell_fit.adata)
    assert isinstance(loaded.guide, PerCellGuide)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), per_cell_fit.get_latent_representation()
    )
    with pytest.raises(InputError, match="300 cells, but adata has 50"):
        SCVI.load(tmp_path / "m", per_cell_fit.adata[:50].copy())


def test_param_store_left_clean(per_cell_fit):
    per_cell_fit.get_fit_statistics(n_samples=2)
    assert not list(pyro.get_param_store().keys())


# ---------------------------------------------------------------------- a guide of one's own
class LinearGuide(pyro_scvi.Guide):
    """q(z) linear in the log counts with learned scales; q(l) at the observed library."""

    def __init__(self, n_genes, n_latent):
        super().__init__()
        self.n_latent = n_latent
        self.loc = torch.nn.Linear(n_genes, n_latent)
        self.log_scale = torch.nn.Parameter(torch.full((n_latent,), -1.0))
        self.l_log_scale = torch.nn.Parameter(torch.tensor(-2.0))

    def encode(self, x, batch_index, cell_index=None):
        z_loc = self.loc(torch.log1p(x))
        l_loc = torch.log(x.sum(-1, keepdim=True).clamp(min=1.0))
        return {
            "z_loc": z_loc,
            "z_scale": self.log_scale.exp().expand_as(z_loc),
            "l_loc": l_loc,
            "l_scale": self.l_log_scale.exp().expand_as(l_loc),
        }


def test_a_guide_of_ones_own_works_everywhere(small_adata, tmp_path):
    guide = LinearGuide(small_adata.n_vars, 3)
    m = SCVI(small_adata, batch_key="batch", guide=guide, n_latent=3, n_hidden=16)
    m.train(max_epochs=3, lr=1e-2, progress_bar=False)
    assert m.guide is guide and guide.loc.weight.grad is None  # trained, then zeroed
    assert m.engine["compiled"] is False  # it did not declare static_structure
    history = m.history["validation_elbo"].to_numpy()
    assert np.isfinite(history).all() and history[-1] > history[0]
    z = m.get_latent_representation()
    with torch.no_grad():
        expected = guide.loc(torch.log1p(torch.as_tensor(small_adata.X.toarray())))
    np.testing.assert_allclose(z, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert m.get_likelihood_parameters(seed=0)["mean"].shape == small_adata.shape
    assert np.isfinite(m.get_marginal_ll(n_samples=5, seed=0))
    with pytest.warns(UserWarning, match="trust=True"):  # a guide of the user's module
        m.save(tmp_path / "m")
    with pytest.warns(UserWarning, match="full unpickling"):
        loaded = SCVI.load(tmp_path / "m", small_adata, trust=True)
    assert type(loaded.guide) is LinearGuide
    np.testing.assert_allclose(loaded.get_latent_representation(), z, rtol=1e-6)


def test_guide_base_needs_encode():
    with pytest.raises(NotImplementedError):
        pyro_scvi.Guide()(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------- q(l) centred on the library
def test_library_residual_centres_q_l_on_the_observed_log_library(data):
    x, b = data
    x[3] = 0.0  # a cell without counts: log 1 = 0 as its floor, not -inf
    lib = LogNormalLibrary(torch.tensor([3.0, 3.5]), torch.tensor([0.4, 0.6]))
    paper = ScviGuide(
        N_GENES, 2, n_latent=N_LATENT, library=lib, l_loc_init=3.2, library_residual=False
    )
    residual = ScviGuide(N_GENES, 2, n_latent=N_LATENT, library=lib)  # the default
    # starts at the observed depth (the residual's bias at 0), the paper's at l_loc_init
    assert float(residual.l_encoder.loc.bias.detach()) == 0.0
    assert float(paper.l_encoder.loc.bias.detach()) == pytest.approx(3.2)
    residual.load_state_dict(paper.state_dict())  # the same networks
    paper.eval(), residual.eval()
    q_paper, q_residual = paper.encode(x, b), residual.encode(x, b)
    log_lib = np.log(np.maximum(x.numpy().sum(axis=1, keepdims=True), 1.0))
    np.testing.assert_allclose(
        (q_residual["l_loc"] - q_paper["l_loc"]).detach().numpy(), log_lib, rtol=1e-6
    )
    for k in ("z_loc", "z_scale", "l_scale"):
        torch.testing.assert_close(q_residual[k], q_paper[k])
    assert "library_residual=True" in repr(residual)


def test_scvi_library_residual_is_recorded_saved_and_validated(small_adata, tmp_path):
    m = SCVI(small_adata, batch_key="batch", n_latent=2, n_hidden=8)  # on by default
    assert m.guide.library_residual and m.settings["library_residual"] is True
    paper = SCVI(small_adata, n_latent=2, library_residual=False)
    assert not paper.guide.library_residual and paper.settings["library_residual"] is False
    # where it does not apply, the default leaves it off and says so
    observed = SCVI(small_adata, use_observed_lib_size=True)
    assert observed.settings["library_residual"] is False
    per_cell = SCVI(small_adata, guide=PerCellGuide.from_data)
    assert per_cell.settings["library_residual"] is False
    m.train(max_epochs=2, progress_bar=False, seed=0)
    assert np.isfinite(m.history["validation_elbo"]).all()
    m.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", small_adata)
    assert loaded.guide.library_residual
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), m.get_latent_representation()
    )
    with pytest.raises(InputError, match="the library is observed"):
        SCVI(small_adata, use_observed_lib_size=True, library_residual=True)
    with pytest.raises(InputError, match="guide= replaces"):
        SCVI(small_adata, guide=PerCellGuide.from_data, library_residual=True)


def test_saves_from_before_library_residual_load_as_the_papers_guide(small_adata, tmp_path):
    m = SCVI(small_adata, n_latent=2, n_hidden=8, library_residual=False)
    m.train(max_epochs=1, progress_bar=False, seed=0)
    m.settings.pop("library_residual")  # as a save from before the option
    m.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", small_adata)
    assert loaded.guide.library_residual is False
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), m.get_latent_representation()
    )


# --- richer amortized guides ------------------------------------------------------------

RICHER = [pyro_scvi.FullCovarianceGuide, pyro_scvi.FlowGuide]


@pytest.mark.parametrize("cls", RICHER)
def test_a_new_richer_guide_is_the_mean_field_guide(cls, data):
    """Its extra heads start at zero: the same q as ScviGuide with the same encoders."""
    x, b = data
    torch.manual_seed(0)
    g = cls(N_GENES, 2, n_latent=N_LATENT, n_hidden=16).eval()
    base = ScviGuide(N_GENES, 2, n_latent=N_LATENT, n_hidden=16).eval()
    base.load_state_dict(g.state_dict(), strict=False)
    tr = poutine.trace(g).get_trace(x, b)
    with torch.no_grad():
        q = base.encode(x, b)
        z, l = tr.nodes["z"]["value"], tr.nodes["l"]["value"]
        expected = pyro.distributions.Normal(q["z_loc"].unsqueeze(-2), q["z_scale"].unsqueeze(-2))
        tr.compute_log_prob()
        torch.testing.assert_close(
            tr.nodes["z"]["log_prob"], expected.log_prob(z).sum(-1), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            tr.nodes["l"]["log_prob"],
            pyro.distributions.Normal(q["l_loc"], q["l_scale"]).log_prob(l),
        )


def test_full_covariance_guide_learns_a_correlated_q(data):
    x, b = data
    g = pyro_scvi.FullCovarianceGuide(N_GENES, 2, n_latent=N_LATENT, n_hidden=16).eval()
    with torch.no_grad():
        g.z_tril.bias.normal_()
    q = g.encode(x, b)
    tril = q["z_scale_tril"]
    assert torch.equal(tril, torch.tril(tril)) and bool((tril.diagonal(0, -2, -1) > 0).all())
    cov = tril @ tril.transpose(-1, -2)
    off = cov - torch.diag_embed(cov.diagonal(0, -2, -1))
    assert float(off.abs().max()) > 0.01
    torch.testing.assert_close(q["z_scale"] ** 2, cov.diagonal(0, -2, -1))


def test_the_flows_q_of_l_is_a_conditional_on_z_without_a_global_shrink(data):
    # q(l | z) reads z through its base draw eps ~ Normal(0, I): symmetric, so neither
    # the shift nor the log-stretch can move q's mean of l or shrink it for every cell
    x, b = data
    torch.manual_seed(0)
    g = pyro_scvi.FlowGuide(N_GENES, 2, n_latent=N_LATENT, n_hidden=16).eval()
    with torch.no_grad():
        torch.nn.init.normal_(g.l_coupling.weight, std=0.3)
        torch.nn.init.normal_(g.l_coupling.bias, std=0.3)
        enc = g.encode_with_hidden(x, b)
        eps = torch.randn(enc["z_loc"].unsqueeze(-2).shape)
        at_mean, up, down = (g.l_distribution(enc, k * eps) for k in (0, 1, -1))
        # at the base draw 0 q(l | z) is the encoder's Normal: no factor narrows every cell
        torch.testing.assert_close(at_mean.loc, enc["l_loc"])
        torch.testing.assert_close(at_mean.scale, enc["l_scale"])
        # l's spread depends on z, oddly in eps: its geometric mean over +-eps is sigma_l
        assert float((up.scale / down.scale - 1).abs().min()) > 1e-3
        torch.testing.assert_close(up.scale * down.scale, enc["l_scale"] ** 2)
        # the coupling correlates l with z, so q's marginal of l is wider than sigma_l
        draws = [poutine.trace(g).get_trace(x, b).nodes for _ in range(200)]
        z = torch.stack([d["z"]["value"][:, 0, 0] for d in draws])
        l = torch.stack([d["l"]["value"][:, 0] for d in draws])
        zc, lc = z - z.mean(0), l - l.mean(0)
        corr = (zc * lc).mean(0) / (zc.std(0) * lc.std(0))
        assert float(corr.abs().max()) > 0.2
        assert bool((g.encode(x, b)["l_scale"] > enc["l_scale"]).all())


def test_flow_layer_log_det_is_the_jacobians():
    from pyro_scvi.model.flows import ConditionalAffineAutoregressive

    torch.manual_seed(0)
    layer = ConditionalAffineAutoregressive(3, 2, reverse=True).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x, c = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    t = layer.transform(c)
    jac = torch.autograd.functional.jacobian(lambda v: t(v), x)
    # autoregressive (in reversed order): triangular Jacobian, log det = the layer's
    assert float(torch.triu(jac.flip(0, 1), 1).abs().max()) == 0.0
    torch.testing.assert_close(t.log_abs_det_jacobian(x, t(x)), torch.linalg.slogdet(jac)[1])
    fresh = layer.transform(c)  # no cache: the density of a given value inverts
    torch.testing.assert_close(fresh.inv(t(x)), x)


@pytest.fixture(scope="module")
def richer_adata():
    return synthetic_zinb(n_cells=120, n_genes=30, n_clusters=3, n_batches=2, seed=0)


@pytest.mark.parametrize("cls", RICHER)
def test_richer_guides_train_save_load_resume_and_answer_every_query(cls, richer_adata, tmp_path):
    adata = richer_adata

    def new():
        return SCVI(adata, batch_key="batch", guide=cls.from_data, n_latent=3, n_hidden=16)

    kw = dict(batch_size=32, lr=1e-2, progress_bar=False, engine=pyro_scvi.Engine(threads=1))
    whole = new().train(4, seed=1, **kw)
    assert whole.engine["compiled"] is False  # 16 steps: too few to compile
    hist = whole.history["validation_elbo"].to_numpy()
    assert np.isfinite(hist).all() and hist[-1] > hist[0]
    halves = new().train(2, seed=1, **kw).train(2, **kw)  # resume: the same run
    for k, v in whole.guide.state_dict().items():
        torch.testing.assert_close(halves.guide.state_dict()[k], v, rtol=0, atol=0, msg=k)
    whole.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", adata)
    assert type(loaded.guide) is cls
    z = whole.get_latent_representation()
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    # every query
    assert whole.get_latent_representation(give_mean=False, n_samples=2).shape == (2, 120, 3)
    rho = whole.get_normalized_expression(n_samples=2)
    assert np.allclose(rho.sum(axis=1), 1.0, atol=1e-4)
    assert whole.posterior_predictive_sample(seed=0).shape == adata.shape
    stats = whole.get_fit_statistics(n_samples=10, seed=0)
    assert (stats["marginal_ll"] >= stats["elbo"]).all()
    de = whole.differential_expression(groupby="cell_type", group1="type0", n_samples=20)
    assert len(de) == adata.n_vars
    ais = whole.get_marginal_ll_ais(indices=np.arange(3), n_chains=4, n_steps=5, seed=0)
    assert np.isfinite(ais.to_numpy()).all()
    assert np.isfinite(whole.get_amortization_gap(n_steps=3, n_samples=5)["gap"]).all()
    if cls is pyro_scvi.FlowGuide:  # training moved q(l | z) off the mean-field start
        with torch.no_grad():
            enc = whole.guide.eval().encode_with_hidden(*whole.data.tensors(np.arange(8)))
            eps = torch.ones_like(enc["z_loc"].unsqueeze(-2))
            up, down = (whole.guide.l_distribution(enc, k * eps) for k in (1, -1))
        assert float((up.loc - down.loc).abs().max()) > 1e-4


@pytest.mark.parametrize("library_residual", [False, True])
def test_the_encoders_sharing_one_input_give_what_each_gives_alone(library_residual):
    # z's and l's encoders take one joined input (counts and batch one-hot, built once):
    # the same parameters, bit for bit, as each encoder building its own
    guide = ScviGuide(30, 3, library_residual=library_residual).eval()
    x = torch.poisson(torch.full((6, 30), 3.0))
    b = torch.tensor([0, 1, 2, 0, 1, 2])
    shared = guide.encode(x, b)
    with_hidden = guide.encode_with_hidden(x, b)
    z_loc, z_scale = guide.z_encoder(torch.log1p(x), b)
    l_loc, l_scale = guide.l_encoder(torch.log1p(x), b)
    if library_residual:
        l_loc = l_loc + torch.log(x.sum(-1, keepdim=True).clamp_min(1.0))
    for got in (shared, with_hidden):
        assert torch.equal(got["z_loc"], z_loc) and torch.equal(got["z_scale"], z_scale)
        assert torch.equal(got["l_loc"], l_loc) and torch.equal(got["l_scale"], l_scale)
    assert guide.z_encoder.input(torch.log1p(x), b).shape == (6, 33)
