"""The trust chain of trained packages (docs/security.md): trainer keys derived per trainer, the
operator's check of trainer.sig, the hub's counter-signature, and refusal of anything foreign."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgetune_api.delta import (
    SIGNATURE,
    TRAINER_SIGNATURE,
    DeltaManifest,
    DeltaVerificationError,
    FileEntry,
    Lineage,
    derive_trainer_key,
    public_key_pem,
    read_folder,
    sha256_bytes,
    verify_package,
    write_manifest,
)  # fmt: skip
from edgetune_operator.delta.trust import verify_trained

UID = "0b7d2a66-1c1f-4bb4-9a43-0d7b4bb6f3d1"


def _pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _package(folder: Path, key: bytes | None, *, signature: str = TRAINER_SIGNATURE, uid: str = UID,
             cluster: str = "edge-a", node: str = "gpu-0") -> dict[str, bytes]:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    weights = b"\x01\x02\x03" * 100
    (folder / "adapter.safetensors").write_bytes(weights)
    manifest = DeltaManifest(
        encoding="fp16", files={"adapter.safetensors": FileEntry(sha256=sha256_bytes(weights), bytes=len(weights))},
        peft={}, lineage=Lineage(base_model_uri="builtin:x", data_sha256="0" * 64, samples=1, data_format="npy",
                                 job_uid=uid, cluster=cluster, node=node, trainer_version="t"),
        steps=1, duration_s=1.0, metrics={}, adapter_bytes=len(weights), created_at="2026-11-29T00:00:00Z",
    )  # fmt: skip
    write_manifest(folder, manifest, key, signature=signature)
    return read_folder(folder)


def _verify(files: dict[str, bytes], hub: bytes, context: str = f"{UID}/job-a") -> tuple[DeltaManifest, bytes | None]:
    return verify_trained(files, hub_private=hub, context=context, job_uid=UID, cluster="edge-a", node="gpu-0")


def test_derived_keys_are_stable_per_trainer_and_unrelated_to_each_other_and_the_hub() -> None:
    hub = _pem()
    a1, a2, b = (derive_trainer_key(hub, c) for c in (f"{UID}/job-a", f"{UID}/job-a", f"{UID}/job-b"))
    assert a1 == a2  # the hub re-derives the public half at any time: nothing to store
    assert len({public_key_pem(k) for k in (a1, b, hub)}) == 3
    assert derive_trainer_key(_pem(), f"{UID}/job-a") != a1  # another hub key, another trainer key
    ecdsa = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(TypeError, match="Ed25519"):
        derive_trainer_key(ecdsa, "x")


def test_a_trainer_signed_package_is_counter_signed_for_the_agents(tmp_path: Path) -> None:
    hub = _pem()
    files = _package(tmp_path, derive_trainer_key(hub, f"{UID}/job-a"))
    manifest, countersignature = _verify(files, hub)
    assert manifest.lineage.node == "gpu-0" and countersignature is not None
    signed = {**files, SIGNATURE: countersignature}
    verify_package(signed, public_key_pem(hub))  # what an agent trusting the hub key checks
    assert _verify(signed, hub)[1] is None  # counter-signed already (an operator restart): nothing to write


def test_packages_signed_by_another_trainer_by_nobody_or_forged_are_refused(tmp_path: Path) -> None:
    hub = _pem()
    other = _package(tmp_path / "b", derive_trainer_key(hub, f"{UID}/job-b"))
    with pytest.raises(DeltaVerificationError, match=r"trainer\.sig does not verify") as refused:
        _verify(other, hub)
    assert refused.value.reason == "SignatureInvalid"
    with pytest.raises(DeltaVerificationError) as unsigned:
        _verify(_package(tmp_path / "u", None), hub)
    assert unsigned.value.reason == "Unsigned"
    # A manifest.sig the hub did not make is ignored, not trusted: trainer.sig still decides.
    forged = _package(tmp_path / "f", _pem(), signature=SIGNATURE)
    with pytest.raises(DeltaVerificationError):
        _verify(forged, hub)


def test_a_package_copied_from_another_job_or_node_is_refused_even_when_the_hub_signed_it(tmp_path: Path) -> None:
    hub = _pem()
    for name, kwargs in (("job", {"uid": "another-uid"}), ("node", {"node": "gpu-1"}), ("cluster", {"cluster": "b"})):
        copied = _package(tmp_path / name, hub, signature=SIGNATURE, **kwargs)  # released elsewhere, hub-signed
        with pytest.raises(DeltaVerificationError) as refused:
            _verify(copied, hub)
        assert refused.value.reason == "Foreign", name


def test_a_tampered_file_fails_whichever_signature_is_checked(tmp_path: Path) -> None:
    hub = _pem()
    files = _package(tmp_path, derive_trainer_key(hub, f"{UID}/job-a"))
    files["adapter.safetensors"] = files["adapter.safetensors"][:-1] + b"\x00"
    with pytest.raises(DeltaVerificationError, match=r"adapter\.safetensors has SHA-256"):
        _verify(files, hub)


def test_without_a_signing_key_only_the_files_are_checked(tmp_path: Path) -> None:
    files = _package(tmp_path, None)
    manifest, countersignature = verify_trained(files, hub_private=None, context="x", job_uid=UID, cluster="edge-a",
                                                node=None)  # fmt: skip
    assert countersignature is None and manifest.lineage.cluster == "edge-a"
