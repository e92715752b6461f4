"""The contract between the operator and the edge agent, carried on the agent's own pod.

- The operator writes the desired adapter as JSON in the pod annotation ``edgetune.io/adapter``
  (``AdapterAssignment``). The agent reads it through a downward-API volume (the kubelet refreshes
  the file when the annotation changes), so learning what to run needs no apiserver access and
  keeps working while the hub is unreachable.
- When a release rolls an adapter back, the operator also publishes a ``Revocation`` object in
  the package's bucket (``revocation_location``); agents poll it for the adapter they serve, so
  an agent in a cluster the operator cannot reach falls back by itself.
- The agent reports what it actually serves as JSON in ``edgetune.io/adapter-status``
  (``AdapterReport``) and as the pod condition ``edgetune.io/AdapterReady``, which a pod lists
  in ``spec.readinessGates`` so that a new pod takes traffic only once its adapter is loaded.

Both sides import these models, so a field means the same on each side. No torch, no Kubernetes
client here.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, ValidationError, model_validator

from edgetune_api.delta import Encoding
from edgetune_api.meta import SHA256_PATTERN, ApiModel

ASSIGNMENT_ANNOTATION = "edgetune.io/adapter"
REPORT_ANNOTATION = "edgetune.io/adapter-status"
READY_CONDITION = "edgetune.io/AdapterReady"
"""Pod condition type set by the agent; list it in the pod's ``spec.readinessGates``."""


class WireModel(ApiModel):
    """A message between separately upgraded components (operator, agents): fields a newer side
    adds are ignored by an older one instead of making the whole message unreadable."""

    model_config = ConfigDict(extra="ignore")


Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
Text = Annotated[str, StringConstraints(max_length=1024)]

#: Why an adapter was refused or not (yet) loaded: the ``reason`` of reports, Events and metrics.
REFUSAL_REASONS = (
    "InvalidAssignment",  # the annotation is not a valid AdapterAssignment
    "NotFound",  # no package at the URI
    "StorageUnavailable",  # S3 / MLflow did not answer (retried)
    "DiskFull",  # no space to download into the cache (retried)
    "HashMismatch",  # a file or the manifest does not have the SHA-256 it should
    "InvalidManifest",  # manifest.json missing or not an edgetune.delta/v1 manifest
    "Unsigned",  # a signature is required and the package has none
    "SignatureInvalid",  # the signature does not verify with a trusted key
    "DecodeFailed",  # the weights file cannot be decoded (corrupt zstd, bad safetensors)
    "IncompatibleBase",  # trained on another base model
    "ShapeMismatch",  # tensors do not fit the base model's layers
    "Revoked",  # the package was revoked (rolled back) and must not run
    "EvalRegression",  # the local evaluation gate found it worse than the current adapter
    "BackendRefused",  # the serving backend (vLLM) refused it: rank limit, runtime updates disabled
    "BackendUnavailable",  # the serving backend did not answer (retried)
)
RETRYABLE_REASONS = frozenset({"StorageUnavailable", "DiskFull", "BackendUnavailable"})


class AdapterAssignment(WireModel):
    """What the operator wants the agent to run (annotation ``edgetune.io/adapter``): an adapter
    package, or (``base: true``) the bare base model — the rollback target when no adapter was
    stable before."""

    version: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    """Version label of the adapter (the MLflow model version); reported back verbatim."""
    uri: Annotated[str, StringConstraints(max_length=2048)] = ""
    """Where the delta package is: `s3://bucket/prefix`, `models:/name/version`, or a local folder."""
    sha256: str = ""
    """The package digest (SHA-256 of its manifest.json); anything else at the URI is refused."""
    base: bool = False
    """Serve the bare base model (then `uri` and `sha256` stay empty)."""
    release: Text | None = None
    """`namespace/name` of the AdapterRelease that assigned it (metric label, report)."""
    encoding: Encoding | None = None
    """Expected weight encoding; the manifest is authoritative and must agree when this is set."""
    signer: Sha256 | None = None
    """Fingerprint (`key_fingerprint`) of the key expected to have signed the package. The agent
    verifies with its own locally trusted keys; this field only selects among them."""
    mode: Literal["serve", "shadow"] = "serve"
    """`serve`: answer requests with it. `shadow`: keep serving the current adapter, run this one
    beside it on live requests and export how often they agree."""
    revoked: Annotated[list[Sha256], Field(max_length=256)] = Field(default_factory=list)
    """Package digests that must never run here (rolled back), even if a stale assignment names one."""

    @model_validator(mode="after")
    def _package_or_base(self) -> AdapterAssignment:
        if self.base:
            if self.uri or self.sha256 or self.mode != "serve":
                raise ValueError(
                    "a base-model assignment (base: true) has no uri or sha256 and is served, not shadowed"
                )
            return self
        if not _URI.match(self.uri):
            raise ValueError(f"uri must start with s3://, models:/, file:// or /, got {self.uri[:80]!r}")
        if not _SHA256.match(self.sha256):
            raise ValueError("sha256 must be the package digest: 64 lowercase hexadecimal digits")
        return self


_URI = re.compile(r"^(s3://|models:/|file://|/).+")
_SHA256 = re.compile(SHA256_PATTERN)


class ServedAdapter(WireModel):
    """One adapter as the agent holds it."""

    version: Text
    sha256: Sha256 | None = None
    """Package digest (none for the bare base model)."""
    release: Text | None = None
    loaded_at: str | None = None
    """RFC 3339 time it became active (or, for a shadow, was loaded)."""


