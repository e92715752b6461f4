"""In-process serving with torch + peft: the frozen base stays in memory once; adapters are added
next to it as named LoRA adapters (unmerged), and switching is peft's ``set_adapter``.

The base model is loaded by the trainer's own code (``edgetune_trainer.models``: the same sources,
the same SHA-256 check, the same built-in architectures), so an adapter trained there fits here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgetune_agent.adapters import AdapterRefused, BaseIdentity, Delta, s3_client
from edgetune_agent.backends import RequestError
from edgetune_agent.settings import AgentSettings

MAX_NEW_TOKENS = 256


def _check_keys(name: str, result: Any) -> None:
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if result.unexpected_keys or missing:
        raise AdapterRefused(
            "ShapeMismatch",
            f"adapter tensors do not match the base model's layers: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]}",
        )


class TorchBackend:
    def __init__(self, settings: AgentSettings, s3: Any = None) -> None:
        import torch  # noqa: PLC0415 - heavy, only for this backend

        from edgetune_trainer import models  # noqa: PLC0415

        self.torch = torch
        if settings.threads:
            torch.set_num_threads(settings.threads)
        uri = settings.base_uri
        if uri.startswith("builtin:"):
            base = models.builtin_random(
                uri.removeprefix("builtin:"), settings.builtin_channels, settings.builtin_classes,
                settings.builtin_seed,
            )  # fmt: skip
        else:
            if not settings.base_sha256:
                raise models.ModelError(
                    f"base model {uri} is not pinned: set --base-sha256 (only builtin: may omit it)"
                )
            s3 = s3 or (s3_client(settings.s3_endpoint) if uri.startswith(("s3://", "models:/")) else None)
            cache = settings.cache_dir / "base"
            cache.mkdir(parents=True, exist_ok=True)
            folder = models.fetch(uri, cache, s3, settings.mlflow_uri)
            base = models.load_base(folder, settings.base_sha256, num_labels=settings.num_labels)
        self.base_model = base
        self.base = BaseIdentity(uri=uri, sha256=base.sha256)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model: Any = base.model.to(self.device).eval()
        self.peft: Any = None
        self.selected: object = None  # adapter the model computes with now (None: bare base)
        self.merged: str | None = None  # adapter whose update is added into the base weights now
        self.stripped: list[tuple[Any, str, Any]] = []  # (parent, attribute, LoRA wrapper) set aside
        self.merge = settings.merge and all(p.dtype == torch.float32 for p in base.model.parameters())
        self.active: str | None = None
        if isinstance(base.model, models.TimeSeriesCNN):
            config: dict[str, Any] = base.model.config
            self.kind = "series"
            self.channels = int(config["channels"])
            classes = int(config["classes"])
            self.labels = base.labels or [str(i) for i in range(classes)]
        elif settings.num_labels:
            self.kind = "text-classification"
            self.labels = base.labels or [str(i) for i in range(settings.num_labels)]
        else:
            self.kind = "generation"
            self.labels = []
        self.eval_data = self._eval_data(settings)

    # -- adapters --------------------------------------------------------------------------------

    def add(self, name: str, delta: Delta) -> None:
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict  # noqa: PLC0415

        if str(delta.peft_config.get("peft_type", "")).upper() != "LORA":
            raise AdapterRefused("InvalidManifest", f"peft type {delta.peft_config.get('peft_type')!r} is not LoRA")
        try:
            config = PeftConfig.from_peft_type(**{**delta.peft_config, "inference_mode": True})  # type: ignore[no-untyped-call]
        except (TypeError, ValueError) as exc:
            raise AdapterRefused("InvalidManifest", f"the package's LoRA configuration is not usable: {exc}") from exc
        tensors = {k: self.torch.from_numpy(np.ascontiguousarray(v)) for k, v in delta.tensors.items()}
        added = False
        self._unmerge()  # peft changes wrapped, unmerged layers only
        try:
            if self.peft is None:
                self.peft = get_peft_model(self.model, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
            added = True
            result = set_peft_model_state_dict(self.peft, tensors, adapter_name=name)
            _check_keys(name, result)
        except AdapterRefused:
            self._drop(name, added)
            raise
        except (RuntimeError, ValueError, KeyError) as exc:
            self._drop(name, added)
            raise AdapterRefused("ShapeMismatch", f"adapter does not fit the base model: {str(exc)[:600]}") from exc
        finally:
            self.selected = object()  # adding may change peft's active adapter: select again before use
        self.peft.to(self.device).eval()

    def _drop(self, name: str, added: bool) -> None:
        if added:
            self.remove(name)

    def remove(self, name: str) -> None:
        """Free an adapter's weights (peft keeps at least one adapter; the last one stays, unused)."""
        if self.peft is not None and name in self.peft.peft_config and len(self.peft.peft_config) > 1:
            self._unmerge()
            with warnings.catch_warnings():  # "active adapter deleted": we select explicitly before every use
                warnings.simplefilter("ignore", UserWarning)
                self.peft.delete_adapter(name)
            self.selected = object()

    def activate(self, name: str | None) -> None:
        self.active = name
        self._select(name)

    def _unmerge(self) -> None:
        """Put peft's layers back and take a merged adapter out of the base weights (before any
        change of the adapters, and before computing with anything but the active adapter)."""
        for parent, attr, wrapper in self.stripped:
            setattr(parent, attr, wrapper)
        if self.stripped:
            self.stripped = []
            self.selected = object()
        if self.merged is not None and self.peft is not None:
            self.peft.unmerge_adapter()
            self.merged = None
            self.selected = object()

    def _strip(self) -> None:
        """Serve with plain layers: each LoRA wrapper is replaced by its base layer (which holds the
        merged weights), so requests pay nothing for peft's per-layer dispatch."""
        from peft.tuners.lora import LoraLayer  # noqa: PLC0415

        model = self.peft.base_model.model
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, module.get_base_layer())
                self.stripped.append((parent, attr, module))

    def _select(self, name: str | None) -> None:
        """Make the model compute with ``name``: merged into the base weights when it is the active
        adapter and merging is on (no per-request LoRA cost), unmerged for anything else."""
        if self.selected == name or self.peft is None:
            self.selected = name if self.peft is not None else None
            return
        self._unmerge()
        lora = self.peft.base_model
        if name is None:
            lora.disable_adapter_layers()
        else:
            lora.enable_adapter_layers()
            self.peft.set_adapter(name, inference_mode=True)
        if self.merge and name == self.active:
            if name is not None:
                self.peft.merge_adapter([name])
                self.merged = name
            self._strip()
        self.selected = name

    def _net(self, adapter: str | None) -> Any:
        self._select(adapter)
        return self.peft if self.peft is not None else self.model

    # -- inference -------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        if self.kind == "series":
            return {
                "platform": "edgetune-torch",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, self.channels, -1]}],
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.labels)]}],
            }  # fmt: skip
        outputs = (
            [{"name": "label", "datatype": "BYTES", "shape": [-1]},
             {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.labels)]}]
            if self.kind == "text-classification" else [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        )  # fmt: skip
        return {"platform": "edgetune-torch", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "outputs": outputs}  # fmt: skip

    def predict(
        self, inputs: list[dict[str, Any]], parameters: dict[str, Any], adapter: str | None
    ) -> list[dict[str, Any]]:
        if len(inputs) != 1:
            raise RequestError(f"expected exactly one input tensor, got {len(inputs)}")
        tensor = inputs[0]
        net = self._net(adapter)
        with self.torch.inference_mode():
            if self.kind == "series":
                return self._classify(net(self._series(tensor)))
            texts = self._texts(tensor)
            if self.kind == "text-classification":
                return self._classify(net(**self._tokens(texts)).logits)
            return self._generate(net, texts, parameters)

    def _series(self, tensor: dict[str, Any]) -> Any:
        if tensor.get("datatype", "FP32") not in ("FP32", "FP64", "FP16"):
            raise RequestError(f"input {tensor.get('name')!r}: expected datatype FP32, got {tensor.get('datatype')}")
        shape = [int(s) for s in tensor.get("shape") or []]
        try:
            x = np.asarray(tensor.get("data"), dtype=np.float32).reshape(shape)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"input {tensor.get('name')!r}: data does not fit shape {shape}: {exc}") from exc
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[1] != self.channels or x.shape[2] < 1:
            raise RequestError(f"input {tensor.get('name')!r}: expected shape [batch, {self.channels}, length], "
                               f"got {list(x.shape)}")  # fmt: skip
        return self.torch.from_numpy(np.nan_to_num(x)).to(self.device)

    def _classify(self, logits: Any) -> list[dict[str, Any]]:
        if hasattr(logits, "logits"):
            logits = logits.logits
        probs = logits.float().softmax(dim=-1).cpu().numpy()
        labels = [self.labels[int(i)] if int(i) < len(self.labels) else str(int(i)) for i in probs.argmax(axis=-1)]
        return [
            {"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
             "data": [round(float(p), 6) for p in probs.reshape(-1)]},
        ]  # fmt: skip

    @staticmethod
    def _texts(tensor: dict[str, Any]) -> list[str]:
        if tensor.get("datatype") != "BYTES":
            raise RequestError(
                f"input {tensor.get('name')!r}: expected datatype BYTES (text), got {tensor.get('datatype')}"
            )
        data = tensor.get("data")
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
            raise RequestError(f"input {tensor.get('name')!r}: expected a list of strings")
        return data

    def _tokens(self, texts: list[str]) -> dict[str, Any]:
        tok = self.base_model.tokenizer
        if tok is not None:
            enc = tok(texts, truncation=True, max_length=512, padding=True, return_tensors="pt")
            return {
                "input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device),
            }
        rows = [list(t.encode()[:512]) or [0] for t in texts]  # byte-level, as the trainer without a tokenizer
        width = max(len(r) for r in rows)
        ids = self.torch.tensor([[0] * (width - len(r)) + r for r in rows], device=self.device)
        mask = self.torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def _generate(self, net: Any, texts: list[str], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        new = int(parameters.get("max_new_tokens", 16))
        if not 1 <= new <= MAX_NEW_TOKENS:
            raise RequestError(f"parameters.max_new_tokens must be 1-{MAX_NEW_TOKENS}, got {new}")
        enc = self._tokens(texts)
        out = net.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=0)
        tok = self.base_model.tokenizer
        width = enc["input_ids"].shape[1]
        if tok is not None:
            decoded = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        else:
            decoded = [bytes(int(i) % 256 for i in row).decode(errors="replace") for row in out[:, width:].tolist()]
        return [{"name": "text", "datatype": "BYTES", "shape": [len(decoded)], "data": decoded}]

    # -- local evaluation ------------------------------------------------------------------------

    def _eval_data(self, settings: AgentSettings) -> Any:
        if settings.eval_data_dir is None:
            return None
        from edgetune_trainer.data import local_dataset  # noqa: PLC0415
        from edgetune_trainer.loop import Task  # noqa: PLC0415

        dataset = local_dataset(Path(settings.eval_data_dir), settings.eval_format)
        return dataset, Task(self.base_model, dataset.scan(), self.device, dataset.spec), dataset.spec

    def evaluate(self, adapter: str | None) -> dict[str, float] | None:
        if self.eval_data is None:
            return None
        from edgetune_trainer.loop import evaluate  # noqa: PLC0415

        dataset, task, spec = self.eval_data
        net = self._net(adapter)
        try:
            return evaluate(net, task, dataset, 64, spec.augmentation, split="all")  # all of the node's labelled data
        finally:
            net.eval()  # the trainer's evaluate() leaves the model in training mode

    def close(self) -> None:
        self.peft = None
