"""Model references, identities and loaders.

A model is a Hugging Face hub id or a local directory. Its *identity* (part of every cache key) is
the hub id plus the resolved commit hash, or a content hash of the local directory, so that a new
checkpoint never reuses stale artefacts. Resolving an identity never imports torch; loading does,
and only the stages that actually compute something call the loaders.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vlcp.store.cache import StageCache, file_digest, stable_hash

log = logging.getLogger("vlcp")

DEFAULT_CAPTIONER = "llava-hf/llava-1.5-7b-hf"
DEFAULT_DIFFUSION = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ModelError(Exception):
    """A model that cannot be found, resolved or loaded: the message says what to fetch and where."""


# What `from_pretrained` reads, per kind of model: `hf download <id> --include ...` fetches exactly these.
# A plain download of the SD v1.5 repository fetches every variant (~45-50 GB); these files are ~4.3 GB.
DIFFUSION_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "feature_extractor/*.json",
                   "text_encoder/config.json", "text_encoder/model.safetensors", "unet/config.json",
                   "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors")
TRANSFORMERS_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model")


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the user gave (hub id or path), without any @revision
    path: str  # what from_pretrained receives
    identity: str  # "<id>@<commit>" or "local:<content hash>"
    revision: str | None = None
    local: bool = False  # all files are on this machine: load with local_files_only (no HEAD requests)

    def manifest(self) -> dict:
        return {"name": self.name, "identity": self.identity, "revision": self.revision}


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ("org/name", "rev"); a directory or an id without ``@`` has no revision."""
    if "@" not in spec or Path(spec).expanduser().is_dir() or spec.startswith((".", "/", "~")):
        return spec, None
    name, rev = spec.rsplit("@", 1)
    if not name or not rev:
        raise ModelError(f"model {spec!r}: expected <org>/<name>@<revision> (a branch, tag or commit)")
    return name, rev


def download_command(name: str, revision: str | None = None, probe_file: str = "config.json") -> str:
    """The `hf download` command (huggingface_hub >= 1.0) that fetches exactly the files vlcp loads."""
    files = DIFFUSION_FILES if probe_file == "model_index.json" else TRANSFORMERS_FILES
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {name}{rev} --include " + " ".join(f'"{f}"' if "*" in f else f for f in files)


def resolve(name: str, cache: StageCache, revision: str | None = None, probe_file: str = "config.json") -> ModelRef:
    """Turn a hub id (``org/name`` or ``org/name@rev``) or directory into a ModelRef with a stable identity."""
    p = Path(name).expanduser()
    if p.is_dir():
        return ModelRef(name, str(p.resolve()), "local:" + dir_digest(p, cache), None, True)
    name, spec_rev = parse_model_spec(name)
    if spec_rev and revision and spec_rev != revision:
        raise ModelError(f"model {name}: two revisions given ({spec_rev} in the id, {revision} as an option)")
    revision = revision or spec_rev
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelError(f"model directory {name} does not exist")
    commit = _cached_commit(name, revision, probe_file)
    local = commit is not None
    memo_key = stable_hash([name, revision])
    if commit is None:
        commit = cache.index.get(f"_memo/hub-commit/{memo_key}") or _remote_commit(name, revision)
    if commit is None:
        what = f"model {name!r}" + (f" at revision {revision!r}" if revision else "")
        where = "the hub is unreachable (offline mode)" if hub_offline() else "the hub is unreachable"
        raise ModelError(
            f"{what} is not in the local Hugging Face cache and {where}. On a machine with network run "
            f"`{download_command(name, revision, probe_file)}` and copy ~/.cache/huggingface (or set HF_HOME), "
            f"or download it to a directory (add --local-dir DIR) and pass that path instead of the id.")
    cache.index.set(f"_memo/hub-commit/{memo_key}", commit)
    return ModelRef(name, name, f"{name}@{commit}", revision, local)


