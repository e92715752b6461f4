"""The operator's own Kubernetes client: kubeconfig and service-account parsing (its calls run against
a real API server in tests/e2e/test_operator_clients.py)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from edgetune_operator.clients import kube
from edgetune_operator.clients.kube import Connection, InCluster, Kube, KubeconfigError

CA = base64.b64encode(b"CA").decode()


def _config(user: dict[str, object], *, cluster: dict[str, object] | None = None) -> dict[str, object]:
    return {
        "current-context": "edge",
        "contexts": [{"name": "other", "context": {"cluster": "b", "user": "b"}},
                     {"name": "edge", "context": {"cluster": "a", "user": "u", "namespace": "factory"}}],
        "clusters": [{"name": "a", "cluster": cluster or {"server": "https://10.0.0.1:6443/",
                                                           "certificate-authority-data": CA}},
                     {"name": "b", "cluster": {"server": "https://b"}}],
        "users": [{"name": "u", "user": user}, {"name": "b", "user": {"token": "b"}}],
    }  # fmt: skip


def test_the_current_context_decides_server_ca_user_and_namespace() -> None:
    cert, key = base64.b64encode(b"CERT").decode(), base64.b64encode(b"KEY").decode()
    connection = Connection.from_kubeconfig(_config({"client-certificate-data": cert, "client-key-data": key}))
    assert connection.server == "https://10.0.0.1:6443"
    assert (connection.ca_pem, connection.cert_pem, connection.key_pem) == ("CA", "CERT", "KEY")
    assert connection.namespace == "factory" and connection.token is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_config({"exec": {"command": "aws"}}), "authenticates with 'exec', which the operator does not run"),
        (_config({"auth-provider": {"name": "oidc"}}), "'auth-provider'"),
        ({**_config({"token": "t"}), "current-context": "gone"}, "context 'gone' is not in the kubeconfig's contexts"),
        (_config({"token": "t"}, cluster={"insecure-skip-tls-verify": True}), "cluster 'a' has no server"),
        ({**_config({"token": "t"}), "current-context": None}, "current-context is not set"),
        ("just text", "not a kubeconfig"),
    ],
)
def test_an_unusable_kubeconfig_is_refused_with_what_is_wrong(config: object, message: str) -> None:
    with pytest.raises(KubeconfigError, match=message):
        Connection.from_kubeconfig(config)


def test_kubeconfig_files_merge_first_wins_and_relative_paths_follow_their_file(tmp_path: Path) -> None:
    first, second = tmp_path / "one" / "config", tmp_path / "two" / "config"
    first.parent.mkdir()
    second.parent.mkdir()
    first.write_text(yaml.safe_dump({"current-context": "edge", "contexts": [
        {"name": "edge", "context": {"cluster": "a", "user": "u"}}]}))  # fmt: skip
    second.write_text(yaml.safe_dump({"current-context": "ignored", "contexts": [
        {"name": "edge", "context": {"cluster": "wrong", "user": "wrong"}}],
        "clusters": [{"name": "a", "cluster": {"server": "https://a", "certificate-authority": "ca.crt"}}],
        "users": [{"name": "u", "user": {"client-certificate": "/abs/tls.crt", "client-key": "tls.key",
                                        "tokenFile": "token"}}]}))  # fmt: skip
    connection = Connection.from_kubeconfig_files({"KUBECONFIG": f"{first}:{second}"})
    assert connection.server == "https://a"
    assert connection.ca_path == str(second.parent / "ca.crt")
    assert connection.cert_path == "/abs/tls.crt" and connection.key_path == str(second.parent / "tls.key")
    assert connection.token_path == str(second.parent / "token")


def test_an_unreadable_kubeconfig_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match="no-such-file"):
        Connection.from_kubeconfig_files({"KUBECONFIG": str(tmp_path / "no-such-file")})


def test_the_pods_service_account_is_a_token_file_read_again_not_a_copied_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t1")
    (tmp_path / "namespace").write_text("edgetune-system")
    pod = InCluster.detect({"EDGETUNE_SERVICE_ACCOUNT_DIR": str(tmp_path), "KUBERNETES_SERVICE_HOST": "fd00::1"})
    assert pod is not None
    connection = Connection.from_service_account(pod)
    assert connection.server == "https://[fd00::1]:443" and connection.namespace == "edgetune-system"
    assert connection.token is None and connection.token_path == str(tmp_path / "token")
    assert connection.ca_path == str(tmp_path / "ca.crt")


def test_a_rotated_token_file_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    client = Kube(Connection(server="http://127.0.0.1:1", token_path=str(token)))
    assert client._headers()["Authorization"] == "Bearer first"
    token.write_text("rotated\n")
    assert client._headers()["Authorization"] == "Bearer first"  # within TOKEN_REREAD_SECONDS
    monkeypatch.setattr(kube, "TOKEN_REREAD_SECONDS", 0.0)
    assert client._headers()["Authorization"] == "Bearer rotated"
