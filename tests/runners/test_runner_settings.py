"""Runner settings: the LLM fields, their environment names, the rule that `kind: llm` needs an
endpoint, and the factory building an LLM runner that reaches a fake server from environment alone."""

from __future__ import annotations

import pytest

from activities.runners import build_runner
from activities.runners.base import Capability, RunnerTask, no_progress
from activities.runners.llm import PLACEHOLDER_KEY, LLMRunner
from genloop.settings import ConfigError, load_settings
from tests.helpers.fake_models import SERVERS, write_files


def test_defaults():
    r = load_settings(environ={}).runner
    assert (r.kind, r.llm_provider, r.llm_base_url, r.llm_model) == ("template", "openai", "", "")
    assert r.fix_attempts == 2 and r.max_tokens_per_build == 0 and r.llm_max_output_tokens > 0
    assert r.llm_timeout_s > 0 and not r.llm_configured


def test_environment_names():
    env = {
        "GENLOOP_RUNNER_KIND": "llm",
        "GENLOOP_RUNNER_LLM_PROVIDER": "anthropic",
        "GENLOOP_RUNNER_LLM_BASE_URL": "http://127.0.0.1:9/",
        "GENLOOP_RUNNER_LLM_MODEL": "m-1",
        "GENLOOP_RUNNER_LLM_API_KEY": "sk-env-secret",
        "GENLOOP_RUNNER_LLM_TIMEOUT_S": "12.5",
        "GENLOOP_RUNNER_LLM_MAX_OUTPUT_TOKENS": "4096",
        "GENLOOP_RUNNER_MAX_TOKENS_PER_BUILD": "100000",
        "GENLOOP_RUNNER_FIX_ATTEMPTS": "3",
    }
    s = load_settings(environ=env)
    r = s.runner
    assert (r.kind, r.llm_provider, r.llm_base_url, r.llm_model) == ("llm", "anthropic", "http://127.0.0.1:9/", "m-1")
    assert r.llm_api_key.get_secret_value() == "sk-env-secret" and "sk-env-secret" not in repr(s)
    assert (r.llm_timeout_s, r.llm_max_output_tokens, r.max_tokens_per_build, r.fix_attempts) == (12.5, 4096, 100000, 3)
    assert s.available_runners == ("llm", "template")


def test_short_key_alias():
    s = load_settings(environ={"GENLOOP_LLM_API_KEY": "k"})
    assert s.runner.llm_api_key.get_secret_value() == "k" and s.available_runners == ("template", "llm")


def test_a_base_url_alone_offers_the_llm_runner():
    local = "http://127.0.0.1:11434/v1"
    s = load_settings(environ={"GENLOOP_RUNNER_LLM_BASE_URL": local, "GENLOOP_RUNNER_KIND": "llm"})
    assert s.available_runners == ("llm", "template")
    runner = build_runner("llm", s)
    assert isinstance(runner, LLMRunner) and runner.client._api_key == PLACEHOLDER_KEY


def test_llm_kind_without_an_endpoint_names_the_variable(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runner:\n  kind: llm\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert "GENLOOP_RUNNER_LLM_API_KEY" in str(info.value) and "runner" in str(info.value)


@pytest.mark.parametrize("yaml_text,needle", [
    ("runner:\n  llm_provider: gemini\n", "runner.llm_provider"),
    ("runner:\n  fix_attempts: -1\n", "runner.fix_attempts"),
    ("runner:\n  llm_max_output_tokens: 10\n", "runner.llm_max_output_tokens"),
])
def test_bad_runner_values_name_the_key(tmp_path, yaml_text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle):
        load_settings(cfg, environ={})


def test_the_repository_config_loads():
    assert load_settings(environ={}).runner.kind == "template"


@pytest.mark.parametrize("provider", sorted(SERVERS))
async def test_factory_runner_reaches_a_fake_server_from_environment(provider):
    async with SERVERS[provider](write_files({"app.py": "x\n"})) as server:
        settings = load_settings(environ=server.env(api_key="sk-from-env"))
        runner = build_runner("llm", settings)
        assert "sk-from-env" not in repr(runner)
        result = await runner.run(RunnerTask(kind=Capability.NEW_APP, goal="x"), no_progress)
    assert result.files == {"app.py": "x\n"}
    assert server.requests[0].key == "sk-from-env" and server.requests[0].body["model"] == "fake-model"
