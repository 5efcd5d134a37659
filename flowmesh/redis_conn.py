"""Connecting to Redis as operators run it, with errors that say what to fix.

One `RedisConfig`, built from the environment by both processes, covers:
- a plain server: `redis://[user:password@]host:port/db`;
- TLS: `rediss://…`, verified against the system CAs or `REDIS_TLS_CA_FILE`, with a client
  certificate when the server asks for one (`REDIS_TLS_CERT_FILE`, `REDIS_TLS_KEY_FILE`);
- an ACL user: the user and password in the URL, or `REDIS_USERNAME` / `REDIS_PASSWORD`
  (which win, so that a Kubernetes Secret can hold the password and the URL need not);
- Sentinel: `redis+sentinel://[user:password@]host:port[,host:port…]/<service>[/db]`
  (`rediss+sentinel://` for TLS to the sentinels and the primary). The user and password are
  the data nodes'; the sentinels' own is `REDIS_SENTINEL_PASSWORD`. Every new connection asks
  the sentinels where the primary is, and a connection that finds its server demoted to a
  replica is dropped, so after a failover each command that fails is retried by its loop
  against the new primary.

With Sentinel every connection has a socket timeout (`REDIS_SOCKET_TIMEOUT_SEC`, default
10): a primary that hangs rather than closing its sockets (a frozen host, a network
partition) is given up on in that time, not waited on for ever, so a failover is noticed.
The blocking reads in the code block for 1 s, well inside it. A direct server has none
unless the setting asks: there is no other server to go to, so giving up on a hung one only
retries against it, and redis-py then wraps every command's send and read in an asyncio
timer (`wait_for` makes a task per send), which the backlog benchmark measured.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flowmesh.config import Env, env_float, env_str
from flowmesh.errors import ConfigError

log = logging.getLogger(__name__)

SENTINEL_SOCKET_TIMEOUT = 10.0  # REDIS_SOCKET_TIMEOUT_SEC's default with Sentinel
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DIRECT_SCHEMES = {"redis": False, "rediss": True, "unix": False}

# What `orchestrator --help` and `worker --help` list, after REDIS_URL.
ENVIRONMENT = [
    ("REDIS_TLS_CA_FILE", "CA bundle that signed the server's certificate (rediss://)"),
    ("REDIS_TLS_CERT_FILE", "client certificate, when the server verifies clients (rediss://)"),
    ("REDIS_TLS_KEY_FILE", "the client certificate's private key"),
    ("REDIS_USERNAME", "ACL user; overrides the URL's (default: the URL's, else 'default')"),
    ("REDIS_PASSWORD", "the ACL user's password; overrides the URL's"),
    ("REDIS_SENTINEL_PASSWORD", "the sentinels' own password (redis+sentinel://)"),
    ("REDIS_SOCKET_TIMEOUT_SEC", "give up on a silent Redis (default 10 with Sentinel, else none)"),
]
URL_HELP = (
    "Redis URL (required): redis://[user:password@]host:port/db, rediss:// for TLS, "
    "redis+sentinel://host:port[,host:port]/service[/db] for Sentinel"
)


def _no_primary(service: str, hosts: list[tuple[str, int]]) -> str:
    # redis-py's own message carries the repr of every sentinel client: a screenful per line
    # of log while a failover runs. This one says what an operator needs.
    where = ",".join(f"{h}:{p}" for h, p in hosts)
    return (
        f"no primary for {service!r} from the sentinels at {where} (a failover in progress, "
        "or none reachable)"
    )


class _AsyncSentinel(asentinel.Sentinel):
    def __init__(self, hosts: list[tuple[str, int]], **kwargs: Any):
        super().__init__(hosts, **kwargs)
        self.hosts = hosts

    async def discover_master(self, service_name: str) -> Any:
        try:
            return await super().discover_master(service_name)
        except asentinel.MasterNotFoundError:
            raise asentinel.MasterNotFoundError(_no_primary(service_name, self.hosts)) from None


class _SyncSentinel(redis.sentinel.Sentinel):
    def __init__(self, hosts: list[tuple[str, int]], **kwargs: Any):
        super().__init__(hosts, **kwargs)
        self.hosts = hosts

    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)
        except redis.sentinel.MasterNotFoundError:
            raise redis.sentinel.MasterNotFoundError(
                _no_primary(service_name, self.hosts)
            ) from None


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


@dataclass(frozen=True)
class SentinelTarget:
    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None


@dataclass(frozen=True)
class RedisConfig:
    url: str
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    # None: no timeout (a direct server), see the module's docstring.
    socket_timeout: float | None = None

    @classmethod
    def from_env(cls, env: Env, *, variable: str = "REDIS_URL") -> RedisConfig:
        config = cls(
            url=env_str(env, variable),
            tls_ca_file=env_str(env, "REDIS_TLS_CA_FILE") or None,
            tls_cert_file=env_str(env, "REDIS_TLS_CERT_FILE") or None,
            tls_key_file=env_str(env, "REDIS_TLS_KEY_FILE") or None,
            username=env_str(env, "REDIS_USERNAME") or None,
            password=env.get("REDIS_PASSWORD") or None,
            sentinel_password=env.get("REDIS_SENTINEL_PASSWORD") or None,
            socket_timeout=env_float(env, "REDIS_SOCKET_TIMEOUT_SEC", 0.0, minimum=2.0) or None,
        )
        if config.url:
            config.check(variable)
        return config

    def __str__(self) -> str:
        return redact(self.url)

    def __repr__(self) -> str:  # settings get logged: never with a password in them
        files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        return f"RedisConfig({self}, tls_files={files}, socket_timeout={self.timeout})"

    @property
    def timeout(self) -> float | None:
        """The socket timeout in force: the setting, else 10 s with Sentinel, else none."""
        if self.socket_timeout is None and self.scheme in SENTINEL_SCHEMES:
            return SENTINEL_SOCKET_TIMEOUT
        return self.socket_timeout

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0].lower() if "://" in self.url else ""

    @property
    def tls(self) -> bool:
        return SENTINEL_SCHEMES.get(self.scheme, False) or DIRECT_SCHEMES.get(self.scheme, False)

    def check(self, variable: str = "REDIS_URL") -> None:
        """ConfigError naming the variable when the URL or the TLS files cannot work."""
        if self.scheme not in SENTINEL_SCHEMES and self.scheme not in DIRECT_SCHEMES:
            allowed = ", ".join(f"{s}://" for s in [*DIRECT_SCHEMES, *SENTINEL_SCHEMES])
            raise ConfigError(f"{variable}={redact(self.url)}: the scheme must be one of {allowed}")
        if self.scheme in SENTINEL_SCHEMES:
            self.sentinel(variable)
        files = [
            ("REDIS_TLS_CA_FILE", self.tls_ca_file),
            ("REDIS_TLS_CERT_FILE", self.tls_cert_file),
            ("REDIS_TLS_KEY_FILE", self.tls_key_file),
        ]
        for name, path in files:
            if path is None:
                continue
            if not self.tls:
                raise ConfigError(
                    f"{name} is set but {variable} is not a TLS URL: use rediss:// "
                    "(or rediss+sentinel://)"
                )
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{name}={path} cannot be read: {exc.strerror}") from None
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE go together: set both")

    def sentinel(self, variable: str = "REDIS_URL") -> SentinelTarget:
        """The sentinels, service and db of a redis+sentinel:// URL."""
        rest = self.url.split("://", 1)[1]
        username = password = None
        if "@" in rest:
            creds, rest = rest.rsplit("@", 1)
            user, _, secret = creds.partition(":")
            username, password = (unquote(user) or None), (unquote(secret) or None)
        netloc, _, path = rest.partition("/")
        path = path.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        example = "redis+sentinel://sentinel-1:26379,sentinel-2:26379/mymaster/0"
        if not parts or len(parts) > 2:
            raise ConfigError(
                f"{variable}={redact(self.url)}: name the primary's service after the hosts, "
                f"e.g. {example}"
            )
        hosts: list[tuple[str, int]] = []
        for item in netloc.split(","):
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
            if not host or not port.isdigit():
                raise ConfigError(
                    f"{variable}={redact(self.url)}: {item!r} is not host:port (e.g. {example})"
                )
            hosts.append((host.strip("[]"), int(port)))
        db = 0
        if len(parts) == 2:
            if not parts[1].isdigit():
                raise ConfigError(
                    f"{variable}={redact(self.url)}: the database must be a number, got "
                    f"{parts[1]!r}"
                )
            db = int(parts[1])
        return SentinelTarget(tuple(hosts), parts[0], db, username, password)

    def _tls_kwargs(self) -> dict[str, Any]:
        if not self.tls:
            return {}
        kwargs: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if self.tls_ca_file:
            kwargs["ssl_ca_certs"] = self.tls_ca_file
        if self.tls_cert_file:
            kwargs["ssl_certfile"] = self.tls_cert_file
            kwargs["ssl_keyfile"] = self.tls_key_file
        return kwargs

    def _credentials(self, username: str | None, password: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.username or username:
            kwargs["username"] = self.username or username
        if self.password or password:
            kwargs["password"] = self.password or password
        return kwargs

    def _node_kwargs(self, kwargs: dict[str, Any], target: SentinelTarget | None) -> dict[str, Any]:
        """A data node's connection arguments: `kwargs`, the credentials (the settings' over
        the URL's) and TLS. A direct URL's scheme says TLS itself; a sentinel-found node's
        connection is told."""
        node = {**kwargs}
        if target is None:
            node.update(self._credentials(None, None))
        else:
            node.update(self._credentials(target.username, target.password))
            if self.tls:
                node["ssl"] = True
        node.update(self._tls_kwargs())
        return node

    def _sentinel_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
        }
        if self.tls:
            kwargs["ssl"] = True
            kwargs.update(self._tls_kwargs())
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def client(self, **overrides: Any) -> aioredis.Redis:
        """An asyncio client (lazy: nothing is connected until the first command)."""
        kwargs: dict[str, Any] = {
            "decode_responses": True,
            "health_check_interval": 30,
            "socket_keepalive": True,
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry_on_timeout": True,
            **overrides,
        }
        if self.scheme in SENTINEL_SCHEMES:
            target = self.sentinel()
            sentinels = _AsyncSentinel(
                list(target.hosts),
                sentinel_kwargs=self._sentinel_kwargs(),
                **self._node_kwargs(kwargs, target),
            )
            return sentinels.master_for(target.service, redis_class=aioredis.Redis, db=target.db)
        return aioredis.Redis.from_url(self.url, **self._node_kwargs(kwargs, None))

    def sync_client(self, *, timeout: float) -> redis.Redis:
        """A blocking client whose every wait is bounded by `timeout` (the heartbeat's)."""
        kwargs: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "socket_keepalive": True,
        }
        if self.scheme in SENTINEL_SCHEMES:
            target = self.sentinel()
            sentinels = _SyncSentinel(
                list(target.hosts),
                sentinel_kwargs={**self._sentinel_kwargs(), "socket_timeout": timeout},
                **self._node_kwargs(kwargs, target),
            )
            return sentinels.master_for(target.service, redis_class=redis.Redis, db=target.db)
        return redis.Redis.from_url(self.url, **self._node_kwargs(kwargs, None))


