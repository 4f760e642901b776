"""Label likelihood: log p(answer tokens | prompt) for every candidate answer, prefix encoded once.

For one sample with prompt tokens x (images included) and candidate answers y_1..y_K:

    score(y_k) = Σ_t log p(y_k,t | x, y_k,<t)

One forward pass over x (batch 1, images through the processor) fills the KV cache and gives
p(y_k,1 | x) from its last logits; the cache is then repeated (``chunk`` candidates at a time)
and the continuations run batched, right-padded (padding sits after every real token of its row,
so the causal mask keeps it out of the real tokens' attention). No attention mask is passed to
the continuation pass on purpose: with a cache, Qwen-VL's M-RoPE positions come from
``cache length + rope_deltas`` only when the mask is absent (a full-length mask makes it
recompute positions for the whole sequence). The test suite checks the result against one plain
full-sequence forward per candidate.

What the candidates are
-----------------------
Single-label tasks score each label as the whole answer. Multi-label EmoComics35 targets are a
label *set* written in a fixed order ("Fear, Surprise", training's ``label_text``) plus the
family's end-of-turn text, so scoring "Surprise" as an answer measures "Surprise comes first",
not "Surprise is present": on the real test split (1326 utterances) Surprise is not the first
label in 74% of the utterances that carry it (Sadness 56%, Disgust 66%), and a simulated model
that knows every gold label tops out at macro-F1 0.766 that way (Surprise recall 0.26).

The default multi-label scoring (``label_set``) therefore scores whole answers: every subset of
the label set with up to ``max_labels`` labels (:func:`label_sets`; 3 covers 1323 of the 1326
real test utterances, 99.8%; 7 labels → 63 candidates), written by training's formatter
(:func:`set_text`) and closed by the end-of-turn text, so the complete answer "Fear" is told apart
from the prefix of "Fear, Surprise". With p(S) = softmax of the summed log-probs over the
candidates, a label's presence probability is Σ_{S ∋ label} p(S) (:func:`decide.set_marginals`),
and decisions threshold those marginals per label (:mod:`.decide`).

Measured on the tiny Qwen2.5-VL the acceptance test trains (tests/evaluation/test_eval_presence.py:
60 steps; every utterance "Anger" plus Joy or Sadness decided by the utterance's last word, so the
signal sits in the *second* label; 24 test utterances, thresholds from the stage's held-out
books), per-label F1 of Joy / Sadness, two seeds: label-set presence 1.00 / 1.00 and 0.95 / 0.92;
first-label scoring 0.74 / 0.00 and 0.77 / 0.00 (Joy predicted nearly everywhere, Sadness never:
always-Joy gives 0.67 / 0.00); greedy generation parsed by :mod:`.parsing` 1.00 / 1.00 and
0.00 / 0.40. Generation reads the whole answer too, but commits to one greedy string (no
probabilities, nothing to tune for macro-F1) and was the less reliable on the same weights;
label-set scoring costs one prompt pass plus ⌈63/chunk⌉ short batched continuation passes.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from emomerge.merging.errors import InputError
from PIL import Image


@dataclass(frozen=True)
class LabelScore:
    """Summed log-probability of a label's tokens and how many tokens it has."""

    logprob: float
    n_tokens: int

    def value(self, length_norm: bool) -> float:
        """The score used for ranking: the mean per token when ``length_norm``, else the sum."""
        return self.logprob / self.n_tokens if length_norm else self.logprob


def load_images(images: list[Any]) -> list[Image.Image]:
    """RGB PIL images from paths or PIL images (the same loader training uses)."""
    from emomerge.training.batching import rgb_images

    return rgb_images(images)


def answer_prefix(processor: Any, messages: list[dict]) -> str:
    """The whitespace the chat template puts between the prompt and an answer (training's
    ``answer_prefix``: labels are scored as they were trained, e.g. LLaVA's `` Joy``)."""
    from emomerge.training.batching import answer_prefix as prefix

    return prefix(processor, messages)


def render_prompt(processor: Any, messages: list[dict]) -> str:
    """The chat-template prompt up to where the assistant's answer starts."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def label_sets(label_set: list[str] | tuple[str, ...], max_labels: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``label_set`` with at most ``max_labels`` labels, as sorted index
    tuples: by size, then lexicographically (7 labels, ``max_labels`` 3 → 7 + 21 + 35 = 63)."""
    if max_labels < 1:
        raise InputError(f"max_labels: must be at least 1, got {max_labels}")
    n = len(label_set)
    return [c for k in range(1, min(max_labels, n) + 1)
            for c in itertools.combinations(range(n), k)]


def set_text(labels: list[str]) -> str:
    """A label set written exactly as training writes a multi-label target
    (``training.data.emocomics35.label_text``: canonical order, ", "-joined)."""
    from emomerge.training.data.emocomics35 import LABELS, label_text

    unknown = [lab for lab in labels if lab not in LABELS]
    if unknown:
        raise InputError(f"scoring label_set: label {unknown[0]!r} has no training target order "
                         f"(multi-label targets are written over {LABELS}); use "
                         "scoring first_label")
    return label_text(list(labels))


