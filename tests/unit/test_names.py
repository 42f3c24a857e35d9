"""emulator.names: the prefix every root-namespace object carries, IFNAMSIZ."""

from __future__ import annotations

import pytest

from emulator.errors import ConfigError
from emulator.names import IFNAMSIZ_MAX, PREFIX, check_ident, check_ifname, is_owned, owned


def test_linux_limit_is_fifteen_characters():
    assert IFNAMSIZ_MAX == 15


def test_owned_adds_prefix():
    assert owned("pe1") == "dp-pe1"
    assert PREFIX == "dp-"


def test_owned_accepts_exactly_fifteen_characters():
    assert owned("pe254-cnic31") == "dp-pe254-cnic31"  # 15 characters


def test_owned_refuses_sixteen_characters():
    with pytest.raises(ConfigError, match="16 characters"):
        owned("pe1000-cnic31")


def test_check_ifname_names_where():
    with pytest.raises(ConfigError) as exc:
        check_ifname("x" * 16, "cluster.gpus_per_node")
    assert str(exc.value).startswith("cluster.gpus_per_node: ")


@pytest.mark.parametrize("name, ours", [
    ("dp-pe1", True),
    ("dp-rail31", True),
    ("dp-pe254-cnic31", True),
    ("dp-", False),
    ("dp--x", False),
    ("dp-PE1", False),
    ("eth0", False),
    ("docker0", False),
    ("xdp-pe1", False),
])
def test_is_owned(name, ours):
    assert is_owned(name) is ours


@pytest.mark.parametrize("name", ["pe1", "rail0", "a"])
def test_check_ident_accepts(name):
    assert check_ident(name, "here") == name


@pytest.mark.parametrize("name", ["1pe", "Pe1", "pe-1", "pe_1", "", "pe 1", 3])
def test_check_ident_refuses(name):
    with pytest.raises(ConfigError, match="not a valid name"):
        check_ident(name, "here")
