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
books), per-label F1 of Joy / Sadness, seeds 0 and 1 (data and training): label-set presence
1.00 / 1.00 on both; first-label scoring 0.86 / 0.00 and 0.81 / 0.00 (Joy predicted nearly
everywhere, Sadness never: always-Joy gives 0.67 / 0.00); greedy generation parsed by
:mod:`.parsing` 1.00 / 1.00 on both here, but 0.88 / 0.80 (seed 1) on the weights trained before
answers ended with Qwen's "\n" after ``<|im_end|>``, where label sets still gave 1.00 / 1.00.
Generation reads the whole answer too, but commits to one greedy string (no probabilities,
nothing to tune for macro-F1); label-set scoring costs one prompt pass plus ⌈63/chunk⌉ short
batched continuation passes.

Batches
-------
:func:`score_labels` is the one-prompt path; evaluation runs :func:`score_labels_batch`
(several left-padded prompts in one pass, then their candidates packed behind them in one more)
and :func:`score_shared_prefix` (the utterances of one comic page: the EmoComics35 prompt puts
the page image and the sentence that introduces the utterance before the utterance's own text,
so the page's longest common token prefix, image included, is encoded once and each utterance
runs only its suffix and candidates). Both equal the one-prompt path within 1e-4
(tests/evaluation/test_eval_batched.py); benchmarks/eval_speed.py measures them.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from emomerge.merging.errors import InputError


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
    from emomerge.training.models.batching import rgb_images

    return rgb_images(images)


def answer_prefix(processor: Any, messages: list[dict]) -> str:
    """The whitespace the chat template puts between the prompt and an answer (training's
    ``answer_prefix``: labels are scored as they were trained, e.g. LLaVA's `` Joy``)."""
    from emomerge.training.models.batching import answer_prefix as prefix

    return prefix(processor, messages)


def render_prompt(processor: Any, messages: list[dict], family: str) -> str:
    """The chat-template prompt up to where the assistant's answer starts, as training renders it
    (``training.models.batching.chat_prompt``: LLaVA-1.5 / LLaVA-NeXT open with the tokenizer's
    BOS)."""
    from emomerge.training.models.batching import chat_prompt

    return chat_prompt(processor, messages, family)


def label_sets(label_set: list[str] | tuple[str, ...], max_labels: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``label_set`` with at most ``max_labels`` labels, as sorted index
    tuples: by size, then lexicographically (7 labels, ``max_labels`` 3 → 7 + 21 + 35 = 63)."""
    if max_labels < 1:
        raise InputError(f"max_labels: must be at least 1, got {max_labels}")
    n = len(label_set)
    return [
        c for k in range(1, min(max_labels, n) + 1) for c in itertools.combinations(range(n), k)
    ]


def set_text(labels: list[str]) -> str:
    """A label set written exactly as training writes a multi-label target
    (``training.data.emocomics35.label_text``: canonical order, ", "-joined)."""
    from emomerge.training.data.emocomics35 import LABELS, label_text

    unknown = [lab for lab in labels if lab not in LABELS]
    if unknown:
        raise InputError(
            f"scoring label_set: label {unknown[0]!r} has no training target order "
            f"(multi-label targets are written over {LABELS}); use "
            "scoring first_label"
        )
    return label_text(list(labels))


def encode_prompts(
    processor: Any, family: str, prompts: list[str], images: list[list[Image.Image]]
) -> dict[str, torch.Tensor]:
    """Processor inputs for a batch of prompts, encoded as training encodes them
    (``training.models.batching.process_texts``: the template already holds the special tokens;
    a BOS the prompt opens with is its id, the rest tokenized on its own)."""
    from emomerge.training.models.batching import process_texts

    return process_texts(processor, family, prompts, images)


def continuation_ids(
    tokenizer: Any, prompt: str, labels: list[str], eot: str | None = None
) -> list[list[int]]:
    """Token ids of each label (plus the end-of-turn text ``eot``) *as they follow* ``prompt``.

    ids(prompt + label)[len(ids(prompt)):], the way training encodes the answer
    (``training.models.batching.encode_batch``). Tokenising a label on its own is not the same:
    SentencePiece/Metaspace tokenizers (Llama, Mistral: LLaVA-1.5, LLaVA-NeXT-Mistral) prefix a
    string's first word with "▁", so a standalone "Joy" is "▁Joy" while after the prompt it is
    "Joy" — scoring tokens the model was never trained to produce.

    A BOS the prompt opens with is dropped first: training encodes it as an id before the rest
    of the text (``training.models.batching.process_texts``), and a special token splits the
    text, so what follows the prompt tokenizes the same without it.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos) :]
    head = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    out = []
    for lab in labels:
        full = list(tokenizer(prompt + lab + (eot or ""), add_special_tokens=False)["input_ids"])
        if full[: len(head)] != head:
            raise InputError(
                f"label {lab!r}: the prompt's tokens are not a prefix of prompt + "
                "label (the tokenizer merges across the boundary), so the label's "
                "tokens cannot be isolated; training refuses such answers too"
            )
        if len(full) == len(head):
            raise InputError(f"label {lab!r}: tokenizes to no tokens")
        out.append(full[len(head) :])
    return out


