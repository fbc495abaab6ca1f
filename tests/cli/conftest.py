from tests.helpers.stack_fixtures import sandbox_host, temporal_client, temporal_env  # noqa: F401  (fixtures)
