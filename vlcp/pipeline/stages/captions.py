"""Stage ``captions`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from vlcp.models import captioner as captions_mod

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def captions(run: Run, step: Step) -> None:
    """LLaVA descriptions with the reference's question, per image, made as ``--caption-mode`` says (the
    reference's conversation and seeded sampling, or greedy); or the authors' captions (``--captions-from``),
    keyed by the file's hash instead of the captioner. A batch is one ``generate`` call in either mode, run as
    ``--caption-engine`` says (how, not what: in no key, like the batch size)."""
    from vlcp.models import loading as models
    from vlcp.pipeline.run import DistillError

    p, st = step.p, run.st
    names = [run.ds.classes[s.class_idx].name for s in st.samples]
    imported, file_hash = _imported_captions(run, p.captions_from, p.missing_captions)
    # greedy captions keep the key vlcp always gave them; sampled ones name the conversation and the seed
    made_by = dict(model=run.refs.captioner.identity,
                   decoding=captions_mod.decoding(p.caption_mode, p.caption_seed))
    st.cap_keys = [step.key(image=s.digest, class_name=n, **({"imported": file_hash} if i in imported else made_by))
                   for i, (s, n) in enumerate(zip(st.samples, names))]

    def compute(idx):
        todo = [i for i in idx if i not in imported]
        made = {}
        if todo:
            model, processor = run.models["captioner"]()
            seeds = [captions_mod.item_seed(p.caption_seed, st.samples[i].digest) for i in todo]
            made = dict(zip(todo, captions_mod.caption_fitting(model, processor, [st.samples[i].load() for i in todo],
                                                               [names[i] for i in todo], p.caption_prompt,
                                                               p.caption_max_tokens, p.caption_mode, seeds,
                                                               engine, halved)))
        for i in idx:
            text = imported[i] if i in imported else made[i]
            if not text.strip():
                raise DistillError(f"the captioner returned empty text for {st.samples[i].source}; try another "
                                   f"--caption-prompt or --captioner")
            yield {"caption": text}, None

    engine = step.p.caption_engine  # unkeyed: how generate runs (vlcp/models/captioner.py, Engine)

    warned: list[int] = []

    def halved(n: int) -> None:
        """Said once a run (every batch may be halved the same way)."""
        if not warned:
            run.warn(f"a caption batch of {n} ran out of GPU memory and was captioned as two halves (the same "
                     f"captions); a smaller --caption-batch-size skips the retries")
        warned.append(n)

    def auto_batch() -> int:
        """Asked only when captions are computed (a cached run imports no torch): on CUDA from the loaded
        captioner's weights, its KV cache per token and the free memory, up to the roofline's batch."""
        if not models.half_precision(models.torch_device(p.device)):
            return models.auto_caption_batch(p.device)  # 8 off CUDA
        return captions_mod.batch_for_model(run.models["captioner"]()[0], p.caption_max_tokens)

    entries, _ = step.items(st.cap_keys, compute, p.caption_batch_size or auto_batch, "captioner")
    st.captions = [e.meta["caption"] if e else None for e in entries]


def _imported_captions(run: Run, path: str | None, missing_policy: str) -> tuple[dict[int, str], str | None]:
    """(sample index -> caption from the file, the file's hash); missing images are an error unless
    ``--missing-captions caption``."""
    if not path:
        return {}, None
    from pathlib import Path

    from vlcp.data import caption_files
    from vlcp.pipeline.run import DistillError
    from vlcp.store.cache import file_digest

    st = run.st
    rel = [f"{run.ds.classes[s.class_idx].folder}/{Path(s.source).name}" for s in st.samples]
    found, missing = caption_files.match_captions(rel, caption_files.read_reference_jsonl(path))
    if missing and missing_policy == "error":
        raise DistillError(f"{len(missing)} of {len(rel)} images have no caption in {path}, e.g. "
                           f"{', '.join(missing[:3])}; pass --missing-captions caption to caption them with the "
                           f"captioner")
    if missing:
        run.warn(f"{len(missing)} of {len(rel)} images have no caption in {Path(path).name} (--captions-from), e.g. "
                 f"{', '.join(missing[:3])}: the captioner describes them")  # the name: publish hides whole paths only
    run.manifest["imported_captions"] = {"file": str(path), "matched": len(found), "captioned": len(missing)}
    return found, file_digest(path)