def answer_context(tokenizer: Any, prompt: str) -> str:
    """The end of ``prompt`` from the start of its last special token: what a continuation's
    tokens depend on (special tokens are split out before BPE, so nothing before one changes
    how text after it is tokenized; keeping the token itself keeps any whitespace stripping it
    does). ``continuation_ids`` of it equals that of the whole prompt, and prompts that end
    alike (Qwen: ``<|im_start|>assistant\n``) share one tokenization of the candidates."""
    starts = [prompt.rfind(str(t)) for t in tokenizer.added_tokens_decoder.values() if t.special]
    start = max(starts, default=-1)
    return prompt[start:] if start >= 0 else prompt


def _per_token_extension(inputs: dict[str, torch.Tensor], n: int, t: int) -> dict[str, Any]:
    # Mllama's cross-attention mask is per text token: new tokens see the images the last prompt
    # token saw (what generate() does when it extends the mask).
    extra: dict[str, Any] = {}
    cam = inputs.get("cross_attention_mask")
    if cam is not None:
        extra["cross_attention_mask"] = cam[:, -1:].expand(n, t, *cam.shape[2:])
    return extra


@torch.inference_mode()
def score_labels(
    model: Any,
    inputs: dict[str, torch.Tensor],
    conts: list[list[int]],
    pad_id: int,
    *,
    chunk: int = 16,
) -> list[LabelScore]:
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
    prefix_cache = _out_cache(out)
    scores = []
    for lo in range(0, len(conts), chunk):
        part = conts[lo : lo + chunk]
        last = lo + chunk >= len(conts)
        # the forward pass appends to the cache it is given: every chunk but the last gets a copy
        cache = prefix_cache if last else copy.deepcopy(prefix_cache)
        scores += _continue(model, inputs, first, cache, part, pad_id, device)
    return scores


def _continue(
    model: Any,
    inputs: dict[str, torch.Tensor],
    first: torch.Tensor,
    cache: Any,
    conts: list[list[int]],
    pad_id: int,
    device: Any,
) -> list[LabelScore]:
    n, t = len(conts), max(len(c) for c in conts)
    if t == 1:
        return [LabelScore(float(first[c[0]]), 1) for c in conts]
    cache.batch_repeat_interleave(n)
    ids = torch.full((n, t), pad_id, dtype=torch.long, device=device)
    for i, c in enumerate(conts):
        ids[i, : len(c)] = torch.tensor(c, device=device)
    out2 = model(
        input_ids=ids,
        use_cache=True,
        **_cache_arg(model, cache),
        **_per_token_extension(inputs, n, t),
    )
    logp = torch.log_softmax(out2.logits.float(), dim=-1)  # [n, t, vocab]
    scores = []
    for i, c in enumerate(conts):
        # token 0 comes from the prefix pass; token j > 0 from position j-1 of the batch pass
        total = first[c[0]] + sum(logp[i, j - 1, c[j]] for j in range(1, len(c)))
        scores.append(LabelScore(float(total), len(c)))
    return scores


@torch.inference_mode()
def score_labels_full(
    model: Any, inputs: dict[str, torch.Tensor], conts: list[list[int]]
) -> list[LabelScore]:
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
        scores.append(LabelScore(float(sum(logp[p - 1 + j, c[j]] for j in range(len(c)))), len(c)))
    return scores