def hub_offline() -> bool:
    """huggingface_hub's own reading of HF_HUB_OFFLINE (1/ON/YES/TRUE), which it fixes when imported; the
    variable set later in the same process (tests, notebooks) counts too, read the same way."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    env = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return bool(constants.HF_HUB_OFFLINE) or env in constants.ENV_VARS_TRUE_VALUES


def _cached_commit(repo: str, revision: str | None, probe_file: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for fname in (probe_file, "model_index.json", "config.json"):
        hit = try_to_load_from_cache(repo, fname, revision=revision)
        if isinstance(hit, str):
            return Path(hit).parent.name if Path(hit).parent.parent.name == "snapshots" else Path(hit).parts[-2]
    return None


def _remote_commit(repo: str, revision: str | None) -> str | None:
    if hub_offline():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo, revision=revision, timeout=10).sha
    except Exception as exc:  # network down, repo missing, auth: all mean "cannot resolve"
        log.debug("could not resolve %s on the hub: %s", repo, exc)
        return None


def dir_digest(path: Path, cache: StageCache) -> str:
    """Content hash of a model directory, memoised on (file, size, mtime) so it is computed once."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    stat_key = stable_hash([(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files])

    def compute():
        return stable_hash([(str(f.relative_to(path)), file_digest(f)) for f in files])

    return cache.memo("dir-digest", stat_key, compute)


def read_config(ref: ModelRef, filename: str) -> dict:
    """One JSON config file of a model, without importing torch."""
    if Path(ref.path).is_dir():
        f = Path(ref.path) / filename
    else:
        from huggingface_hub import hf_hub_download

        try:
            f = Path(hf_hub_download(ref.path, filename, revision=ref.identity.rsplit("@", 1)[-1]))
        except Exception as exc:
            raise ModelError(f"cannot read {filename} of {ref.name}: {exc}") from None
    if not f.exists():
        raise ModelError(f"{ref.name} has no {filename}: is it a diffusers Stable Diffusion model?")
    return json.loads(f.read_text())


def native_resolution(ref: ModelRef) -> int:
    """The pixel size the diffusion model was trained at: UNet sample size x VAE downsampling."""
    unet = read_config(ref, "unet/config.json")
    vae = read_config(ref, "vae/config.json")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


