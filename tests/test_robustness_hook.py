"""The search's robustness hook: RobustnessConfig validation and robustness_term dispatch."""

import importlib.util
import math
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dsrna.robustness as robustness
from dsrna import SearchNetwork
from dsrna.robustness import RobustnessConfig, jacobian_metric, robustness_term, robustness_terms
from dsrna.space import capture_batch_stats


@pytest.fixture
def fake_certified(monkeypatch):
    """Stand-in for dsrna.robustness.certified that records how the hook calls it."""
    module = types.ModuleType("dsrna.robustness.certified")
    module.calls = []

    def certified_bound_metric(net, x, y, eps, norm, method, reduce="min", bn_stats=None, scale="linear", dtype=None,
                               max_error_symbols=None, dither=None):
        module.calls.append(dict(eps=eps, norm=norm, method=method, reduce=reduce, bn_stats=bn_stats, scale=scale, dtype=dtype,
                                 max_error_symbols=max_error_symbols, dither=dither))
        return net(x).mean() * 0 + 7.0

    def default_eps(dataset, norm):
        return {("mnist-mini", "linf"): 0.01, ("cifar10", "l2"): 0.05}[(dataset, norm)]

    def certified_defaults(dataset, norm):
        return ("crown-symbolic", 1e-5) if dataset == "cifar10" else ("crown-ibp", default_eps(dataset, norm))

    module.certified_bound_metric = certified_bound_metric
    module.default_eps = default_eps
    module.certified_defaults = certified_defaults
    monkeypatch.setitem(sys.modules, "dsrna.robustness.certified", module)
    return module


def tiny_net():
    return SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1).double()


@pytest.mark.parametrize("field, value, message", [
    ("kind", "adv", "kind must be one of none, cb, jacobian, combined"),
    ("norm", "l3", "norm must be one of linf, l2, l1"),
    ("method", "lp", "method must be one of ibp, crown-ibp, crown-symbolic, crown"),
    ("reduce", "max", "reduce must be one of"),
    ("cb_scale", "log", "cb_scale must be one of linear, asinh"),
    ("bound_dtype", "float16", "bound_dtype must be one of float32, float64"),
    ("estimator", "rows", "estimator must be one of random-row, exact, top1, projection"),
    ("gamma", -1.0, "gamma"),
    ("gamma", float("nan"), "gamma"),
    ("inner_gamma", -0.1, "inner_gamma"),
    ("eps", 0.0, "eps"),
    ("n", 0, "n "),
    ("robust_batch", 0, "robust_batch"),
    ("warmup_epochs", -1, "warmup_epochs"),
    ("error_symbols", -1, "error_symbols"),
])
def test_invalid_config_raises(field, value, message):
    with pytest.raises(ValueError, match=message):
        RobustnessConfig(**{field: value})


def test_projection_needs_l2_and_settings_of_an_unused_term_are_refused():
    with pytest.raises(ValueError, match="projection"):
        RobustnessConfig(kind="jacobian", estimator="projection", norm="linf")
    RobustnessConfig(kind="jacobian", estimator="projection", norm="l2")
    with pytest.raises(ValueError, match="estimator has no effect with kind 'cb'"):  # silently ignored before
        RobustnessConfig(kind="cb", estimator="projection", norm="linf")
    with pytest.raises(ValueError, match="gamma, method have no effect with kind 'none': drop them or choose kind cb "
                                         "or combined$"):
        RobustnessConfig(gamma=0.5, method="ibp")
    RobustnessConfig(kind="combined", estimator="exact", method="ibp", gamma=0.5)  # combined uses both
    with pytest.raises(ValueError, match="method, estimator have no effect with kind 'none': drop them or choose "
                                         "kind combined$"):
        RobustnessConfig(estimator="exact", method="ibp")
    with pytest.raises(ValueError, match="error_symbols has no effect with method 'ibp'"):
        RobustnessConfig(kind="cb", method="ibp", error_symbols=100)
    RobustnessConfig(kind="cb", error_symbols=100)  # the method follows the data set: the search checks


def test_none_returns_zero_without_a_forward():
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("kind none must not run the net")

    x = torch.rand(2, 1, 8, 8)
    r = robustness_term(Exploding(), x, torch.zeros(2, dtype=torch.long), RobustnessConfig(), None)
    assert r.shape == () and r.item() == 0.0


def test_jacobian_kind_calls_the_metric_with_the_config():
    net = tiny_net().train()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    with capture_batch_stats() as stats:  # the whole batch's statistics; R on a part of it (--robust-batch)
        net(x)
    x = x[:3]
    config = RobustnessConfig(kind="jacobian", eps=0.2, norm="l2", estimator="exact")
    r = robustness_term(net, x, torch.zeros(3, dtype=torch.long), config, stats)
    torch.testing.assert_close(r, jacobian_metric(net, x, "l2", "exact", eps=0.2, bn_stats=stats))
    assert not torch.allclose(r, jacobian_metric(net, x, "l2", "exact", eps=0.2))  # the statistics matter
    assert torch.autograd.grad(r, net.alphas_normal)[0].abs().sum() > 0