# --------------------------------------------------------------------------------------------
# Batched scoring: several prompts per forward pass, and prompts that share a prefix (the
# utterances of one comic page) sharing one encoding of it.
#
# Everything below works on *rows*: a KV cache of R rows, the [R, C] mask of which cached
# columns are real tokens, and each row's next text position. Prompts are left-padded, so
# every row's last prompt token sits in the last column; later tokens (a prompt's suffix, the
# candidates) are appended after all cached columns, so a row may hold pad columns in the
# middle. That needs what the one-prompt path avoids: an attention mask over cache + new
# tokens, and explicit position ids (the mask alone would shift positions by the pad count).
# Positions are the ones the unpadded prompt gets: ``cumsum(mask) - 1`` for 1-D RoPE families;
# for Qwen-VL's M-RoPE the model computes the prompt's 3-D positions itself (``get_rope_index``
# skips masked columns) and every later token is text, at ``max prompt position + 1 + j`` =
# real length + ``rope_deltas`` + j on all three axes. Explicit positions also keep the model's
# stored ``rope_deltas`` ([prompts, 1]) out of the later passes, whose rows are not an even
# repeat of the prompts.
#
# The candidates of a prompt are packed into one row behind it (a "tree" mask: each candidate
# sees the prompt and itself, at the positions it would have alone), so a batch costs two
# forward passes and one cache row per prompt, where one row per candidate copies the prompt's
# cache 63 times. Flash-attention takes no such mask: there each candidate gets its own row
# (``_extend``), as the one-prompt path does.
# --------------------------------------------------------------------------------------------

#: Per-token processor outputs ([batch, seq, ...]) that are cut and re-padded with the tokens
#: (the keys ``training.models.batching.PER_TOKEN_KEYS`` opens with a BOS).
PER_TOKEN_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "token_type_ids",
    "cross_attention_mask",
)


@dataclass
class _Rows:
    """A KV cache of R rows and what continuing each row needs."""

    cache: Any
    mask: torch.Tensor  # [R, C] 1 where the cached column is a real token
    next_pos: torch.Tensor  # [R] text position of the row's next token
    cam: torch.Tensor | None  # Mllama: [R, n_images, tiles] cross-attention row of the last token


def _mrope_module(model: Any) -> Any:
    """The submodule holding Qwen-VL's ``rope_deltas`` (None for 1-D RoPE families)."""
    return next((m for m in model.modules() if "rope_deltas" in vars(m)), None)


def _cache_arg(model: Any, cache: Any) -> dict[str, Any]:
    """A KV cache as the forward keyword the model takes: ``cache`` in transformers releases
    that have it (``past_key_values`` is deprecated there and removed in 5.40), else
    ``past_key_values`` (older releases; ``transformers>=4.57`` is allowed)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    return {_cache_keyword(type(inner)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    """The KV cache a forward returned (``cache``, or ``past_key_values`` before it)."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _select_rows(cache: Any, idx: torch.Tensor) -> Any:
    """A cache of the rows ``idx`` (repeats allowed), leaving ``cache`` untouched.

    Dynamic layers replace their tensors on update (``torch.cat``) rather than writing into
    them, so shallow copies of the layers suffice: each copy's ``batch_select_indices`` makes
    new tensors of the selected rows without first copying the whole batch.
    """
    from transformers.cache_utils import DynamicLayer

    if all(type(layer) is DynamicLayer for layer in cache.layers):
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in cache.layers]
    else:  # other layer kinds may update in place
        out = copy.deepcopy(cache)
    out.batch_select_indices(idx)
    return out


