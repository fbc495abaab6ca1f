"""docs/deploy.md says nothing genloop would refuse: every `genloop ...` line parses with the real
command-line parsers, every GENLOOP_/E2B_ variable sets the setting it names (to the value shown),
and every TEMPORAL_ variable is one Temporal's environment configuration reads. The roles themselves
run as separate processes in tests/reliability/test_many_hosts.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from temporalio.envconfig import ClientConfig

from api.server import parse_args as api_args
from genloop.cli import _parser as cli_parser
from genloop.settings import _STANDARD_ENV, Settings, load_settings
from sandbox_host.server import parse_args as host_args

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"
BLOCK = re.compile(r"^\s*```sh\n(.*?)^\s*```", re.S | re.M)


def _blocks() -> list[list[str]]:
    return [[line.strip() for line in block.splitlines() if line.strip()] for block in BLOCK.findall(DOC.read_text())]


def _lines() -> list[str]:
    return [line for block in _blocks() for line in block]


def _exports_of(lines: list[str]) -> dict[str, str]:
    assignments = [shlex.split(line.removeprefix("export "))[0] for line in lines if line.startswith("export ")]
    return dict(a.split("=", 1) for a in assignments)


def _exports() -> dict[str, str]:
    return _exports_of(_lines())


def test_the_doc_has_commands_and_variables():
    commands = {shlex.split(line)[1] for line in _lines() if line.startswith("genloop ")}
    assert {"sandbox-host", "worker", "api", "migrate", "replay"} <= commands
    assert len(_exports()) >= 15


@pytest.mark.parametrize("line", [line for line in _lines() if line.startswith("genloop ")])
def test_every_command_parses(line):
    command, *args = shlex.split(line)[1:]
    if command == "sandbox-host":
        host_args(args)
    elif command == "api":
        api_args(args)
    else:
        assert cli_parser().parse_args([command, *args]).command == command


def _setting_of(name: str) -> tuple[str, str]:
    """The settings field an environment variable sets: GENLOOP_<SECTION>_<KEY>, or a standard alias."""
    if name in _STANDARD_ENV:
        return _STANDARD_ENV[name]
    if name == "GENLOOP_DATA_DIR":
        return "data_dir", ""
    for section, field in Settings.model_fields.items():
        for key in getattr(field.annotation, "model_fields", {}):
            if f"GENLOOP_{section}_{key}".upper() == name:
                return section, key
    raise AssertionError(f"{name} is not a genloop setting")


@pytest.mark.parametrize("block", [b for b in _blocks() if _exports_of(b)], ids=lambda b: b[0])
def test_every_genloop_variable_sets_its_setting(block):
    documented = {n: v for n, v in _exports_of(block).items() if n.startswith(("GENLOOP_", "E2B_"))}
    settings = load_settings(environ=documented)  # one block: what one role on one machine is given
    for name, value in documented.items():
        section, key = _setting_of(name)
        loaded = getattr(getattr(settings, section), key) if key else getattr(settings, section)
        loaded = loaded.get_secret_value() if hasattr(loaded, "get_secret_value") else loaded
        expected = yaml.safe_load(value) if value.startswith("[") else value
        assert str(loaded) == str(expected), (name, loaded, value)


@pytest.mark.parametrize("name", [n for n in _exports() if n.startswith("TEMPORAL_")])
def test_every_temporal_variable_is_read_by_temporal(name):
    value = _exports()[name]
    before = ClientConfig.load_client_connect_config(disable_file=True, override_env_vars={})
    after = ClientConfig.load_client_connect_config(disable_file=True, override_env_vars={name: value})
    assert before != after, f"{name} is not a Temporal environment variable"