def test_cb_and_combined_dispatch_with_resolved_eps(fake_certified):
    net = tiny_net().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])
    stats = {}
    cb = robustness_term(net, x, y, RobustnessConfig(kind="cb", method="ibp", reduce="mean"), stats)
    assert cb.item() == 7.0
    assert fake_certified.calls == [dict(eps=0.01, norm="linf", method="ibp", reduce="mean", bn_stats=stats,
                                         scale="asinh", dtype=torch.float64, max_error_symbols=2048, dither=1e-3)]
    robustness_term(net, x, y, RobustnessConfig(kind="cb", cb_dither=0.0), stats)
    assert fake_certified.calls[-1]["dither"] == 0.0

    config = RobustnessConfig(kind="combined", eps=0.3, norm="linf", estimator="exact")
    combined = robustness_term(net, x, y, config, None)
    assert fake_certified.calls[-1]["eps"] == 0.3
    torch.testing.assert_close(combined, 7.0 + jacobian_metric(net, x, "linf", "exact", eps=0.3))
    terms = robustness_terms(net, x, y, config, None)  # the same terms apart, as the search logs them
    assert set(terms) == {"cb", "jacobian"} and terms["cb"].item() == 7.0
    torch.testing.assert_close(terms["jacobian"], jacobian_metric(net, x, "linf", "exact", eps=0.3))
    # default budgets: R_CB its own (CIFAR-10: 1e-5 here), R_Jac the evaluation one (0.05)
    cifar = RobustnessConfig(kind="combined", dataset="cifar10", norm="l2", estimator="exact")
    combined = robustness_term(net, x, y, cifar, None)
    assert fake_certified.calls[-1]["eps"] == 1e-5
    torch.testing.assert_close(combined, 7.0 + jacobian_metric(net, x, "l2", "exact", eps=0.05))


def test_default_eps_and_warmup(fake_certified):
    assert RobustnessConfig(kind="jacobian", dataset="cifar10", norm="l2").resolved_eps() == 0.05
    assert RobustnessConfig(kind="jacobian", eps=0.5).resolved_eps() == 0.5
    config = RobustnessConfig(kind="cb", warmup_epochs=2)
    assert [config.active(epoch) for epoch in range(4)] == [False, False, True, True]
    assert not RobustnessConfig(kind="none").active(10)


def test_certified_defaults_per_data_set(fake_certified):
    """R_CB takes its own method and eps from the data set (crown-symbolic on CIFAR-10, on 2 examples
    per step), R_Jac the evaluation budget; explicit settings win."""
    cifar = RobustnessConfig(kind="combined", dataset="cifar10", norm="l2")
    assert (cifar.resolved_method(), cifar.resolved_eps(certified=True), cifar.resolved_eps()) == ("crown-symbolic", 1e-5, 0.05)
    assert cifar.resolved_robust_batch() == robustness.SYMBOLIC_ROBUST_BATCH
    assert RobustnessConfig(kind="jacobian", dataset="cifar10").resolved_robust_batch() is None  # no bound pass
    assert RobustnessConfig(kind="cb", dataset="cifar10", method="ibp").resolved_robust_batch() is None
    assert RobustnessConfig(kind="cb", dataset="cifar10", robust_batch=8).resolved_robust_batch() == 8
    mnist = RobustnessConfig(kind="cb")
    assert (mnist.resolved_method(), mnist.resolved_eps(certified=True), mnist.resolved_robust_batch()) == ("crown-ibp", 0.01, None)
    explicit = RobustnessConfig(kind="cb", dataset="cifar10", method="crown", eps=0.2)
    assert (explicit.resolved_method(), explicit.resolved_eps(certified=True)) == ("crown", 0.2)


def test_certified_exports_resolve_lazily(fake_certified):
    assert robustness.certified_bound_metric is fake_certified.certified_bound_metric
    assert robustness.default_eps is fake_certified.default_eps
    assert robustness.certified_defaults is fake_certified.certified_defaults
    with pytest.raises(AttributeError):
        robustness.no_such_metric


@pytest.mark.skipif(importlib.util.find_spec("dsrna.robustness.certified") is None,
                    reason="the bound engine's certified metric is not in this checkout")
