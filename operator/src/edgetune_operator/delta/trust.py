"""The trust chain of a trained package (docs/security.md): a trainer signs ``trainer.sig`` with a
key derived for it alone; the operator checks that signature, then counter-signs ``manifest.sig``
with the hub key that edge agents trust. No fleet-wide key ever leaves the hub."""

from __future__ import annotations

from collections.abc import Mapping

from edgetune_api.delta import (
    MANIFEST,
    SIGNATURE,
    TRAINER_SIGNATURE,
    DeltaManifest,
    DeltaVerificationError,
    derive_trainer_key,
    public_key_pem,
    sign,
    verify_package,
)  # fmt: skip


def verify_trained(
    files: Mapping[str, bytes], *, hub_private: bytes | None, context: str, job_uid: str, cluster: str,
    node: str | None,
) -> tuple[DeltaManifest, bytes | None]:  # fmt: skip
    """Verify a package a trainer uploaded; return its manifest and the hub's ``manifest.sig`` to
    store (None when the package holds a valid one already, or the job signs nothing).

    A valid hub signature is accepted as it is (counter-signed before an operator restart); any
    other ``manifest.sig`` is ignored, and ``trainer.sig`` must verify with the key derived for
    ``context`` (this job, this trainer): a package signed by another trainer, or not at all, fails.
    The lineage must name this job, cluster and node: a package copied from elsewhere — even one the
    hub signed — is refused.
    """
    manifest, countersignature = _signed(files, hub_private, context)
    lineage = manifest.lineage
    if lineage.job_uid not in (None, job_uid):
        raise DeltaVerificationError(f"the package belongs to job uid {lineage.job_uid}, not {job_uid}", "Foreign")
    if lineage.cluster not in (None, cluster) or (None not in (lineage.node, node) and lineage.node != node):
        raise DeltaVerificationError(
            f"the package was trained on {lineage.cluster}/{lineage.node}, not on {cluster}/{node}", "Foreign"
        )
    return manifest, countersignature


def _signed(files: Mapping[str, bytes], hub_private: bytes | None, context: str) -> tuple[DeltaManifest, bytes | None]:
    if hub_private is None:
        return verify_package(files), None
    hub_public = public_key_pem(hub_private)
    if SIGNATURE in files:
        try:
            return verify_package(files, hub_public), None
        except DeltaVerificationError as exc:
            if exc.reason != "SignatureInvalid":
                raise
    trainer_public = public_key_pem(derive_trainer_key(hub_private, context))
    try:
        manifest = verify_package(files, trainer_public, signature=TRAINER_SIGNATURE)
    except DeltaVerificationError as exc:
        if exc.reason in ("SignatureInvalid", "Unsigned"):
            raise DeltaVerificationError(
                f"{TRAINER_SIGNATURE} does not verify with the key this trainer was given ({exc})", exc.reason
            ) from None
        raise
    return manifest, sign(files[MANIFEST], hub_private)
