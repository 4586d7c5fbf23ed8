"""LoRA adapters served beside their base model: one copy of the base weights, each adapter
under its own model name, and requests for different adapters (and the base) decoded in the
same continuous batch.

transformers' continuous batching packs every request of a step into one row of tokens, so
peft's per-sample `adapter_names` (which splits the batch dimension) cannot say which token
belongs to which adapter. Here each adapted linear layer gets a forward hook that adds
`scale · (x @ Aᵀ) @ Bᵀ` to the tokens of each adapter's requests, and the token → adapter map
is rebuilt once per step from the batch the manager is about to run (the requests in order,
with the tokens each brings). The base weights are never changed, so a base request next to
adapter requests computes exactly what it would alone.

Adapters are peft's saved format (adapter_config.json + adapter_model.safetensors) with
LoRA on linear layers; DoRA, LoRA on embeddings and fully trained modules (modules_to_save)
are refused by name at start.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from workers import invariant

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot be served: missing files, or a kind of adapter not supported."""


@dataclass
class LayerWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


def parse_specs(specs: list[str]) -> dict[str, Path]:
    """`NAME=PATH` strings (from --lora, repeatable) → name → adapter folder."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise AdapterError(f"--lora takes NAME=PATH, got {spec!r}")
        if name in adapters:
            raise AdapterError(f"--lora names {name!r} twice")
        adapters[name] = Path(path).expanduser()
    return adapters


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter folder's config and tensors, checked for what this module serves."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{path} holds no adapter_config.json (a peft LoRA adapter folder)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path} is a {config['peft_type']} adapter; only LoRA is served")
    if config.get("use_dora"):
        raise AdapterError(f"{path} is a DoRA adapter; only plain LoRA is served")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{path} trains whole modules ({config['modules_to_save']}), which cannot share the base "
            "weights; merge it into a model folder and serve that instead"
        )
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(weights))
    elif (path / "adapter_model.bin").is_file():
        tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"{path} holds no adapter_model.safetensors")
    unknown = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unknown:
        raise AdapterError(f"{path} has tensors other than linear LoRA weights, e.g. {unknown[0]}")
    return config, tensors


def adapter_layers(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, LayerWeights]:
    """Module name (as in the base model's named_modules) → that layer's A, B and scale."""
    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    layers: dict[str, LayerWeights] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix(_PREFIX)
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = a.shape[0]  # a rank_pattern shows in the tensor's shape
        layer_alpha = next((float(v) for k, v in alpha_pattern.items() if module.endswith(k)), alpha)
        scale = layer_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        layers[module] = LayerWeights(a, b, scale)
    return layers


class _Plan:
    """Which adapter each token of the current step runs with: per adapter index, the token
    positions of its requests (or None when every token of the step is that adapter's)."""

    def __init__(self) -> None:
        self.thread: int | None = None
        self.groups: list[tuple[int, torch.Tensor | None]] = []


class MultiLoRA:
    """Adapters attached to a base model by forward hooks; adapter index 0 is the base."""

    def __init__(self, model: torch.nn.Module, adapters: dict[str, Path]) -> None:
        self.names = list(adapters)
        self.index = {name: i + 1 for i, name in enumerate(self.names)}
        self.requests: dict[str, int] = {}  # request id → adapter index, for requests not on the base
        self.mixed_steps = 0  # steps that ran more than one adapter (the base counts as one)
        self._plan = _Plan()
        modules = dict(model.named_modules())
        param = next(model.parameters())
        # layer name → [(adapter index, weights)]
        per_layer: dict[str, list[tuple[int, LayerWeights]]] = {}
        for name, path in adapters.items():
            config, tensors = read_adapter(path)
            layers = adapter_layers(config, tensors)
            missing = [m for m in layers if m not in modules]
            if missing:
                raise AdapterError(f"adapter {name} ({path}) adapts {missing[0]}, which the base model lacks")
            dtype = param.dtype if param.dtype.is_floating_point else torch.float32
            for module, weights in layers.items():
                weights.a, weights.b = (t.to(param.device, dtype) for t in (weights.a, weights.b))
                per_layer.setdefault(module, []).append((self.index[name], weights))
            log.info(
                "LoRA adapter %s from %s: %d layers, rank %d",
                name,
                path,
                len(layers),
                next(iter(layers.values())).a.shape[0] if layers else 0,
            )
        self._hooks = [
            modules[module].register_forward_hook(self._hook(weights))
            for module, weights in per_layer.items()
        ]

    def assign(self, request_id: str, adapter: str) -> None:
        if adapter:
            self.requests[request_id] = self.index[adapter]

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def use(self, adapter: str) -> None:
        """Run the calling thread's next forward passes all with one adapter ("" = the base)."""
        self._plan.thread = threading.get_ident()
        self._plan.groups = [(self.index[adapter], None)] if adapter else []

    def plan(self, requests_in_batch: list) -> None:
        """Called on the batch thread as each step's inputs are laid out: the tokens of the
        step are the requests' `query_length` tokens, in this order."""
        if not self.requests:
            self._plan.groups = []
            return
        owners: list[int] = []
        for future in requests_in_batch:
            owners += [self.requests.get(future.state.request_id, 0)] * future.query_length
        present = sorted(set(owners))
        if len(present) > 1:
            self.mixed_steps += 1
        if present == [0]:
            groups: list[tuple[int, torch.Tensor | None]] = []
        elif len(present) == 1:
            groups = [(present[0], None)]
        else:
            tokens = torch.tensor(owners)
            groups = [(i, torch.nonzero(tokens == i).flatten()) for i in present if i]
        self._plan.thread = threading.get_ident()
        self._plan.groups = groups

    def _hook(self, weights: list[tuple[int, LayerWeights]]):
        by_index = dict(weights)
        plan = self._plan

        def add_lora(module, inputs, output):
            # Only the batch thread's forward passes follow the plan (an embeddings request runs
            # the base model on another thread at the same time).
            if not plan.groups or plan.thread != threading.get_ident():
                return None
            x = inputs[0]  # [1, tokens, in]
            # With batch invariance, an adapter's rows get the numbers they would get alone.
            linear = invariant.product if getattr(module, "corral_invariant", False) else F.linear
            for index, positions in plan.groups:
                layer = by_index.get(index)
                if layer is None:  # this adapter leaves this layer alone
                    continue
                if positions is None:
                    output = output + linear(linear(x, layer.a), layer.b) * layer.scale
                else:
                    positions = positions.to(x.device)
                    delta = linear(linear(x[0, positions], layer.a), layer.b) * layer.scale
                    output = output.index_add(1, positions, delta.unsqueeze(0))
            return output

        return add_lora


def install(manager, lora: MultiLoRA) -> None:
    """Have the manager tell `lora` each step's batch before the step runs. The logits
    processors' `prepare_tensor_args` is called with the whole batch (all requests, in token
    order) right after the inputs are laid out and before the forward pass (transformers 5.23)."""
    processors = manager.logit_processor
    prepare = processors.prepare_tensor_args

    def prepare_and_plan(requests_in_batch, arg_storage):
        lora.plan(requests_in_batch)
        return prepare(requests_in_batch, arg_storage)

    processors.prepare_tensor_args = prepare_and_plan
