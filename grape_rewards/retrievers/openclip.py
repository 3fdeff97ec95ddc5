"""open_clip retrievers: any architecture with a pretrained tag, a local checkpoint, a local folder, or random weights.

Text is encoded on its true token length: CLIP's text tower is causal and reads the end-of-text
position, so the padding after the longest text of a batch can be dropped without changing the result.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..devices import to_device
from .attention import attention_backend
from .base import (
    ImageInput,
    Retriever,
    TextInfo,
    batched,
    cast_model,
    l2_normalize,
    load_image,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    warn_random_init,
)
from .clip_tokenizer import fast_clip_tokenizer
from .loading import hub_only_if_reachable


class OpenCLIPRetriever(Retriever):
    """A CLIP-style dual encoder from open_clip.

    Args:
        model_name: an open_clip architecture (``ViT-B-32``), or ``local-dir:<folder>`` / ``hf-hub:<repo>``.
        pretrained: a pretrained tag (``openai``, ``laion2b_s34b_b79k``) or the path of a checkpoint file;
            ignored for ``local-dir:`` / ``hf-hub:`` names.
        random_init: random weights, for tests and benchmarks only (a loud warning; the fingerprint says so).
        model_cfg: an architecture given as data (open_clip's JSON config), registered under ``model_name``.
        pad_free: encode texts at the batch's longest true length (exact for causal, EOT-pooled towers).
    """

    corpus_modality = "image"

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        random_init: bool = False,
        seed: int = 0,
        model_cfg: dict[str, Any] | None = None,
        pad_free: bool = True,
        spec: str | None = None,
    ) -> None:
        import open_clip

        self.spec = spec or f"open_clip:{model_name}/{pretrained or 'random'}"
        self.device = resolve_device(device)
        self.random_init = random_init
        self.pad_free = pad_free
        if model_cfg is not None:
            _register_config(model_name, model_cfg)
        if not random_init and not pretrained and not model_name.startswith(("local-dir:", "hf-hub:")):
            tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
            raise ValueError(
                f"open_clip retriever {self.spec!r} names no weights: pass open_clip:{model_name}/<tag> "
                f"(tags: {', '.join(tags) or 'none known'}), open_clip:{model_name}/<path to checkpoint>, "
                f"or random:open_clip:{model_name} for random weights (tests only)")
        if pretrained and (pretrained.startswith((".", "/", "~")) or pretrained.endswith((".pt", ".bin", ".pth",
                                                                                            ".safetensors"))):
            if not Path(pretrained).expanduser().is_file():
                raise FileNotFoundError(f"open_clip checkpoint {pretrained!r} (from {self.spec!r}) does not exist; "
                                        "pass the path of an existing .pt/.bin/.safetensors file")
            pretrained = str(Path(pretrained).expanduser())
        from_hub = not random_init and (model_name.startswith("hf-hub:") or (
            model_name in open_clip.list_models() and not (pretrained and Path(pretrained).is_file())))
        unreachable: str | None = None
        try:
            with torch.random.fork_rng(devices=[]), (hub_only_if_reachable() if from_hub else nullcontext()) as hub:
                unreachable = hub
                torch.manual_seed(seed)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=None if random_init else pretrained, device="cpu",
                    load_weights=not random_init)
            tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as exc:
            if unreachable is not None:
                raise RuntimeError(
                    f"cannot load open_clip model {model_name!r} (pretrained={pretrained!r}) for {self.spec!r}: its "
                    f"weights are not in the local cache and the model hub cannot be reached ({unreachable}); pass "
                    + ("" if model_name.startswith("hf-hub:") else
                       f"a local checkpoint (open_clip:{model_name}/<path/to/weights.bin>) or ")
                    + "a local folder (open_clip:local-dir:<folder with open_clip_config.json>)") from exc
            raise RuntimeError(
                f"cannot load open_clip model {model_name!r} (pretrained={pretrained!r}) for {self.spec!r}: {exc}\n"
                f"-> pass a local checkpoint (open_clip:{model_name}/<path/to/weights.bin>), a local folder "
                "(open_clip:local-dir:<folder with open_clip_config.json>), or make the hub reachable; "
                f"known architectures: open_clip.list_models()") from exc
        self.model = model.eval().to(self.device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.fast_tokenizer = fast_clip_tokenizer(tokenizer)
        """open_clip's tokenizer with the same ids at a fraction of the cost, where it can be mirrored exactly."""
        self.max_text_tokens = int(getattr(tokenizer, "context_length", None) or 77)
        self._text_tower = _text_tower(self.model)
        """The causal text tower whose trailing padding can be dropped exactly, or None (always pad)."""
        self.dim = _embed_dim(self.model)
        self._architecture = _architecture_id(model_name, model_cfg)
        self._fingerprint: str | None = None
        self.dtype = resolve_dtype(dtype, self.device)
        cast_model(self, self.model, self.dtype)
        if random_init:
            warn_random_init(self.spec)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # the preprocessing id is worth computing once only
            return model_fingerprint(self, self.model, "open_clip", self._architecture,
                                     _preprocess_id(self.model, self.preprocess), self.max_text_tokens)
        return self._fingerprint

    def text_info(self, texts: Sequence[str]) -> list[TextInfo]:
        if self.fast_tokenizer is not None:
            return self._infos(map(len, self.fast_tokenizer.encode(texts)))
        return self._infos(_num_tokens(self.tokenizer, text) for text in texts)

    def _infos(self, counts: Iterable[int]) -> list[TextInfo]:
        return [TextInfo(num_tokens=n, truncated=n > self.max_text_tokens) for n in counts]

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        fast = self.fast_tokenizer
        tokens = fast.pack(fast.encode(texts)) if fast is not None else self.tokenizer(list(texts))
        return self._encode_tokens(tokens, batch_size)

    def encode_texts_with_info(self, texts: Sequence[str],
                               batch_size: int = 256) -> tuple[torch.Tensor, list[TextInfo]]:
        """Tokenize once (where the fast tokenizer applies), then encode."""
        if self.fast_tokenizer is None:
            return super().encode_texts_with_info(texts, batch_size)
        ids = self.fast_tokenizer.encode(texts)
        return self._encode_tokens(self.fast_tokenizer.pack(ids), batch_size), self._infos(map(len, ids))

    @torch.no_grad()
    def _encode_tokens(self, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Embed open_clip's (n, context) token tensor, each length-sorted batch cut to its longest text.

        The tokens and the order go to the device once; the batches are sliced there and the embeddings put back
        in order at the end, so the host never waits for the GPU between batches.
        """
        n = tokens.shape[0]
        if not n:
            return torch.empty(0, self.dim, device=self.device)
        trim = self.pad_free and self._text_tower is not None
        # A text's length runs to its last non-pad token: id 0 is open_clip's pad, but also a real BPE token
        # ("!" inside a word, e.g. "!~x"), so counting non-zero ids would cut the end-of-text token off.
        positions = torch.arange(1, tokens.shape[1] + 1)
        lengths = (positions * (tokens != 0)).amax(1) if trim else torch.full((n,), tokens.shape[1])
        order = torch.argsort(lengths, stable=True) if trim else torch.arange(n)
        widths = lengths[order].tolist()
        tokens_dev, order_dev = to_device(tokens, self.device), to_device(order, self.device)
        chunks = []
        for span in batched(range(n), batch_size):  # (batched checks batch_size)
            start, end = span[0], span[-1] + 1
            width = max(1, widths[end - 1]) if trim else tokens.shape[1]  # sorted: the last is the longest
            batch = tokens_dev[order_dev[start:end], :width]
            chunks.append(l2_normalize(encode_text_tokens(self.model, batch, pad_free=trim)))
        out = torch.empty(n, self.dim, device=self.device)
        out[order_dev] = torch.cat(chunks)
        return out

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        chunks = []
        for batch in batched(list(images), batch_size):
            pixels = torch.stack([self.preprocess(load_image(im)) for im in batch]).to(self.device, self.dtype)
            chunks.append(l2_normalize(self.model.encode_image(pixels)))
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim, device=self.device)


def _architecture_id(model_name: str, model_cfg: dict[str, Any] | None) -> str:
    """What names the architecture in the fingerprint, free of where the model lives on disk.

    A ``local-dir:`` folder is named by the ``model_cfg`` in its open_clip_config.json (moving or copying the
    folder keeps the fingerprint); an architecture given as data by that data; any other name by itself.
    """
    if model_cfg is None and model_name.startswith("local-dir:"):
        config_file = Path(model_name[len("local-dir:"):]).expanduser() / "open_clip_config.json"
        model_cfg = json.loads(config_file.read_text(encoding="utf-8")).get("model_cfg")
    if model_cfg is not None:
        return "model_cfg:" + json.dumps(model_cfg, sort_keys=True)
    return model_name


def _preprocess_id(model: torch.nn.Module, preprocess: Any) -> str:
    """The image preprocessing in the fingerprint: open_clip's preprocess config (from which the transform is built)
    as JSON, so a mean given as a list or a tuple reads the same; else the transform's repr."""
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
    if isinstance(cfg, dict):
        return "preprocess_cfg:" + json.dumps(cfg, sort_keys=True, default=str)
    return repr(preprocess)


def _register_config(model_name: str, model_cfg: dict[str, Any]) -> None:
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS[model_name] = dict(model_cfg)


def _embed_dim(model: torch.nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if proj is None and hasattr(model, "text"):
        proj = getattr(model.text, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[1])
    with torch.inference_mode():
        return int(model.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape[-1])


def _num_tokens(tokenizer: Any, text: str) -> int:
    """Tokens the whole text needs, start and end tokens included."""
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
    if inner is not None and callable(inner):
        clean = getattr(tokenizer, "clean_fn", None)  # HFTokenizer cleans texts before tokenizing them
        return len(inner(clean(text) if clean else text, truncation=False, verbose=False)["input_ids"])
    return len(tokenizer.encode(text)) + 2


def _text_tower(model: torch.nn.Module) -> Any | None:
    """The module holding the causal text transformer's parts, when trailing padding can be dropped exactly."""
    tower = model.text if hasattr(model, "text") and hasattr(model.text, "token_embedding") else model
    pool = getattr(tower, "pool_type", None) or getattr(tower, "text_pool_type", None)
    if not all(hasattr(tower, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        return None
    if getattr(tower, "attn_mask", None) is None or pool not in ("argmax", "eos"):
        return None  # bidirectional or last/first-token pooling: padding changes the result
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        return None
    return tower


def encode_text_tokens(model: torch.nn.Module, tokens: torch.Tensor, pad_free: bool = True) -> torch.Tensor:
    """Run open_clip's text tower on ``tokens`` of any length up to the context length.

    For causal towers pooled at the end-of-text token, the result equals that of the padded encoder.
    """
    from open_clip.transformer import text_global_pool

    tower = _text_tower(model) if pad_free else None
    if tower is None:
        ctx = int(getattr(model, "context_length", 0) or tokens.shape[1])
        if tokens.shape[1] < ctx:
            tokens = torch.nn.functional.pad(tokens, (0, ctx - tokens.shape[1]))
        return model.encode_text(tokens)
    seq = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:seq].to(cast_dtype)
    if x.device.type == "cuda" and _plain_blocks(tower.transformer):  # on the CPU open_clip's own blocks are faster
        x = causal_transformer(tower.transformer, x)
    else:
        x = tower.transformer(x, attn_mask=tower.attn_mask[:seq, :seq])
    x = tower.ln_final(x)
    pool = getattr(tower, "pool_type", None) or getattr(tower, "text_pool_type", None)
    eos = getattr(tower, "eos_id", None)
    if eos is None:
        eos = getattr(tower, "text_eos_id", None)
    x = text_global_pool(x, tokens, pool, eos_token_id=eos)
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def _plain_blocks(transformer: torch.nn.Module) -> bool:
    """Whether every block is open_clip's standard self-attention block (what :func:`causal_transformer` mirrors)."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or getattr(transformer, "grad_checkpointing", False):
        return False
    return all(type(b) is ResidualAttentionBlock and type(b.attn) is torch.nn.MultiheadAttention
               and b.attn._qkv_same_embed_dim and b.attn.in_proj_bias is not None and not hasattr(b, "ln_1_kv")
               for b in blocks)


def causal_transformer(transformer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's text transformer on batch-first ``x`` (B, L, D), with causal self-attention.

    The same blocks, weights and order of operations as ``Transformer.forward`` with its causal ``attn_mask``, but
    attention runs through ``scaled_dot_product_attention(is_causal=True)``, which has flash kernels, instead of
    ``nn.MultiheadAttention`` with an additive float mask (much slower on a GPU for short texts: docs/shortcuts.md).
    On a GPU the attention kernel is the fastest one measured for the shape (:mod:`.attention`). Used on CUDA only:
    on the CPU open_clip's own blocks measured faster (``benchmarks/results/shortcuts-cpu.md``).
    """
    fn = torch.nn.functional
    batch, length, width = x.shape
    heads = transformer.resblocks[0].attn.num_heads
    with attention_backend(x.device, x.dtype, heads, width // heads):
        for block in transformer.resblocks:
            attn = block.attn
            qkv = fn.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            out = fn.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(batch, length, width)))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x
