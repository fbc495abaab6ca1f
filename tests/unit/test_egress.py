"""sandbox_host.egress.may_dial: what a sandbox's egress proxy may connect to, as a table. Pure: nothing
here dials or resolves; the table's host networks are given, not read from this machine."""

from __future__ import annotations

import ipaddress
import socket

import psutil
import pytest

from sandbox_host.egress import host_networks, may_dial

# A host on 203.0.113.0/24 (its gateway .1, itself .7) and fd12:3456::/64: its own networks.
HOST_NETWORKS = [
    ipaddress.ip_network("203.0.113.7/32"),
    ipaddress.ip_network("203.0.113.0/24"),
    ipaddress.ip_network("fd12:3456::7/128"),
    ipaddress.ip_network("fd12:3456::/64"),
    ipaddress.ip_network("2a01:4f8:aaaa:bbbb::/64"),  # a public IPv6 LAN of the host's
]

ALLOWED = [
    ("8.8.8.8", "public IPv4"),
    ("1.1.1.1", "public IPv4"),
    ("151.101.0.223", "public IPv4 (a CDN)"),
    ("2606:4700:4700::1111", "public IPv6"),
    ("2a00:1450:4001:80b::200e", "public IPv6"),
    ("::ffff:8.8.8.8", "IPv4-mapped public"),
    ("64:ff9b::808:808", "NAT64 of a public IPv4"),
    ("2002:808:808::1", "6to4 of a public IPv4"),
    ("192.0.0.9", "IANA: globally reachable (PCP anycast)"),
]

DENIED = [
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("10.1.2.3", "private"),
    ("172.16.5.4", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("169.254.169.254", "link-local (cloud metadata)"),
    ("192.0.0.1", "IETF protocol assignments"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast (SSDP)"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("192.88.99.1", "6to4 relay anycast (deprecated)"),
    ("203.0.113.7", "the host's own address"),
    ("203.0.113.1", "the host's gateway (connected subnet)"),
    ("203.0.113.200", "a neighbour on the host's subnet"),
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fec0::1", "site-local (deprecated)"),
    ("fc00::1", "ULA"),
    ("fd00::1", "ULA"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "global-scope multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation (RFC 9637)"),
    ("100::1", "discard-only"),
    ("2001:2::1", "benchmarking"),
    ("2001::1", "Teredo"),
    ("5f00::1", "SRv6 SIDs"),
    ("64:ff9b:1::a00:1", "local-use NAT64"),
    ("fd12:3456::7", "the host's own address"),
    ("fd12:3456::1", "the host's subnet"),
    ("2a01:4f8:aaaa:bbbb::99", "a neighbour on the host's public IPv6 LAN"),
    # IPv4 inside IPv6: judged by the embedded address
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped private"),
    ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
    ("::ffff:203.0.113.1", "IPv4-mapped host subnet"),
    ("64:ff9b::7f00:1", "NAT64 of loopback"),
    ("64:ff9b::a00:1", "NAT64 of private"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of link-local"),
    ("64:ff9b::cb00:7101", "NAT64 of the host's gateway"),
    ("2002:7f00:1::1", "6to4 of loopback"),
    ("2002:c0a8:101::1", "6to4 of private"),
    ("2002:cb00:7101::1", "6to4 of the host's gateway"),
    ("::7f00:1", "IPv4-compatible loopback"),
    ("::a00:1", "IPv4-compatible private"),
    ("::808:808", "IPv4-compatible (deprecated) even of a public address"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("fe80::1%eth0", "link-local with a zone"),
]


@pytest.mark.parametrize("address,why", ALLOWED, ids=[a for a, _ in ALLOWED])
def test_allowed(address, why):
    assert may_dial(address, HOST_NETWORKS), why


@pytest.mark.parametrize("address,why", DENIED, ids=[a for a, _ in DENIED])
def test_denied(address, why):
    assert not may_dial(address, HOST_NETWORKS), why


def test_operator_exceptions_win_except_for_loopback_unspecified_and_multicast():
    mirror = [ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_network("203.0.113.5/32")]
    assert may_dial("10.9.1.2", HOST_NETWORKS, mirror)
    assert may_dial("::ffff:10.9.1.2", HOST_NETWORKS, mirror)
    assert may_dial("203.0.113.5", HOST_NETWORKS, mirror)  # on the host's own subnet, explicitly allowed
    assert not may_dial("10.8.1.2", HOST_NETWORKS, mirror)
    everything = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    for address in ("127.0.0.1", "0.0.0.0", "224.0.0.1", "::1", "::", "ff02::1", "::ffff:127.0.0.1"):
        assert not may_dial(address, HOST_NETWORKS, everything), address


def test_host_networks_include_every_interface_address_and_subnet():
    networks = host_networks()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and addr.netmask:
                subnet = ipaddress.ip_network(f"{addr.address}/{addr.netmask}", strict=False)
                assert subnet in networks and ipaddress.ip_network(addr.address) in networks
                assert not may_dial(addr.address, networks)
    assert ipaddress.ip_network("127.0.0.0/8") in networks