def client(target: str | RedisConfig, **overrides: Any) -> aioredis.Redis:
    config = target if isinstance(target, RedisConfig) else RedisConfig(target)
    return config.client(**overrides)


def _hint(exc: BaseException, config: RedisConfig) -> str:
    text = str(exc)
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        return " (check the user and password: in the URL, or REDIS_USERNAME/REDIS_PASSWORD)"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            " (the server's certificate is not trusted: set REDIS_TLS_CA_FILE to the CA that "
            "signed it)"
        )
    if config.scheme in SENTINEL_SCHEMES and "master" in text.lower():
        return " (ask a sentinel: SENTINEL GET-MASTER-ADDR-BY-NAME <service>)"
    return ""


async def connect(
    target: str | RedisConfig | None, *, variable: str = "REDIS_URL"
) -> aioredis.Redis:
    """A connected client, or ConfigError naming the variable and the cause."""
    if not isinstance(target, RedisConfig):  # a bare URL; from_env has checked a config
        target = RedisConfig(target or "")
        if target.url:
            target.check(variable)
    config = target
    if not config.url:
        raise ConfigError(
            f"{variable} is not set: point it at your Redis server, "
            "e.g. export REDIS_URL=redis://localhost:6379/0 "
            "(or run `uv run flowmesh demo`, which starts an embedded Redis)"
        )
    try:
        conn = config.client()
    except ValueError as exc:
        raise ConfigError(f"{variable}={config} is not a valid Redis URL: {exc}") from None
    try:
        await conn.ping()
    except (RedisConnectionError, RedisTimeoutError, ResponseError, OSError) as exc:
        await conn.aclose()
        raise ConfigError(
            f"cannot reach Redis at {variable}={config}: {exc}{_hint(exc, config)}"
        ) from None
    return conn


async def check_server(conn: aioredis.Redis) -> None:
    """Warn about server settings that can lose tasks."""
    try:
        policy = (await conn.config_get("maxmemory-policy")).get("maxmemory-policy")
    except ResponseError:  # CONFIG may be disabled by ACL on managed Redis
        return
    if policy and policy != "noeviction":
        log.warning(
            "Redis maxmemory-policy is %r: Redis may evict task keys under memory pressure. "
            "Set it to 'noeviction'.",
            policy,
        )
