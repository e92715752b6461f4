"""Model backends. Every method is called from the agent's single model thread, so a backend never
sees a forward pass and an adapter change at the same time (that is what makes swaps atomic)."""

from __future__ import annotations

from typing import Any, Protocol

from edgetune_agent.adapters import BaseIdentity, Delta


class RequestError(ValueError):
    """The request does not fit the model (HTTP 400); the message says what was expected."""


class Backend(Protocol):
    base: BaseIdentity

    def metadata(self) -> dict[str, Any]:
        """``inputs``/``outputs`` tensor metadata for ``GET /v2/models/{name}``."""
        ...

    def add(self, name: str, delta: Delta) -> None:
        """Load ``delta`` next to the base under ``name`` without activating it (raises AdapterRefused)."""
        ...

    def remove(self, name: str) -> None: ...

    def activate(self, name: str | None) -> None:
        """Make ``name`` (``None``: the bare base) answer requests from now on."""
        ...

    def predict(
        self, inputs: list[dict[str, Any]], parameters: dict[str, Any], adapter: str | None
    ) -> list[dict[str, Any]]:
        """Open Inference Protocol input tensors -> output tensors, computed with ``adapter``."""
        ...

    def evaluate(self, adapter: str | None) -> dict[str, float] | None:
        """Loss/accuracy of ``adapter`` on the node's labelled held-out data (``None``: no such data)."""
        ...

    def close(self) -> None: ...