class ReportError(WireModel):
    """Why the desired adapter is not (yet) served."""

    reason: Text
    """One of ``REFUSAL_REASONS``."""
    message: Annotated[str, StringConstraints(max_length=4096)]
    version: Text | None = None
    sha256: Text | None = None


class AdapterReport(WireModel):
    """What the agent serves (annotation ``edgetune.io/adapter-status``)."""

    state: Literal["Serving", "Loading", "Refused", "Retrying", "NoAssignment"]
    """`Serving`: the desired adapter is active. `Loading`: fetching/verifying it. `Refused`: it
    failed verification or checks (permanent for that digest). `Retrying`: storage or disk
    problems, retried with backoff. `NoAssignment`: nothing desired (serving what it has)."""
    active: ServedAdapter | None = None
    """The adapter answering requests (none: the bare base model)."""
    desired: ServedAdapter | None = None
    """The adapter the current assignment names."""
    shadow: ServedAdapter | None = None
    """A candidate run in shadow beside the active adapter."""
    error: ReportError | None = None
    """Why the desired adapter is not active."""
    resident: list[str] = Field(default_factory=list)
    """Versions held in memory (a swap back to one of them needs no download)."""
    base_sha256: Sha256 | None = None
    """Digest of the base model the agent serves (none for a builtin base): a release refuses an
    adapter trained on another base before telling any agent to load it."""
    observed_at: str
    """When the agent wrote this report."""


class AssignmentError(ValueError):
    """The annotation is not a valid assignment; the message says what is wrong."""


def parse_assignment(raw: str) -> AdapterAssignment:
    try:
        return AdapterAssignment.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise AssignmentError(f"{ASSIGNMENT_ANNOTATION} is not a valid adapter assignment: {problems}") from exc


def key_fingerprint(public_key_pem: bytes) -> str:
    """SHA-256 of the public key's DER (SubjectPublicKeyInfo) bytes: a stable key id."""
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        Encoding as KeyEncoding,
    )
    from cryptography.hazmat.primitives.serialization import PublicFormat, load_pem_public_key  # noqa: PLC0415

    key = load_pem_public_key(public_key_pem)
    return hashlib.sha256(key.public_bytes(KeyEncoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


# -- the kubelet's downward-API file format ---------------------------------------------------

_GO_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|[abfnrtv\\'\"])")
_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", "'": "'", '"': '"'}


def _go_unquote(quoted: str) -> str:
    """Inverse of Go's ``strconv.Quote`` (what ``%q`` prints); bytes escapes are UTF-8 decoded."""
    if len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
        raise ValueError(f"not a Go quoted string: {quoted[:40]!r}")
    out = bytearray()
    body = quoted[1:-1]
    pos = 0
    for match in _GO_ESCAPE.finditer(body):
        out += body[pos : match.start()].encode()
        esc = match.group(1)
        if esc[0] == "x":
            out.append(int(esc[1:], 16))
        elif esc[0] in "uU":
            out += chr(int(esc[1:], 16)).encode()
        elif esc[0] in "01234567":
            out.append(int(esc, 8))
        else:
            out += _SIMPLE[esc].encode()
        pos = match.end()
    out += body[pos:].encode()
    return out.decode("utf-8", errors="replace")


def parse_downward_map(text: str) -> dict[str, str]:
    """Parse a downward-API ``metadata.annotations``/``labels`` file: ``key="go-quoted value"`` lines."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"downward-API line without '=': {line[:80]!r}")
        result[key] = _go_unquote(value)
    return result


def format_downward_map(values: dict[str, str]) -> str:
    """What the kubelet writes for a map (sorted keys, Go-quoted values); the inverse of the parser."""

    def quote(value: str) -> str:
        out = ['"']
        for ch in value:
            if ch in ('"', "\\"):
                out.append("\\" + ch)
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif ch == "\r":
                out.append("\\r")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\x{ord(ch):02x}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)

    return "\n".join(f"{k}={quote(v)}" for k, v in sorted(values.items()))


def dumps(model: ApiModel) -> str:
    """Compact wire JSON of a protocol object (what goes into the annotation)."""
    return json.dumps(model.to_wire(), separators=(",", ":"), sort_keys=True)


REVOCATION_PREFIX = ".edgetune/revoked/"
"""Where published revocations live in a package's bucket: ``<prefix><sha256>.json``."""


class Revocation(WireModel):
    """A rolled-back package, published in S3 by the operator (``revocation_location``).

    Not signed, on purpose: a revocation can only take an adapter out of service (agents fall back
    to an adapter they already hold or the base), never put one in; whoever can write the bucket
    could already delete the package itself."""

    sha256: Sha256
    """The revoked package digest."""
    version: Text = ""
    """Its registry version."""
    release: Text = ""
    """``namespace/name`` of the AdapterRelease that rolled it back."""
    reason: Text = ""
    """Why (AnalysisFailed, AgentsRefused, ProgressDeadlineExceeded, Aborted …)."""
    revoked_at: Text = ""
    """RFC 3339 time of the rollback."""


def revocation_location(package_uri: str, sha256: str) -> tuple[str, str] | None:
    """(bucket, key) of the revocation object for a package stored at an ``s3://`` URI; None for
    packages elsewhere (local folders, unresolved ``models:/`` URIs)."""
    if not package_uri.startswith("s3://") or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        return None
    bucket = package_uri[len("s3://") :].split("/", 1)[0]
    return (bucket, f"{REVOCATION_PREFIX}{sha256}.json") if bucket else None
