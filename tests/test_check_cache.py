"""CheckCache and call_signature (resnet_fused/ops/_checks.py): the ops' argument checks run once per call
signature, and nothing that passes through the cache can skip a check it would fail."""
import pytest
import torch

from resnet_fused.ops._checks import CheckCache, call_signature


class CountingCheck:
    """A check that counts its runs and raises for a negative option."""

    def __init__(self):
        self.runs = 0

    def __call__(self, x, option):
        self.runs += 1
        if option < 0:
            raise ValueError(f"option must be >= 0, got {option}")
        return x.dtype


def test_a_repeated_signature_is_checked_once():
    check = CountingCheck()
    cache = CheckCache(check)
    x = torch.randn(2, 3)
    for _ in range(3):
        assert cache(call_signature((x,), 1), x, 1) == torch.float32
    assert check.runs == 1
    # Another tensor with the same shape, dtype and device has the same signature.
    cache(call_signature((torch.zeros(2, 3),), 1), x, 1)
    assert check.runs == 1


@pytest.mark.parametrize("other", [
    torch.randn(3, 2),  # shape
    torch.randn(2, 3, dtype=torch.float64),  # dtype
    torch.randn(2, 3, device="meta"),  # device
])
def test_a_signature_differs_in_each_tensor_property(other):
    check = CountingCheck()
    cache = CheckCache(check)
    x = torch.randn(2, 3)
    cache(call_signature((x,), 1), x, 1)
    cache(call_signature((other,), 1), other, 1)
    assert check.runs == 2


def test_a_failing_check_is_never_cached():
    check = CountingCheck()
    cache = CheckCache(check)
    x = torch.randn(2)
    for _ in range(2):
        with pytest.raises(ValueError, match="option must be >= 0"):
            cache(call_signature((x,), -1), x, -1)
    assert check.runs == 2
    cache(call_signature((x,), 1), x, 1)  # a good call in between does not make the bad one pass
    with pytest.raises(ValueError, match="option must be >= 0"):
        cache(call_signature((x,), -1), x, -1)


def test_non_tensors_and_unhashable_options_are_checked_every_time():
    check = CountingCheck()
    cache = CheckCache(check)
    x = torch.randn(2)
    assert call_signature(([1.0],), 1) is None  # a list where a tensor goes: no signature
    for _ in range(2):
        cache(call_signature(([1.0],), 1), x, 1)
        cache(call_signature((x,), {"a": 1}), x, 1)  # an unhashable option: no error from the cache itself
    assert check.runs == 4


def test_the_cache_is_bounded():
    check = CountingCheck()
    cache = CheckCache(check, limit=4)
    for size in range(10):
        x = torch.randn(size)
        cache(call_signature((x,), 1), x, 1)
    assert len(cache._results) <= 4
    x = torch.randn(9)
    cache(call_signature((x,), 1), x, 1)  # the newest signature survived the clearing
    assert check.runs == 10


def test_compiled_code_runs_the_checks(monkeypatch):
    check = CountingCheck()
    cache = CheckCache(check)
    x = torch.randn(2)
    cache(call_signature((x,), 1), x, 1)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    cache(call_signature((x,), 1), x, 1)
    assert check.runs == 2


@pytest.mark.parametrize("good,other", [(1, 1.0), (1, True), ((1, 1), (1.0, 1)), ((1, 1), [1, 1])], ids=repr)
def test_options_equal_across_types_are_different_signatures(good, other):
    # 1 == 1.0 == True, (1, 1) == (1.0, 1): a check that takes one may refuse the other.
    x = torch.randn(2)
    assert good == other or list(good) == other
    assert call_signature((x,), other) != call_signature((x,), good)
