"""TrainConfig: defaults from the model's registration and the data set's description."""
import pytest

import spconv2d.zoo as zoo
from spconv2d.zoo.config import TrainConfig


def test_resolved_fills_the_models_and_the_data_sets_defaults():
    c = TrainConfig(model="sparse_unet").resolved()
    assert (c.data, c.epochs, c.batch_size, c.lr, c.weight_decay) == ("streets", 10, 16, 3e-3, 1e-4)
    assert (c.mask_policy, c.density) == ("residual", 0.3)
    assert (c.size, c.num_train, c.num_val) == ((64, 128), 1000, 200)
    assert c.out.endswith("sparse_unet-streets")
    c = TrainConfig(model="cnn", epochs=3).resolved()
    assert (c.data, c.epochs, c.lr, c.mask_policy, c.density, c.size, c.num_train) == \
        ("mnist", 3, 3e-3, None, None, None, None)
    c = TrainConfig(model="sparse_unet", data="cityscapes", size=[32, 64]).resolved()
    assert c.size == (32, 64) and c.num_train is None
    assert TrainConfig(model="sparse_unet", data="cityscapes").resolved().size == (128, 256)
    # an energy policy chosen for a model whose default has no density gets the default density
    assert TrainConfig(model="sparse_cnn", mask_policy="edge").resolved().density == 0.3
    with pytest.raises(KeyError, match="unknown model"):
        TrainConfig(model="nope").resolved()
    with pytest.raises(ValueError, match="unknown data set"):
        TrainConfig(model="cnn", data="nope").resolved()


def test_nonzero_policy_warns_about_a_density(caplog):
    TrainConfig(model="sparse_cnn", density=0.2).resolved()
    assert "ignored by the 'nonzero' mask policy" in caplog.text


def test_dict_round_trip_and_older_configs():
    c = TrainConfig(model="unet", size=(32, 64), model_kwargs={"width": 8}).resolved()
    d = c.to_dict()
    assert d["size"] == [32, 64]
    assert TrainConfig.from_dict(d) == c
    old = dict(d, threads=2, some_removed_option=1)  # an older run's config
    assert TrainConfig.from_dict(old) == c
    assert zoo.TrainConfig is TrainConfig


def test_validate_accepts_what_resolved_makes_and_integer_sequences_as_size():
    import numpy as np

    for model in zoo.list_models("[!_]*"):
        c = TrainConfig(model=model)
        assert c.validate() is c and c.resolved().validate()
    c = TrainConfig(model="unet", size=np.array([32, 64]))
    assert c.size == (32, 64) and all(type(v) is int for v in c.size) and c.validate()
    with pytest.raises(TypeError, match="size must be two integers"):
        TrainConfig(model="unet", size=(32.7, 64)).validate()  # not silently truncated to 32