def test_cb_kind_with_the_real_certified_metric():
    from dsrna.robustness.certified import certified_bound_metric

    net = tiny_net().train()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1])
    with capture_batch_stats() as stats:
        net(x)
    config = RobustnessConfig(kind="cb", eps=0.001, method="ibp")
    torch.manual_seed(5)
    r = robustness_term(net, x, y, config, stats)
    torch.manual_seed(5)  # the same dither
    expected = certified_bound_metric(net, x, y, 0.001, "linf", "ibp", reduce="min", bn_stats=stats, scale="asinh",
                                      dither=config.cb_dither)
    torch.testing.assert_close(r, expected, rtol=0, atol=0)
    assert r != certified_bound_metric(net, x, y, 0.001, "linf", "ibp", reduce="min", bn_stats=stats, scale="asinh")
    assert torch.isfinite(r)
    # crown-symbolic's budget reaches the bound pass: none at all gives another (sound, looser) value.
    budgets = [robustness_term(net, x, y, RobustnessConfig(kind="cb", eps=0.01, method="crown-symbolic", error_symbols=e),
                               stats).item() for e in (2048, 0)]
    assert budgets[0] != budgets[1] and all(map(math.isfinite, budgets)), budgets


@pytest.mark.parametrize("field, value, message", [
    ("gamma", -1.0, "robustness gamma must be a finite number >= 0, got -1.0"),
    ("gamma", math.inf, "robustness gamma must be a finite number >= 0, got inf"),
    ("gamma", math.nan, "robustness gamma must be a finite number >= 0, got nan"),
    ("inner_gamma", -0.1, "robustness inner_gamma must be a finite number >= 0, got -0.1"),
    ("eps", 0.0, "robustness eps must be a finite number > 0"),
    ("eps", math.inf, "robustness eps must be a finite number > 0"),
    ("n", 0, "robustness n (Jacobian rows or projections per example) must be an integer >= 1"),
    ("robust_batch", 0, "robust_batch must be an integer >= 1 or None"),
    ("warmup_epochs", -1, "warmup_epochs must be an integer >= 0"),
    ("error_symbols", -1, "robustness error_symbols must be an integer >= 0"),
])
def test_invalid_values_of_settings_in_use_are_refused(field, value, message):
    """Kind combined reads every setting, so each bad value meets its own check. (With the default
    kind none, test_invalid_config_raises's values are also refused as unused, whatever their checks.)"""
    with pytest.raises(ValueError, match=re.escape(message)):
        RobustnessConfig(kind="combined", **{field: value})


def test_defaults_are_the_documented_ones():
    """RobustnessConfig's defaults are those of the fields table in docs/robustness.md (gamma 0.01 is
    the paper's); crown-symbolic's R_CB runs on 2 examples per step, as documented there."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "robustness.md").read_text()
    table = docs.split("`RobustnessConfig` fields and defaults:", 1)[1].split("\n\n", 2)[1]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, flags=re.M))
    assert len(rows) >= 10, rows

    def parse(text):
        text = text.strip("`")
        if text == "None":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    config = RobustnessConfig()
    for field, text in rows.items():
        value = getattr(config, field)
        assert value == parse(text) and type(value) is type(parse(text)), (field, value, text)
    assert RobustnessConfig(kind="cb", dataset="cifar10").resolved_robust_batch() == 2


def test_cb_precision_and_scale_settings_reach_the_metric(fake_certified):
    """bound_dtype and cb_scale are R_CB's settings: accepted with kind cb and passed on."""
    net = tiny_net().eval()
    x, y = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 2])
    config = RobustnessConfig(kind="cb", method="ibp", bound_dtype="float32", cb_scale="linear")
    robustness_term(net, x, y, config, None)
    assert (fake_certified.calls[-1]["dtype"], fake_certified.calls[-1]["scale"]) == (torch.float32, "linear")


def test_jacobian_rows_per_image_and_the_zero_term_follow_the_config():
    """n reaches R_Jac: n = K random rows are every row once, the exact value. Kind none's zero is
    a scalar in the batch's dtype."""
    net = tiny_net().eval()
    x, y = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 2])
    config = RobustnessConfig(kind="jacobian", eps=0.2, norm="l2", estimator="random-row", n=3)
    torch.testing.assert_close(robustness_term(net, x, y, config, None), jacobian_metric(net, x, "l2", "exact", eps=0.2))
    assert robustness_term(net, x, y, RobustnessConfig(), None).dtype == torch.float64


def test_an_linf_budget_holding_every_image_is_warned_about():
    with pytest.warns(UserWarning, match="robustness eps 2 in l_inf covers the whole \\[0, 1\\] pixel range"):
        RobustnessConfig(kind="jacobian", eps=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RobustnessConfig(kind="jacobian", eps=2.0, norm="l2")  # an l2 ball of radius 2 is a small part of the box
        RobustnessConfig(kind="jacobian", eps=0.5)