# -- loading (imports torch) ----------------------------------------------------------------------
def torch_device(device: str) -> str:
    """``auto`` -> the best device here; an explicit one is checked (a missing CUDA index is a ModelError).

    In a multi-process launch, ``auto`` and plain ``cuda`` mean this process's own GPU (cuda:LOCAL_RANK)."""
    import torch

    from vlcp.store.parallel import local_device

    if device == "auto":
        if torch.cuda.is_available():
            return local_device("cuda", torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(f"--device {device}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ModelError(f"--device {device}: this machine has no CUDA device; use --device cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise ModelError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        return local_device(device, n)
    return device


def half_precision(device: str) -> bool:
    """Whether models run in fp16 on this device: any CUDA device (``cuda``, ``cuda:1``), never CPU/MPS."""
    import torch

    return torch.device(device).type == "cuda"


def quiet_libraries() -> None:
    """Hide the libraries' own progress bars ("Loading weights", "Writing model shards") unless -v."""
    if log.isEnabledFor(logging.DEBUG):
        return
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()  # the libraries (re)configure their own loggers on first use
    tlog.set_verbosity_error()


def _dtype(device: str):
    import torch

    return torch.float16 if half_precision(device) else torch.float32


def pretrained_kwargs(ref: ModelRef) -> dict:
    """What every from_pretrained call gets: the pinned commit, and no network once the files are local."""
    return {"revision": _rev(ref), "local_files_only": ref.local}


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a from_pretrained of missing, partial or damaged files raises (JSON and safetensors errors included)."""
    from safetensors import SafetensorError

    return OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError


def _load_error(ref: ModelRef, exc: Exception, probe_file: str = "config.json") -> ModelError:
    reason = " ".join(str(exc).split())[:300]
    if ref.identity.startswith("local:"):
        d = Path(ref.path)
        if d.name.startswith("tiny-") and d.parent.name == "models":  # built by vlcp.models.tiny for --tiny
            return ModelError(f"the tiny model directory {d} (built by vlcp for --tiny) is damaged ({reason}): "
                              f"delete it (or run `vlcp cache clear --stage models`) and rerun to rebuild it")
        return ModelError(f"could not load the model directory {d}: {reason}. It is incomplete or damaged: "
                          f"download the model into it again (hf download <id> --local-dir {d})")
    return ModelError(f"could not load {ref.name} ({ref.identity}): {reason}. Fetch its files with "
                      f"`{download_command(ref.name, _rev(ref), probe_file)}` or pass a local directory.")


def load_transformers(ref: ModelRef, device: str, model_cls: str, processor_cls: str):
    """(model, processor or tokenizer) in eval mode: safetensors only, never trust_remote_code.

    On CUDA the weights go straight to the device (``device_map``): a 7B model is never staged in
    host memory first.
    """
    import transformers

    quiet_libraries()
    dev = torch_device(device)
    cuda = half_precision(dev)
    try:
        model = getattr(transformers, model_cls).from_pretrained(
            ref.path, dtype=_dtype(dev), use_safetensors=True, trust_remote_code=False,
            device_map=dev if cuda else None, **pretrained_kwargs(ref))
        processor = getattr(transformers, processor_cls).from_pretrained(ref.path, trust_remote_code=False,
                                                                         **pretrained_kwargs(ref))
    except _load_errors() as exc:  # all mean "cannot load these files"
        raise _load_error(ref, exc) from None
    return (model if cuda else model.to(dev)).eval(), processor


_load_transformers = load_transformers  # the older private name (vlcp.models.clip imports it)


def load_captioner(ref: ModelRef, device: str):
    """(model, processor) for a LLaVA-style image-text-to-text model."""
    model, processor = load_transformers(ref, device, "AutoModelForImageTextToText", "AutoProcessor")
    processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
    return model, processor


# LLaVA-1.5-7B in fp16: 7.06e9 parameters x 2 bytes; per sequence the KV cache of 32 layers x 4096 x (k, v)
# x 2 bytes over ~720 tokens (576 image tokens, the prompt, 77 new tokens) plus activations: ~0.45 GB.
CAPTIONER_BYTES = 7.06e9 * 2
CAPTION_ITEM_BYTES = 0.45e9


def caption_batch_for_memory(free_bytes: float, total_bytes: float, weight_bytes: float = CAPTIONER_BYTES,
                             item_bytes: float = CAPTION_ITEM_BYTES) -> int:
    """Captioning batch: 32 on a GPU of >= 40 GB (decoding reads the weights once per step, so step time is
    nearly flat up to 32-64); on a smaller one as many as fit the free memory after the weights, 1 to 32."""
    if total_bytes >= 40e9:
        return 32
    fit = int((free_bytes - weight_bytes - 1.5e9) // item_bytes)
    return max(1, min(32, fit))


def auto_caption_batch(device: str) -> int:
    """The captioning batch for this device (measured before the captioner is loaded); 8 off CUDA."""
    import torch

    dev = torch_device(device)
    if not half_precision(dev):
        return 8
    free, total = torch.cuda.mem_get_info(torch.device(dev))
    return caption_batch_for_memory(free, total)


def load_text_llm(ref: ModelRef, device: str):
    """(model, tokenizer) for a causal language model (the ``llm`` text strategy)."""
    model, tok = load_transformers(ref, device, "AutoModelForCausalLM", "AutoTokenizer")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_vae(ref: ModelRef, device: str):
    quiet_libraries()
    dev = torch_device(device)
    try:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(ref.path, subfolder="vae", dtype=_dtype(dev), use_safetensors=True,
                                            **pretrained_kwargs(ref))
    except _load_errors() as exc:
        raise _load_error(ref, exc, "model_index.json") from None
    return vae.to(dev).eval()


def load_unet(ref: ModelRef, device: str):
    """The UNet alone in fp32 on ``device``: full fine-tuning trains fp32 master weights loaded from the
    checkpoint itself, not fp16-rounded ones upcast (as diffusers' training scripts do)."""
    import torch

    quiet_libraries()
    dev = torch_device(device)
    try:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(ref.path, subfolder="unet", dtype=torch.float32,
                                                    use_safetensors=True, **pretrained_kwargs(ref))
    except _load_errors() as exc:
        raise _load_error(ref, exc, "model_index.json") from None
    return unet.to(dev)


def load_img2img(ref: ModelRef, device: str):
    """The image-to-image pipeline of the model, without the safety checker (it blacks out false positives)."""
    quiet_libraries()
    dev = torch_device(device)
    try:
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pretrained(ref.path, dtype=_dtype(dev), use_safetensors=True,
                                                          safety_checker=None, requires_safety_checker=False,
                                                          **pretrained_kwargs(ref))
    except _load_errors() as exc:
        raise _load_error(ref, exc, "model_index.json") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def _rev(ref: ModelRef) -> str | None:
    return None if ref.identity.startswith("local:") else ref.identity.rsplit("@", 1)[-1]
