import pytest

from prefect_xm import hyper


def test_sweep_product_zip_chain():
    lr = hyper.sweep("lr", [0.1, 0.01, 0.001])
    bs = hyper.sweep("bs", [32, 64])
    assert lr == [{"lr": 0.1}, {"lr": 0.01}, {"lr": 0.001}]
    p = hyper.product(lr, bs)
    assert len(p) == 6 and p[0] == {"lr": 0.1, "bs": 32} and p[1] == {"lr": 0.1, "bs": 64}
    assert hyper.zipit(hyper.sweep("a", [1, 2]), hyper.sweep("b", [3, 4])) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    assert hyper.chainit(hyper.sweep("a", [1]), hyper.sweep("b", [2])) == [{"a": 1}, {"b": 2}]
    nested = hyper.product(hyper.chainit(hyper.sweep("a", [1]), hyper.sweep("b", [2])), hyper.sweep("c", [3]))
    assert nested == [{"a": 1, "c": 3}, {"b": 2, "c": 3}]
    assert hyper.product() == [{}]


def test_hyper_errors():
    with pytest.raises(ValueError, match="lengths"):
        hyper.zipit(hyper.sweep("a", [1, 2]), hyper.sweep("b", [3]))
    with pytest.raises(ValueError, match="'a'"):
        hyper.product(hyper.sweep("a", [1]), hyper.sweep("a", [2]))
    with pytest.raises(ValueError, match="string"):
        hyper.sweep("a", "abc")
