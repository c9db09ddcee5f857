"""The model registry: names, registration, defaults, keyword checking; forward and backward
through every registered model."""
import pytest
import torch

import spconv2d.zoo as zoo
from spconv2d.zoo.registry import ModelDefaults, model_entrypoint, model_kwargs, register_model

REGISTERED = sorted(set(zoo.list_models()) - {"_test_tiny", "_test_no_defaults", "_test_open"})


def test_registry_lists_the_five_models():
    assert set(zoo.list_models()) >= {"mlp", "cnn", "sparse_cnn", "unet", "sparse_unet"}
    assert zoo.list_models("sparse_*") == ["sparse_cnn", "sparse_unet"]
    with pytest.raises(KeyError, match="unknown model"):
        zoo.create_model("no_such_model")


def test_register_model_decorator_and_duplicates():
    @register_model(name="_test_tiny")
    def tiny(num_classes=3):
        return torch.nn.Linear(4, num_classes)

    m = zoo.create_model("_test_tiny", num_classes=5)
    assert m.out_features == 5 and m.model_name == "_test_tiny"
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda: None, name="_test_tiny")


@pytest.mark.parametrize("name", REGISTERED)
def test_forward_backward_every_model(name, input_for):
    torch.manual_seed(0)
    model = zoo.create_model(name)
    x, y = input_for(name)
    if zoo.model_defaults(name).data == "mnist":
        out = model(x)
        assert out.shape == (len(x), 10)
        loss = torch.nn.functional.cross_entropy(out, y)
    else:  # the coarse head is trained through the auxiliary output
        out, aux = model(x, return_aux=True)
        assert out.shape == aux.shape == (len(x), 19, *x.shape[-2:])
        loss = torch.nn.functional.cross_entropy(out, y) + torch.nn.functional.cross_entropy(aux, y)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0


@pytest.mark.parametrize("name", REGISTERED)
def test_every_entry_point_rejects_unknown_keywords(name):
    with pytest.raises(TypeError, match=rf"model '{name}' takes no keyword argument\(s\) 'bogus_option'; "
                                        r"it takes: num_classes, in_chans, "):
        zoo.create_model(name, bogus_option=1)
    with pytest.raises(TypeError, match="bogus_option"):  # the entry point itself, called directly
        model_entrypoint(name)(bogus_option=1)
    assert set(model_kwargs(name)) >= {"num_classes", "in_chans"}


@pytest.mark.parametrize("option", [dict(density=0.3), dict(mask_policy="residual"), dict(upsample="guided")])
def test_dense_unet_rejects_the_sparse_twins_options(option):
    """(it used to drop density / mask_policy silently)"""
    with pytest.raises(TypeError, match=f"'{next(iter(option))}'"):
        zoo.create_model("unet", **option)
    zoo.create_model("sparse_unet", **option)  # the twin that takes them


def test_each_model_is_registered_with_its_defaults():
    table = {  # docs/ZOO.md, "Training"
        "mlp": ("mnist", 20, 64, 2e-3, 1e-4, None, None),
        "cnn": ("mnist", 12, 64, 3e-3, 5e-4, None, None),
        "sparse_cnn": ("mnist", 12, 64, 3e-3, 5e-4, "nonzero", None),
        "unet": ("streets", 10, 16, 3e-3, 1e-4, None, None),
        "sparse_unet": ("streets", 10, 16, 3e-3, 1e-4, "residual", 0.3),
    }
    for name, row in table.items():
        d = zoo.model_defaults(name)
        assert (d.data, d.epochs, d.batch_size, d.lr, d.weight_decay, d.mask_policy, d.density) == row, name
    assert model_kwargs("unet") == ("num_classes", "in_chans", "width")
    # the mask defaults are the entry point's own: a model built without arguments uses them
    assert zoo.create_model("sparse_unet").policy.policy == zoo.model_defaults("sparse_unet").mask_policy
    assert zoo.create_model("sparse_cnn").policy.policy == "nonzero"


def test_a_model_registered_without_defaults_gets_the_field_defaults():
    @register_model(name="_test_no_defaults")
    def no_defaults(num_classes=3, in_chans=1, mask_policy="edge", density=0.2):
        return torch.nn.Linear(4, num_classes)

    d = zoo.model_defaults("_test_no_defaults")
    assert d == ModelDefaults(mask_policy="edge", density=0.2)
    assert (d.data, d.epochs, d.batch_size, d.lr, d.weight_decay) == ("mnist", 10, 32, 1e-3, 1e-4)
    with pytest.raises(ValueError, match="signature"):
        register_model(lambda num_classes=3: None, name="_test_bad", defaults=ModelDefaults(density=0.5))
    assert not zoo.is_model("_test_bad")


def test_an_entry_point_with_var_keywords_takes_any_keyword():
    @register_model(name="_test_open")
    def open_ended(num_classes=3, **kw):
        return torch.nn.Linear(4, num_classes)

    assert model_kwargs("_test_open") == ("num_classes",)
    assert zoo.create_model("_test_open", num_classes=2, anything=1).out_features == 2
