"""Stage ``prompts``: the text that conditions synthesis, by semantic strategy (paper, Table 5).

- ``dcs`` (default): descriptions of closest samples, the Algorithm 2 text prototype.
- ``label``: the class name only (L).
- ``label+keywords``: the class name followed by the cluster's feature keywords R_w, most frequent
  first (L+FK).
- ``llm``: one sentence written by a text-generation model from the class name and the keywords
  (GGS in the paper, which used GPT); ``--text-llm`` names any causal LM (hub id or directory).
"""
from __future__ import annotations

VERSION = 2  # 2: rendered chats tokenized without a second BOS
STRATEGIES = ["dcs", "label", "label+keywords", "llm"]
LLM_PROMPT = ("Write one sentence describing a photo of a {CLASSNAME}, using these features: {KEYWORDS}. "
              "Answer with the sentence only.")


def keyword_prompt(class_name: str, record: dict) -> str:
    return ", ".join([class_name, *record["representative_words"]])


def simple_prompt(strategy: str, class_name: str, record: dict) -> str:
    if strategy == "dcs":
        return record["caption"]
    if strategy == "label":
        return class_name
    if strategy == "label+keywords":
        return keyword_prompt(class_name, record)
    raise ValueError(f"unknown text strategy {strategy!r}")


def llm_request(class_name: str, record: dict) -> str:
    return LLM_PROMPT.replace("{CLASSNAME}", class_name).replace(
        "{KEYWORDS}", ", ".join(record["representative_words"]) or "none")


def encode_requests(tok, requests: list[str]):
    """Token ids of the requests, through the tokenizer's chat template when it has one.

    A rendered chat already holds the template's special tokens (Llama-style templates start with
    BOS), so it is tokenized with ``add_special_tokens=False``: tokenizing it with them would put a
    second BOS in front. Plain requests (no template) get the tokenizer's special tokens as usual.
    """
    if tok.chat_template:
        texts = [tok.apply_chat_template([{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True)
                 for r in requests]
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return tok(requests, return_tensors="pt", padding=True)


def llm_sentences(model, tok, requests: list[str], max_new_tokens: int = 77) -> list[str]:
    """Greedy answers, one per request."""
    import torch

    inputs = encode_requests(tok, requests).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return [" ".join(t.split()) for t in tok.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)]