def _to(inputs: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def _prefix_pass(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, _Rows]:
    """One forward pass over left-padded prompts: last-token log-probs [B, vocab] and rows."""
    device = next(model.parameters()).device
    inputs = _to(inputs, device)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    if not bool(mask[:, -1].all()):
        raise ValueError("batched scoring needs left-padded prompts (padding_side='left')")
    mrope = _mrope_module(model)
    mrope = mrope if mrope is not None and inputs.get("image_grid_thw") is not None else None
    extra: dict[str, Any] = {}
    if mrope is None:  # text-only Qwen prompts are plain 1-D positions too (rope_deltas 0)
        extra["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    # logits_to_keep=1: only the last token's logits are needed, not [B, P, vocab]
    out = model(**inputs, use_cache=True, logits_to_keep=1, **extra)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, vocab]
    delta = mrope.rope_deltas.view(-1).to(device) if mrope is not None else 0
    cam = inputs.get("cross_attention_mask")
    return first, _Rows(
        _out_cache(out),
        mask,
        mask.long().sum(-1) + delta,
        cam[:, -1] if cam is not None else None,
    )


def _extend(
    model: Any, rows: _Rows, idx: list[int], seqs: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, _Rows]:
    """Run ``seqs[i]`` after row ``idx[i]`` of ``rows`` (right-padded; ``rows`` unchanged):
    logits [n, t, vocab] and the n extended rows."""
    device = rows.mask.device
    n, t = len(seqs), max(len(s) for s in seqs)
    at = torch.tensor(idx, device=device)
    ids = torch.full((n, t), pad_id, dtype=torch.long, device=device)
    new = torch.zeros((n, t), dtype=rows.mask.dtype, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device=device)
        new[i, : len(s)] = 1
    mask = torch.cat([rows.mask[at], new], dim=1)  # [n, C + t]
    pos = rows.next_pos[at, None] + torch.arange(t, device=device)  # [n, t]
    extra: dict[str, Any] = {}
    cam = rows.cam[at] if rows.cam is not None else None
    if cam is not None:  # new tokens see the images the last prompt token saw
        extra["cross_attention_mask"] = cam[:, None].expand(n, t, *cam.shape[1:])
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        **_cache_arg(model, _select_rows(rows.cache, at)),
        use_cache=True,
        **extra,
    )
    lens = torch.tensor([len(s) for s in seqs], device=device)
    return out.logits, _Rows(_out_cache(out), mask, rows.next_pos[at] + lens, cam)


def _score_rows(
    model: Any,
    first: torch.Tensor,
    rows: _Rows,
    conts: list[list[list[int]]],
    pad_id: int,
    chunk: int,
) -> list[list[LabelScore]]:
    """Scores of ``conts[r]`` after row r: first tokens from ``first`` [R, vocab], the rest from
    continuation passes of up to ``chunk`` rows mixing the candidates of all rows."""
    scores: list[list[LabelScore | None]] = [[None] * len(c) for c in conts]
    longer = []
    for r, per in enumerate(conts):
        for k, c in enumerate(per):
            if len(c) == 1:
                scores[r][k] = LabelScore(float(first[r, c[0]]), 1)
            else:
                longer.append((r, k, c))
    for lo in range(0, len(longer), chunk):
        part = longer[lo : lo + chunk]
        logits, _ = _extend(model, rows, [r for r, _, _ in part], [c for _, _, c in part], pad_id)
        logp = torch.log_softmax(logits.float(), dim=-1)  # [n, t, vocab]
        for i, (r, k, c) in enumerate(part):
            # token 0 from the prompt's last position; token j > 0 from position j-1 here
            tail = logp[i, torch.arange(len(c) - 1), torch.tensor(c[1:])].sum()
            scores[r][k] = LabelScore(float(first[r, c[0]] + tail), len(c))
    return scores  # type: ignore[return-value]


