from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, load_settings
from service.database.engine import redact, sqlalchemy_url


def test_defaults():
    settings = load_settings(environ={})
    assert settings.database_url is None
    assert settings.port == 11112 and settings.ae_title == "PACS_ANNOTATE"
    assert settings.storage_path == Path("data") / "storage"


def test_environment_beats_file_and_overrides_beat_environment(tmp_path):
    config = tmp_path / "pacs.toml"
    config.write_text('[pacs]\nport = 4242\nae_title = "FROMFILE"\n'
                      'allowed_calling_aets = ["A", "B"]\n')
    settings = load_settings(config, environ={"PACS_PORT": "5555"})
    assert settings.port == 5555
    assert settings.ae_title == "FROMFILE"
    assert settings.allowed_calling_aets == ("A", "B")
    assert load_settings(config, environ={"PACS_PORT": "5555"}, port=6666).port == 6666


@pytest.mark.parametrize("environ, message", [
    ({"PACS_PORT": "0"}, "port"),
    ({"PACS_PORT": "eleven"}, "port"),
    ({"PACS_AE_TITLE": "THIS_TITLE_IS_TOO_LONG"}, "ae_title"),
    ({"PACS_MAX_PDU_SIZE": "100"}, "max_pdu_size"),
    ({"PACS_LOG_FORMAT": "xml"}, "log_format"),
    ({"PACS_QUEUE_STAGES": "tags,imgae"}, "queue_stages"),
])
def test_invalid_values_are_refused_with_the_setting_named(environ, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)


def test_unknown_key_in_file_is_an_error(tmp_path):
    config = tmp_path / "pacs.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(config, environ={})


def test_urls():
    assert sqlalchemy_url("postgresql://h/db") == "postgresql+psycopg://h/db"
    assert sqlalchemy_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert "secret" not in redact("postgresql://u:secret@h/db")


def test_booleans_and_paths_from_the_environment(tmp_path):
    settings = load_settings(environ={"PACS_TAGS_WORKER": "false",
                                      "PACS_SITE_VOCABULARY": str(tmp_path / "v.toml")})
    assert settings.tags_worker is False
    assert settings.site_vocabulary == tmp_path / "v.toml"
    with pytest.raises(ConfigError, match="tags_worker"):
        load_settings(environ={"PACS_TAGS_WORKER": "maybe"})


def test_tls_settings_go_together(tmp_path):
    with pytest.raises(ConfigError, match="tls_certificate and tls_private_key"):
        load_settings(environ={"PACS_TLS_CERTIFICATE": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError, match="tls_client_ca"):
        load_settings(environ={"PACS_TLS_CLIENT_CA": str(tmp_path / "ca.pem")})


def test_allowed_networks_are_validated():
    assert load_settings(environ={"PACS_ALLOWED_NETWORKS": "10.0.0.0/8, 192.168.1.7"}
                         ).allowed_networks == ("10.0.0.0/8", "192.168.1.7")
    with pytest.raises(ConfigError, match="allowed_networks"):
        load_settings(environ={"PACS_ALLOWED_NETWORKS": "not-a-network"})
