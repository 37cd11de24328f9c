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

from vlcp.cache import StageCache, file_digest, stable_hash

log = logging.getLogger("vlcp")

DEFAULT_CAPTIONER = "llava-hf/llava-1.5-7b-hf"
DEFAULT_DIFFUSION = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ModelError(Exception):
    """A model that cannot be found, resolved or loaded: the message says what to fetch and where."""


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the user gave (hub id or path)
    path: str  # what from_pretrained receives
    identity: str  # "<id>@<commit>" or "local:<content hash>"
    revision: str | None = None

    def manifest(self) -> dict:
        return {"name": self.name, "identity": self.identity, "revision": self.revision}


def resolve(name: str, cache: StageCache, revision: str | None = None, probe_file: str = "config.json") -> ModelRef:
    """Turn a hub id or directory into a ModelRef with a stable identity."""
    p = Path(name).expanduser()
    if p.is_dir():
        return ModelRef(name, str(p.resolve()), "local:" + dir_digest(p, cache), None)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelError(f"model directory {name} does not exist")
    commit = _cached_commit(name, revision, probe_file)
    memo_key = stable_hash([name, revision])
    if commit is None:
        commit = cache.index.get(f"_memo/hub-commit/{memo_key}") or _remote_commit(name, revision)
    if commit is None:
        raise ModelError(
            f"model {name!r} is not in the local Hugging Face cache and the hub is unreachable. On a machine with "
            f"network run `huggingface-cli download {name}` and copy ~/.cache/huggingface (or set HF_HOME), or "
            f"download it to a directory and pass that path instead of the id.")
    cache.index.set(f"_memo/hub-commit/{memo_key}", commit)
    return ModelRef(name, name, f"{name}@{commit}", revision)


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
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
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
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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

    return torch.float16 if device == "cuda" else torch.float32


def _load_error(ref: ModelRef, exc: Exception) -> ModelError:
    return ModelError(f"could not load {ref.name}: {exc}. If the hub is unreachable, download the model on a "
                      f"machine with network (`huggingface-cli download {ref.name}`) or pass a local directory.")


def _load_transformers(ref: ModelRef, device: str, model_cls: str, processor_cls: str):
    """(model, processor or tokenizer) in eval mode: safetensors only, never trust_remote_code."""
    import transformers

    quiet_libraries()
    try:
        dev = torch_device(device)
        model = getattr(transformers, model_cls).from_pretrained(ref.path, revision=_rev(ref), dtype=_dtype(dev),
                                                                  use_safetensors=True, trust_remote_code=False)
        processor = getattr(transformers, processor_cls).from_pretrained(ref.path, revision=_rev(ref),
                                                                         trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _load_error(ref, exc) from None
    return model.to(dev).eval(), processor


def load_captioner(ref: ModelRef, device: str):
    """(model, processor) for a LLaVA-style image-text-to-text model."""
    model, processor = _load_transformers(ref, device, "AutoModelForImageTextToText", "AutoProcessor")
    processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
    return model, processor


def load_text_llm(ref: ModelRef, device: str):
    """(model, tokenizer) for a causal language model (the ``llm`` text strategy)."""
    model, tok = _load_transformers(ref, device, "AutoModelForCausalLM", "AutoTokenizer")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_vae(ref: ModelRef, device: str):
    quiet_libraries()
    try:
        from diffusers import AutoencoderKL

        dev = torch_device(device)
        vae = AutoencoderKL.from_pretrained(ref.path, subfolder="vae", revision=_rev(ref), dtype=_dtype(dev),
                                            use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise _load_error(ref, exc) from None
    return vae.to(dev).eval()


def load_img2img(ref: ModelRef, device: str):
    """The image-to-image pipeline of the model, without the safety checker (it blacks out false positives)."""
    quiet_libraries()
    try:
        from diffusers import AutoPipelineForImage2Image

        dev = torch_device(device)
        pipe = AutoPipelineForImage2Image.from_pretrained(ref.path, revision=_rev(ref), dtype=_dtype(dev),
                                                          use_safetensors=True, safety_checker=None,
                                                          requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise _load_error(ref, exc) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def _rev(ref: ModelRef) -> str | None:
    return None if ref.identity.startswith("local:") else ref.identity.rsplit("@", 1)[-1]
