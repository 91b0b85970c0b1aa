"""The revert helper of conftest: error names and arguments, whichever way brownie reports them."""

from types import SimpleNamespace

import pytest
from conftest import error_args, error_name, reverts, selector
from eth_abi import encode


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


def _undecoded(signature: str, types: list[str], values: list) -> SimpleNamespace:
    data = selector(signature) + encode(types, values)
    return SimpleNamespace(revert_msg=f"Unknown typed error: 0x{data.hex()}")


def test_undecoded_typed_error_is_decoded_from_the_abis():
    sig = "JobMarketInsufficientEscrow(uint256,address,address,uint256,uint256)"
    client, broker = "0x" + "ab" * 20, "0x" + "cd" * 20
    exc = _undecoded(sig, ["uint256", "address", "address", "uint256", "uint256"], [2, client, broker, 10, 3])
    assert error_name(exc) == "JobMarketInsufficientEscrow"
    assert error_args(exc) == f"2, {client}, {broker}, 10, 3"
    # the pre-broker signature is no error of the compiled contracts any more: left undecoded
    old = _undecoded("JobMarketInsufficientEscrow(uint256,address,uint256,uint256)", ["uint256"] * 4, [2, 0, 10, 3])
    assert error_name(old) == "0x" + selector("JobMarketInsufficientEscrow(uint256,address,uint256,uint256)").hex()
    exc = _undecoded("NodeRegistryEmptyField(string)", ["string"], ["peerId"])
    assert (error_name(exc), error_args(exc)) == ("NodeRegistryEmptyField", "peerId")


def test_brownie_decoded_error(market, roles):
    with reverts("JobMarketNothingToClaim", roles["stranger"]):
        market.claim({"from": roles["stranger"]})


def test_reverts_rejects_wrong_name_args_and_success(market, roles):
    with pytest.raises(AssertionError, match="expected revert JobMarketZeroAmount"), reverts("JobMarketZeroAmount"):
        market.claim({"from": roles["stranger"]})
    with (
        pytest.raises(AssertionError, match="do not start with"),
        reverts("JobMarketNothingToClaim", roles["treasury"]),
    ):
        market.claim({"from": roles["stranger"]})
    with pytest.raises(AssertionError, match="call succeeded"), reverts("JobMarketZeroAmount"):
        market.feeBps()
    with pytest.raises(AssertionError, match="not an error of any compiled contract"), reverts("NoSuchError"):
        pass
