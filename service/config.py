"""Settings from environment variables and an optional TOML file.

Precedence, highest first: environment variable, TOML file, default.  The TOML
file is named by ``--config`` or ``PACS_CONFIG``; its keys are the field names
below, at the top level or under a ``[pacs]`` table.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

_AE_TITLE = re.compile(r"^[\x20-\x7e]{1,16}$")


class ConfigError(ValueError):
    """A setting has a value the service cannot use."""


_PEER = re.compile(r"^([\x20-\x7e]{1,16})=(\[[0-9A-Fa-f:.]+\]|[^:=\s]+):(\d{1,5})$")


@dataclass(frozen=True)
class Peer:
    """Where a requester's AE listens for the report on a new association."""

    ae_title: str
    host: str
    port: int


def parse_peer(entry: str) -> Peer:
    """``AE=host:port`` (an IPv6 address in brackets) -> :class:`Peer`."""
    match = _PEER.match(entry.strip())
    if not match or not match.group(1).strip() or not 0 < int(match.group(3)) < 65536:
        raise ConfigError(f"storage_commitment_peers entry {entry!r}: expected AE=host:port")
    return Peer(match.group(1).strip(), match.group(2).strip("[]"), int(match.group(3)))


def parse_peers(entries: Iterable[str]) -> dict[str, Peer]:
    peers: dict[str, Peer] = {}
    for entry in entries:
        peer = parse_peer(entry)
        peers[peer.ae_title] = peer
    return peers


def _split_list(value: str | list[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() for v in value if v.strip())


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    data_dir: Path = Path("data")
    storage_dir: Path | None = None
    ae_title: str = "PACS_ANNOTATE"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16
    max_pdu_size: int = 262144
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    # storage commitment requesters that get the report on a new association: AE=host:port
    storage_commitment_peers: tuple[str, ...] = ()
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    commit_batch_max: int = 128
    min_free_disk_mb: int = 1024
    # reject invalid UIDs and C-STOREs that name another instance than their data set,
    # instead of storing them with a tolerated_defects row (docs/ingest.md)
    strict_ingest: bool = False
    queue_stages: tuple[str, ...] = ("tags",)
    tags_worker: bool = True
    tags_quiet_seconds: float = 1.0
    tags_max_lag_seconds: float = 30.0
    site_vocabulary: Path | None = None
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_client_ca: Path | None = None
    image_weights: Path | None = None
    feature_store_dir: Path | None = None
    image_device: str = "auto"
    image_batch: int = 64
    image_decode_workers: int = 0
    image_max_attempts: int = 3
    log_level: str = "INFO"
    log_format: str = "text"  # the containers set json (Dockerfile, docker-compose.yml)
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0

    @property
    def storage_path(self) -> Path:
        return self.storage_dir if self.storage_dir is not None else self.data_dir / "storage"

    @property
    def feature_store_path(self) -> Path:
        return (self.feature_store_dir if self.feature_store_dir is not None
                else self.data_dir / "features")

    @property
    def pgdata_path(self) -> Path:
        return self.data_dir / "pgdata"

    def validate(self) -> "Settings":
        if not _AE_TITLE.match(self.ae_title) or self.ae_title.strip() == "":
            raise ConfigError(f"ae_title {self.ae_title!r}: 1-16 printable ASCII characters")
        for aet in self.allowed_calling_aets:
            if not _AE_TITLE.match(aet):
                raise ConfigError(f"allowed_calling_aets entry {aet!r} is not a valid AE title")
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f"allowed_networks entry {network!r} is not an address or "
                                  "network (CIDR)") from None
        if self.storage_commitment_peers:
            parse_peers(self.storage_commitment_peers)  # ConfigError on a bad entry
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is outside 1-65535")
        if self.max_associations < 1:
            raise ConfigError("max_associations must be at least 1")
        if self.max_pdu_size != 0 and self.max_pdu_size < 4096:
            raise ConfigError("max_pdu_size must be 0 (unlimited) or at least 4096")
        if self.processes < 1:
            raise ConfigError("processes must be at least 1")
        unknown_stages = set(self.queue_stages) - {"tags", "image"}
        if unknown_stages:  # a misspelt stage would queue rows no worker ever claims
            raise ConfigError(f"queue_stages: unknown stage(s) {', '.join(sorted(unknown_stages))}"
                              " (stages: tags, image)")
        if self.min_free_disk_mb < 0:
            raise ConfigError("min_free_disk_mb must be 0 (no check) or more")
        if self.commit_batch_max < 1:
            raise ConfigError("commit_batch_max must be at least 1")
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ConfigError("tls_certificate and tls_private_key go together")
        if self.tls_client_ca is not None and self.tls_certificate is None:
            raise ConfigError("tls_client_ca needs tls_certificate and tls_private_key")
        if self.image_batch < 1:
            raise ConfigError("image_batch must be at least 1")
        if self.image_decode_workers < 0:
            raise ConfigError("image_decode_workers must be 0 (one per CPU) or more")
        if self.image_max_attempts < 1:
            raise ConfigError("image_max_attempts must be at least 1")
        if self.image_device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?",
                                                            self.image_device):
            raise ConfigError(f"image_device {self.image_device!r}: auto, cpu, cuda or cuda:N")
        if self.log_format not in ("json", "text"):
            raise ConfigError("log_format must be 'json' or 'text'")
        return self