def encode_prompts(processor: Any, family: str, prompts: list[str],
                   images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
    """Processor inputs for a batch of prompts (the template already holds the special tokens)."""
    # Mllama wants one image list per sample; the other families a flat list in prompt order.
    imgs: Any = images if family == "mllama" else [im for per in images for im in per]
    return dict(processor(text=prompts, images=imgs or None, return_tensors="pt", padding=True,
                          add_special_tokens=False))


def continuation_ids(tokenizer: Any, prompt: str, labels: list[str],
                     eot: str | None = None) -> list[list[int]]:
    """Token ids of each label (plus the end-of-turn text ``eot``) *as they follow* ``prompt``.

    ids(prompt + label)[len(ids(prompt)):], the way training encodes the answer
    (``training.batching.encode_batch``). Tokenising a label on its own is not the same:
    SentencePiece/Metaspace tokenizers (Llama, Mistral: LLaVA-1.5, LLaVA-NeXT-Mistral) prefix a
    string's first word with "▁", so a standalone "Joy" is "▁Joy" while after the prompt it is
    "Joy" — scoring tokens the model was never trained to produce.
    """
    head = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    out = []
    for lab in labels:
        full = list(tokenizer(prompt + lab + (eot or ""), add_special_tokens=False)["input_ids"])
        if full[: len(head)] != head:
            raise InputError(f"label {lab!r}: the prompt's tokens are not a prefix of prompt + "
                             "label (the tokenizer merges across the boundary), so the label's "
                             "tokens cannot be isolated; training refuses such answers too")
        if len(full) == len(head):
            raise InputError(f"label {lab!r}: tokenizes to no tokens")
        out.append(full[len(head):])
    return out


def _per_token_extension(inputs: dict[str, torch.Tensor], n: int, t: int) -> dict[str, Any]:
    # Mllama's cross-attention mask is per text token: new tokens see the images the last prompt
    # token saw (what generate() does when it extends the mask).
    extra: dict[str, Any] = {}
    cam = inputs.get("cross_attention_mask")
    if cam is not None:
        extra["cross_attention_mask"] = cam[:, -1:].expand(n, t, *cam.shape[2:])
    return extra


@torch.inference_mode()
def score_labels(model: Any, inputs: dict[str, torch.Tensor], conts: list[list[int]],
                 pad_id: int, *, chunk: int = 16) -> list[LabelScore]:
    """Scores of the continuations ``conts`` after one encoded prompt (``inputs``, batch 1).

    The continuations run ``chunk`` at a time, each chunk on its own copy of the prompt's cache:
    63 label sets at once would hold 63 copies of the prompt cache and a [63, t, vocab] logit
    tensor (~0.5 GB of float32 logits with a 150k vocabulary), where a chunk of 16 holds a quarter.
    """
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("score_labels takes one prompt at a time")
    if chunk < 1:
        raise ValueError("score_labels: chunk must be at least 1")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    out = model(**inputs, use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # [vocab]
    if max(len(c) for c in conts) == 1:
        return [LabelScore(float(first[c[0]]), 1) for c in conts]
    prefix_cache = out.past_key_values
    scores = []
    for lo in range(0, len(conts), chunk):
        part = conts[lo: lo + chunk]
        last = lo + chunk >= len(conts)
        # the forward pass appends to the cache it is given: every chunk but the last gets a copy
        cache = prefix_cache if last else copy.deepcopy(prefix_cache)
        scores += _continue(model, inputs, first, cache, part, pad_id, device)
    return scores


def _continue(model: Any, inputs: dict[str, torch.Tensor], first: torch.Tensor, cache: Any,
              conts: list[list[int]], pad_id: int, device: Any) -> list[LabelScore]:
    n, t = len(conts), max(len(c) for c in conts)
    if t == 1:
        return [LabelScore(float(first[c[0]]), 1) for c in conts]
    cache.batch_repeat_interleave(n)
    ids = torch.full((n, t), pad_id, dtype=torch.long, device=device)
    for i, c in enumerate(conts):
        ids[i, : len(c)] = torch.tensor(c, device=device)
    out2 = model(input_ids=ids, past_key_values=cache, use_cache=True,
                 **_per_token_extension(inputs, n, t))
    logp = torch.log_softmax(out2.logits.float(), dim=-1)  # [n, t, vocab]
    scores = []
    for i, c in enumerate(conts):
        # token 0 comes from the prefix pass; token j > 0 from position j-1 of the batch pass
        total = first[c[0]] + sum(logp[i, j - 1, c[j]] for j in range(1, len(c)))
        scores.append(LabelScore(float(total), len(c)))
    return scores


@torch.inference_mode()
def score_labels_full(model: Any, inputs: dict[str, torch.Tensor],
                      conts: list[list[int]]) -> list[LabelScore]:
    """Reference implementation: one full forward pass (prompt + label) per label, no cache."""
    p = inputs["input_ids"].shape[1]
    scores = []
    for c in conts:
        kw = {}
        for k, v in inputs.items():
            if k in ("input_ids", "attention_mask"):
                continue
            # per-token inputs (Qwen's mm_token_type_ids, Mllama's cross-attention mask) grow
            # with the label tokens, which are text: repeat the last prompt position
            if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == p:
                v = torch.cat([v, v[:, -1:].expand(1, len(c), *v.shape[2:])], dim=1)
            kw[k] = v
        ids = torch.cat([inputs["input_ids"], torch.tensor([c])], dim=1)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        scores.append(LabelScore(float(sum(logp[p - 1 + j, c[j]] for j in range(len(c)))),
                                 len(c)))
    return scores
