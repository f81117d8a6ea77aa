"""scripts/bench_distributed_network.py: its rates, and the link it builds and always removes.

The link test needs root and the ip/tc tools (network namespaces of its own, nothing else): it is
skipped elsewhere. The benchmark itself is a script (docs/distributed_lion.md), not a test.
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_distributed_network as bench


def test_rates_parse_as_tc_writes_them():
    assert bench.parse_rate("1gbit") == 1e9
    assert bench.parse_rate("100mbit") == 1e8
    assert bench.parse_rate("2.5Mbit") == 2.5e6
    assert bench.parse_rate("none") is None
    for bad in ("fast", "0mbit", "-1gbit", "100mb", "gbit"):
        with pytest.raises(argparse.ArgumentTypeError, match="rate"):
            bench.parse_rate(bad)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


needs_netns = pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
                                 reason="network namespaces need root and the ip and tc tools")


@needs_netns
def test_the_link_is_shaped_and_removed_even_when_the_body_fails():
    tag = f"t{os.getpid() % 100000}"
    with pytest.raises(RuntimeError, match="inside"):
        with bench.Link(tag, bench.parse_rate("100mbit")) as link:
            assert all(ns in _namespaces() for ns in link.ns)
            addresses = subprocess.run(["ip", "-n", link.ns[1], "-o", "addr", "show", link.ifname[1]],
                                       capture_output=True, text=True, check=True).stdout
            assert f"{bench.SUBNET}2/30" in addresses
            qdisc = subprocess.run(["ip", "netns", "exec", link.ns[0], "tc", "qdisc", "show", "dev", link.ifname[0]],
                                   capture_output=True, text=True, check=True).stdout
            assert "tbf" in qdisc and "100Mbit" in qdisc, qdisc
            # Only the pair joins the namespaces: the host has no end of it.
            host = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
            assert link.ifname[0] not in host and link.ifname[1] not in host
            raise RuntimeError("a failure inside the link")
    assert not any(ns in _namespaces() for ns in link.ns)