# environment variable -> field name; DATABASE_URL keeps its conventional name
ENV_VARS: dict[str, str] = {
    "DATABASE_URL": "database_url",
    "PACS_DATA_DIR": "data_dir",
    "PACS_STORAGE_DIR": "storage_dir",
    "PACS_AE_TITLE": "ae_title",
    "PACS_BIND_ADDRESS": "bind_address",
    "PACS_PORT": "port",
    "PACS_MAX_ASSOCIATIONS": "max_associations",
    "PACS_MAX_PDU_SIZE": "max_pdu_size",
    "PACS_ALLOWED_CALLING_AETS": "allowed_calling_aets",
    "PACS_ALLOWED_NETWORKS": "allowed_networks",
    "PACS_STORAGE_COMMITMENT_PEERS": "storage_commitment_peers",
    "PACS_PROCESSES": "processes",
    "PACS_COMMIT_BATCH_MAX": "commit_batch_max",
    "PACS_MIN_FREE_DISK_MB": "min_free_disk_mb",
    "PACS_STRICT_INGEST": "strict_ingest",
    "PACS_QUEUE_STAGES": "queue_stages",
    "PACS_TAGS_WORKER": "tags_worker",
    "PACS_TAGS_QUIET_SECONDS": "tags_quiet_seconds",
    "PACS_TAGS_MAX_LAG_SECONDS": "tags_max_lag_seconds",
    "PACS_SITE_VOCABULARY": "site_vocabulary",
    "PACS_TLS_CERTIFICATE": "tls_certificate",
    "PACS_TLS_PRIVATE_KEY": "tls_private_key",
    "PACS_TLS_CLIENT_CA": "tls_client_ca",
    "PACS_IMAGE_WEIGHTS": "image_weights",
    "PACS_FEATURE_STORE_DIR": "feature_store_dir",
    "PACS_IMAGE_DEVICE": "image_device",
    "PACS_IMAGE_BATCH": "image_batch",
    "PACS_IMAGE_DECODE_WORKERS": "image_decode_workers",
    "PACS_IMAGE_MAX_ATTEMPTS": "image_max_attempts",
    "PACS_LOG_LEVEL": "log_level",
    "PACS_LOG_FORMAT": "log_format",
    "PACS_NETWORK_TIMEOUT": "network_timeout",
    "PACS_ACSE_TIMEOUT": "acse_timeout",
    "PACS_DIMSE_TIMEOUT": "dimse_timeout",
}

_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError("expected true or false")
            return text in ("1", "true", "yes", "on")
        if kind in ("int",):
            return int(value)
        if kind in ("float",):
            return float(value)
        if kind in ("Path", "Path | None"):
            return Path(value).expanduser() if value not in (None, "") else None
        if kind == "tuple[str, ...]":
            return _split_list(value)
        if kind in ("str | None",):
            return value or None
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot use {value!r} ({exc})") from None


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from defaults, the TOML file, the environment and overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get("PACS_CONFIG")
    if config_file:
        path = Path(config_file)
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        table = document.get("pacs", document)
        for key, value in table.items():
            if key not in _FIELDS:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, value)
    for env_name, field_name in ENV_VARS.items():
        if env_name in environ and environ[env_name] != "":
            values[field_name] = _coerce(field_name, environ[env_name])
    for key, value in overrides.items():
        if value is not None:
            values[key] = _coerce(key, value) if isinstance(value, str) else value
    return Settings(**values).validate()
