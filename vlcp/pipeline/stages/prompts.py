"""Stage ``prompts`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def prompts(run: Run, step: Step) -> None:
    """The text that conditions synthesis, by --text-strategy (paper, Table 5)."""
    from vlcp.method import prompts as prompts_mod

    p, st = step.p, run.st
    llm = run.refs.text_llm
    st.pr_key = step.key(text_prototypes=st.tp_key, llm=llm.identity if llm else None)

    def compute():
        out = {}
        for c, f in enumerate(run.folders):
            recs, name = st.text[f], run.ds.classes[c].name
            if p.text_strategy == "llm":
                model, tok = run.models["llm"]()
                out[f] = prompts_mod.llm_sentences(model, tok, [prompts_mod.llm_request(name, r) for r in recs])
            else:
                out[f] = [prompts_mod.simple_prompt(p.text_strategy, name, r) for r in recs]
        return out, {}

    entry, _ = step.whole(st.pr_key, compute, "llm")
    st.prompts = entry.meta
    for f in run.folders:
        for r, text in zip(run.files["prototypes.json"]["classes"][f]["clusters"], st.prompts[f]):
            r["prompt"] = text
