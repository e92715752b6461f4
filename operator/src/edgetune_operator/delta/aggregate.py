"""Build the FedAvg package from verified per-node packages: decode each adapter (numpy), average
weighted by samples, encode with the job's encoding, and write a manifest whose lineage names
every source package. Deterministic: the same inputs give the same bytes (and so the same digest),
so a retried aggregation after an operator restart uploads and registers the identical package.
"""

from __future__ import annotations

import hashlib

from edgetune_api import codec
from edgetune_api.delta import (
    MANIFEST,
    SIGNATURE,
    DeltaManifest,
    FileEntry,
    Lineage,
    manifest_bytes,
    sha256_bytes,
    sign,
)
from edgetune_operator.clients.object_store import Verified
from edgetune_operator.delta.fedavg import AggregationError, fedavg


def aggregate(
    packages: list[Verified], *, signing_key_pem: bytes | None
) -> tuple[str, DeltaManifest, dict[str, bytes]]:
    """(digest, manifest, files) of the averaged adapter."""
    if not packages:
        raise AggregationError("no verified per-node adapters to average")
    packages = sorted(packages, key=lambda p: p.digest)
    first = packages[0].manifest
    for p in packages[1:]:
        if p.manifest.peft != first.peft:
            raise AggregationError(f"{p.uri} was trained with a different adapter configuration than {packages[0].uri}")
        if p.manifest.lineage.base_model_sha256 != first.lineage.base_model_sha256:
            raise AggregationError(f"{p.uri} was trained on a different base model than {packages[0].uri}")
    adapters = []
    for p in packages:
        try:
            adapters.append(codec.decode(p.files[codec.WEIGHTS[p.manifest.encoding]], p.manifest.encoding))
        except codec.DecodeError as exc:  # a verified, signed package that is still not sane weights
            raise AggregationError(f"{p.uri}: {exc}") from None
    samples = [p.manifest.lineage.samples for p in packages]
    merged = fedavg(adapters, samples)
    encoding = first.encoding
    weights = codec.encode(merged, encoding)
    files = {codec.WEIGHTS[encoding]: weights}  # the peft configuration is in the manifest
    total = sum(samples)
    manifest = DeltaManifest(
        encoding=encoding,
        files={name: FileEntry(sha256=sha256_bytes(data), bytes=len(data)) for name, data in files.items()},
        peft=first.peft,
        lineage=Lineage(
            base_model_uri=first.lineage.base_model_uri,
            base_model_sha256=first.lineage.base_model_sha256,
            base_model_revision=first.lineage.base_model_revision,
            data_sha256=hashlib.sha256("".join(p.manifest.lineage.data_sha256 for p in packages).encode()).hexdigest(),
            samples=total,
            data_format=first.lineage.data_format,
            job_namespace=first.lineage.job_namespace,
            job_name=first.lineage.job_name,
            job_uid=first.lineage.job_uid,
            cluster="fedavg",
            node=None,
            trainer_version=first.lineage.trainer_version,
            device=",".join(sorted({p.manifest.lineage.device for p in packages if p.manifest.lineage.device})) or None,
        ),
        steps=max(p.manifest.steps for p in packages),
        duration_s=max(p.manifest.duration_s for p in packages),
        metrics={  # sample-weighted mean of what every node measured on its own evaluation split
            key: round(sum(p.manifest.metrics[key] * p.manifest.lineage.samples for p in packages) / total, 6)
            for key in sorted(set.intersection(*(set(p.manifest.metrics) for p in packages)))
        },
        energy_joules=sum(p.manifest.energy_joules or 0.0 for p in packages) or None,
        energy_method=first.energy_method,
        peak_memory_bytes=max((p.manifest.peak_memory_bytes or 0) for p in packages) or None,
        adapter_bytes=len(weights),
        created_at=max(p.manifest.created_at for p in packages),
        sources=[
            {"digest": p.digest, "uri": p.uri, "cluster": p.manifest.lineage.cluster, "node": p.manifest.lineage.node,
             "samples": p.manifest.lineage.samples}
            for p in packages
        ],
    )  # fmt: skip
    raw = manifest_bytes(manifest)
    files[MANIFEST] = raw
    if signing_key_pem is not None:
        files[SIGNATURE] = sign(raw, signing_key_pem)
    return sha256_bytes(raw), manifest, files
