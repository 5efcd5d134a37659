"""REDIS_URL and the REDIS_* settings: what each form means, and the errors a typo gets."""

from __future__ import annotations

import pytest

from flowmesh.errors import ConfigError
from flowmesh.redis_conn import RedisConfig, redact


def test_a_sentinel_url_names_its_sentinels_service_and_db():
    config = RedisConfig.from_env(
        {"REDIS_URL": "redis+sentinel://app:p%40ss@s1:26379,s2:26380,[::1]:26381/fm/3"}
    )
    target = config.sentinel()
    assert target.hosts == (("s1", 26379), ("s2", 26380), ("::1", 26381))
    assert (target.service, target.db) == ("fm", 3)
    assert (target.username, target.password) == ("app", "p@ss")
    assert not config.tls
    assert RedisConfig("rediss+sentinel://s1:26379/fm").tls
    assert RedisConfig("redis+sentinel://s1/fm").sentinel().hosts == (("s1", 26379),)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://s1:26379", "name the primary's service"),
        ("redis+sentinel://s1:26379/fm/zero", "the database must be a number"),
        ("redis+sentinel://s1:port/fm", "is not host:port"),
        ("http://localhost:6379", "the scheme must be one of"),
    ],
)
def test_a_bad_url_is_refused_naming_the_variable(url, says):
    with pytest.raises(ConfigError, match=says) as err:
        RedisConfig.from_env({"REDIS_URL": url})
    assert "REDIS_URL=" in str(err.value)


def test_tls_files_need_a_tls_url_and_must_be_readable(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here\n")
    with pytest.raises(ConfigError, match="REDIS_TLS_CA_FILE is set but REDIS_URL is not"):
        RedisConfig.from_env({"REDIS_URL": "redis://h:6379/0", "REDIS_TLS_CA_FILE": str(ca)})
    with pytest.raises(ConfigError, match=r"REDIS_TLS_CA_FILE=.*cannot be read"):
        RedisConfig.from_env(
            {"REDIS_URL": "rediss://h:6379/0", "REDIS_TLS_CA_FILE": str(tmp_path / "none")}
        )
    with pytest.raises(ConfigError, match="go together"):
        RedisConfig.from_env({"REDIS_URL": "rediss://h:6379/0", "REDIS_TLS_CERT_FILE": str(ca)})
    config = RedisConfig.from_env({"REDIS_URL": "rediss://h:6379/0", "REDIS_TLS_CA_FILE": str(ca)})
    assert config.tls and config.tls_ca_file == str(ca)


def test_passwords_never_show():
    config = RedisConfig.from_env(
        {
            "REDIS_URL": "redis://app:url-secret@h:6379/0",
            "REDIS_PASSWORD": "env-secret",
            "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
        }
    )
    shown = f"{config} {config!r}"
    assert "url-secret" not in shown and "env-secret" not in shown
    assert "sentinel-secret" not in shown
    assert str(config) == "redis://app:***@h:6379/0" == redact(config.url)


def test_only_sentinel_connections_time_out_by_default():
    assert RedisConfig.from_env({"REDIS_URL": "redis://h/0"}).timeout is None
    assert RedisConfig.from_env({"REDIS_URL": "redis+sentinel://s/fm"}).timeout == 10.0
    assert RedisConfig("redis+sentinel://s/fm").timeout == 10.0
    set_ = {"REDIS_URL": "redis://h/0", "REDIS_SOCKET_TIMEOUT_SEC": "3"}
    assert RedisConfig.from_env(set_).timeout == 3.0


def test_the_socket_timeout_must_outlast_the_blocking_reads():
    with pytest.raises(ConfigError, match="REDIS_SOCKET_TIMEOUT_SEC must be >= 2"):
        RedisConfig.from_env({"REDIS_URL": "redis://h/0", "REDIS_SOCKET_TIMEOUT_SEC": "1"})
