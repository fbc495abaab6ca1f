"""Settings: bad configuration gets a clear error naming the key; secrets stay hidden."""

from __future__ import annotations

import pytest

from genloop.settings import ConfigError, load_settings


def test_env_overrides_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("api:\n  port: 9000\nsandbox:\n  app_port: 8081\n")
    s = load_settings(
        cfg, environ={"GENLOOP_API_PORT": "9100", "E2B_API_KEY": "e2b_secret", "TEMPORAL_ADDRESS": "t:7233"}
    )
    assert s.api.port == 9100 and s.sandbox.app_port == 8081
    assert s.temporal.target == "t:7233"
    assert s.uses_e2b_cloud and s.sandbox_api_url is None
    assert "e2b_secret" not in repr(s) and "e2b_secret" not in str(s.model_dump())


def test_local_sandbox_host_by_default(tmp_path):
    s = load_settings(environ={})
    assert not s.uses_e2b_cloud
    assert s.sandbox_api_url == f"http://{s.sandbox_host.host}:{s.sandbox_host.port}"
    assert s.database_url.startswith("sqlite+aiosqlite:///")


@pytest.mark.parametrize(
    "yaml_text,env,needle",
    [
        ("api:\n  port: 70000\n", {}, "api.port"),
        ("api:\n  prot: 1\n", {}, "api.prot"),
        ("runner:\n  kind: gpt\n", {}, "runner.kind"),
        ("- a\n- b\n", {}, "mapping"),
        ("api: [\n", {}, "YAML"),
        ("", {"GENLOOP_WORKER_MAX_CONCURRENT_ACTIVITIES": "lots"}, "worker.max_concurrent_activities"),
    ],
)
def test_bad_config_names_the_key(tmp_path, yaml_text, env, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ=env)
    assert needle in str(info.value)


def test_missing_explicit_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_non_loopback_api_needs_token(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("api:\n  host: 0.0.0.0\n")
    with pytest.raises(ConfigError, match="GENLOOP_API_TOKEN"):
        load_settings(cfg, environ={}).check_api_binding()
    load_settings(cfg, environ={"GENLOOP_API_TOKEN": "t0ken"}).check_api_binding()


@pytest.mark.parametrize("build_id", ["b-1", "Build_ID_With_Caps", "x" * 300])
def test_idempotency_key_is_valid_for_e2b(build_id):
    from e2b.retry import resolve_idempotency_key

    from activities.sandbox import idempotency_key_for

    key = idempotency_key_for(build_id)
    assert resolve_idempotency_key(key) == key
    assert idempotency_key_for(build_id) == key and idempotency_key_for(build_id + "2") != key


def test_available_runners_follow_the_llm_key():
    assert load_settings(environ={}).available_runners == ("template",)
    both = load_settings(
        environ={"GENLOOP_LLM_API_KEY": "k", "GENLOOP_RUNNER_KIND": "llm", "GENLOOP_SANDBOX_HOST_API_KEY": "host-key"}
    )  # no key file needed
    assert both.available_runners == ("llm", "template")
    from genloop.cli.worker import production_activities

    acts = production_activities(both, repo=None)
    assert set(acts.runners) == {"llm", "template"} and "k" not in repr(acts.runners)


def test_redact_secrets_strips_url_credentials_queries_and_passwords():
    from genloop.errors import redact_secrets

    text = (
        "connect postgresql+asyncpg://app:hunter2@db:5432/x failed; GET http://h:1/v2/sandboxes?token=abc#f "
        "password=s3cret"
    )
    out = redact_secrets(text)
    assert "hunter2" not in out and "abc" not in out and "s3cret" not in out
    assert "postgresql+asyncpg://app:***@db:5432/x" in out and "http://h:1/v2/sandboxes" in out


def test_logs_settings_and_their_variables():
    defaults = load_settings(environ={}).logs
    assert (defaults.cap_bytes, defaults.retention_days, defaults.batch_interval_s, defaults.batch_bytes) == (
        2 * 1024 * 1024,
        14,
        0.2,
        64 * 1024,
    )
    s = load_settings(
        environ={
            "GENLOOP_LOGS_CAP_BYTES": "100000",
            "GENLOOP_LOGS_RETENTION_DAYS": "3",
            "GENLOOP_LOGS_BATCH_INTERVAL_S": "0.5",
        }
    )
    assert (s.logs.cap_bytes, s.logs.retention_days, s.logs.batch_interval_s) == (100000, 3, 0.5)
    with pytest.raises(ConfigError, match="logs.cap_bytes"):
        load_settings(environ={"GENLOOP_LOGS_CAP_BYTES": "10"})


def test_redaction_of_build_log_lines():
    from genloop.errors import redact_secrets

    for line, secret in (
        ("DB_PASSWORD=hunter2", "hunter2"),
        ("export GITHUB_TOKEN=ghp_abc", "ghp_abc"),
        ("api_key: 'k-123'", "k-123"),
        ("Authorization: Bearer eyJhbGci", "eyJhbGci"),
        ("using sk-ant-REDACTMEREDACTME123", "REDACTMEREDACTME123"),
    ):
        assert secret not in redact_secrets(line), line
    for line in ("Successfully installed flask-3.0.0", "writing code: 3.2k tokens", "GET /health 200"):
        assert redact_secrets(line) == line