def _tree_mask(model: Any, cached: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """The [n, 1, T, C + T] attention mask of a packed pass: every new token sees the real
    cached columns of its row; among the new tokens, causal attention limited to the head
    (segment 0) and the token's own segment (one candidate), so candidates never see each other.
    Pads (segment -1) see the head and earlier pads: never read, but no query row is empty."""
    n, t = seg.shape
    q = torch.arange(t, device=seg.device)
    new = (q[None, None, :] <= q[None, :, None]) & (
        (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    )  # [n, T(query), T(key)]
    mask = torch.cat([cached.bool()[:, None, :].expand(n, t, cached.shape[1]), new], dim=-1)
    mask = mask[:, None]
    if _attention(model) == "eager":  # eager adds the mask to the scores: 0 / -inf floats
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask


def _attention(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def packable(model: Any) -> bool:
    """Whether the model takes a custom 4-D attention mask (sdpa, eager; not flash-attention,
    whose kernels take no mask), which packed candidate scoring needs."""
    return _attention(model) in ("sdpa", "eager")


def _score_packed(
    model: Any, first: torch.Tensor | None, rows: _Rows, items: list[tuple], pad_id: int
) -> list[list[LabelScore]]:
    """Scores of packed rows. ``items[i]`` = (cache row, head tokens, candidates): one row runs
    the head (a suffix of the prompt; may be empty) then every candidate back to back, each
    candidate at the positions it would have right after the head, under :func:`_tree_mask`.

    One pass per batch instead of one row per candidate: no copy of the prompt's cache per
    candidate (63 copies of a ~1,200-token page cache per utterance otherwise). A candidate's
    first token is read after the head's last token (after the prompt pass, ``first``, when the
    head is empty); token j > 0 after the candidate's token j-1.
    """
    device = rows.mask.device
    seqs, segs, offs = [], [], []
    for _, head, cands in items:
        seq, seg, pos, off = list(head), [0] * len(head), list(range(len(head))), []
        for k, c in enumerate(cands):
            off.append(len(seq))
            seq += c
            seg += [k + 1] * len(c)
            pos += range(len(head), len(head) + len(c))
        seqs.append((seq, pos))
        segs.append(seg)
        offs.append(off)
    n, t = len(items), max(len(q) for q, _ in seqs)
    at = torch.tensor([r for r, _, _ in items], device=device)
    ids = torch.full((n, t), pad_id, dtype=torch.long, device=device)
    seg = torch.full((n, t), -1, dtype=torch.long, device=device)
    pos = torch.zeros((n, t), dtype=torch.long, device=device)
    for i, ((q, p), g) in enumerate(zip(seqs, segs)):
        ids[i, : len(q)] = torch.tensor(q, device=device)
        seg[i, : len(q)] = torch.tensor(g, device=device)
        pos[i, : len(q)] = torch.tensor(p, device=device)
    extra: dict[str, Any] = {}
    if rows.cam is not None:  # new tokens see the images the last cached token saw
        cam = rows.cam[at]
        extra["cross_attention_mask"] = cam[:, None].expand(n, t, *cam.shape[1:])
    out = model(
        input_ids=ids,
        attention_mask=_tree_mask(model, rows.mask[at], seg),
        position_ids=rows.next_pos[at, None] + pos,
        **_cache_arg(model, _select_rows(rows.cache, at)),
        use_cache=True,
        **extra,
    )
    logp = torch.log_softmax(out.logits.float(), dim=-1)  # [n, T, vocab]
    scores = []
    for i, (r, head, cands) in enumerate(items):
        f = logp[i, len(head) - 1] if head else first[r]  # type: ignore[index]
        row = []
        for off, c in zip(offs[i], cands):
            tail = logp[
                i,
                torch.arange(off, off + len(c) - 1, device=device),
                torch.tensor(c[1:], device=device, dtype=torch.long),
            ].sum()
            row.append(LabelScore(float(f[c[0]] + tail), len(c)))
        scores.append(row)
    return scores


def _packed_items(
    heads: list[list[int]], conts: list[list[list[int]]], owner: list[int], chunk: int
) -> tuple[list[tuple], list[int]]:
    """Packed rows of at most ``chunk`` candidates each, and which prompt each row scores."""
    items, prompt_of = [], []
    for u, (head, per) in enumerate(zip(heads, conts)):
        for lo in range(0, len(per), chunk):
            items.append((owner[u], head, per[lo : lo + chunk]))
            prompt_of.append(u)
    return items, prompt_of


def _packed_passes(
    model: Any,
    first: torch.Tensor | None,
    rows: _Rows,
    items: list[tuple],
    pad_id: int,
    per_pass: int,
) -> list[list[LabelScore]]:
    """Packed rows ``per_pass`` (the number of prompts) at a time: one pass per batch when each
    prompt's candidates fit one row; a smaller ``chunk`` then lowers a pass's memory."""
    out = []
    for lo in range(0, len(items), per_pass):
        out += _score_packed(model, first, rows, items[lo : lo + per_pass], pad_id)
    return out


def _gather(parts: list[list[LabelScore]], prompt_of: list[int], n: int) -> list[list[LabelScore]]:
    out: list[list[LabelScore]] = [[] for _ in range(n)]
    for u, part in zip(prompt_of, parts):
        out[u] += part
    return out


@torch.inference_mode()
def score_labels_batch(
    model: Any,
    inputs: dict[str, torch.Tensor],
    conts: list[list[list[int]]],
    pad_id: int,
    *,
    chunk: int = 64,
    packed: bool | None = None,
) -> list[list[LabelScore]]:
    """Scores of each prompt's continuations ``conts[b]`` for B left-padded prompts (``inputs``
    from :func:`encode_prompts` with the tokenizer's ``padding_side`` "left"): one forward pass
    for all prompts, then one packed pass for their candidates (``chunk`` candidates a row;
    ``packed`` None: when the attention takes a 4-D mask, else one row per candidate, ``chunk``
    rows a pass). Equals :func:`score_labels` per prompt (the test suite checks it within 1e-4).
    """
    if chunk < 1:
        raise ValueError("score_labels_batch: chunk must be at least 1")
    first, rows = _prefix_pass(model, inputs)
    if not (packable(model) if packed is None else packed):
        return _score_rows(model, first, rows, conts, pad_id, chunk)
    items, prompt_of = _packed_items([[]] * len(conts), conts, list(range(len(conts))), chunk)
    return _gather(
        _packed_passes(model, first, rows, items, pad_id, len(conts)), prompt_of, len(conts)
    )


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def cut_rows(inputs: dict[str, Any], keep: list[int], pad_id: int) -> dict[str, Any]:
    """Left-padded processor inputs with row b cut to its first ``keep[b]`` real tokens
    (re-padded on the left); image tensors untouched, so every image token must stay."""
    mask = inputs["attention_mask"]
    b, p = mask.shape
    width = max(keep)
    out = dict(inputs)
    for key in PER_TOKEN_KEYS:
        v = inputs.get(key)
        if not torch.is_tensor(v) or v.shape[:2] != (b, p):
            continue
        fill = pad_id if key == "input_ids" else 0
        cut = torch.full((b, width, *v.shape[2:]), fill, dtype=v.dtype, device=v.device)
        for r in range(b):
            start = p - int(mask[r].sum())  # first real column (left padding)
            cut[r, width - keep[r] :] = v[r, start : start + keep[r]]
        out[key] = cut
    return out


@torch.inference_mode()
def score_shared_prefix(
    model: Any,
    prefix_inputs: dict[str, torch.Tensor],
    owner: list[int],
    suffixes: list[list[int]],
    conts: list[list[list[int]]],
    pad_id: int,
    *,
    chunk: int = 64,
    packed: bool | None = None,
) -> list[list[LabelScore]]:
    """Scores for prompts that are a shared prefix plus their own suffix.

    ``prefix_inputs``: G left-padded prefixes with all their images (e.g. one per comic page,
    :func:`cut_rows`); prompt u is prefix ``owner[u]`` + ``suffixes[u]`` (at least one token).
    The prefixes run once; then each suffix with its candidates packed after it in one row on a
    copy of its prefix's cache (``packed``, as in :func:`score_labels_batch`), or the suffixes
    in one pass and the candidates one row each. Equals scoring each whole prompt on its own
    (the test suite checks it within 1e-4).
    """
    if chunk < 1:
        raise ValueError("score_shared_prefix: chunk must be at least 1")
    if any(not s for s in suffixes):
        raise ValueError("score_shared_prefix: every prompt needs at least one suffix token")
    _, rows = _prefix_pass(model, prefix_inputs)
    if packable(model) if packed is None else packed:
        items, prompt_of = _packed_items(suffixes, conts, owner, chunk)
        return _gather(
            _packed_passes(model, None, rows, items, pad_id, len(conts)), prompt_of, len(conts)
        )
    out = []
    for lo in range(0, len(suffixes), chunk):
        part = suffixes[lo : lo + chunk]
        logits, ext = _extend(model, rows, owner[lo : lo + chunk], part, pad_id)
        last = torch.tensor([len(x) - 1 for x in part], device=logits.device)
        first = torch.log_softmax(logits[torch.arange(len(part)), last].float(), dim=-1)
        out += _score_rows(model, first, ext, conts[lo : lo + chunk], pad_id, chunk)
    return out
