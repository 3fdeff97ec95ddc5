"""Generation backends for rewrites: transformers (batched ``generate``), vLLM, or an OpenAI-compatible server.

Each backend turns a batch of :class:`GenerationRequest` (chat messages from
:func:`grape_rewards.rewrite.prompts.build_messages`, plus the path of the image that fills the
message's ``{"type": "image"}`` part, if any) into the raw completion texts, in order. Heavy
libraries are imported when a backend is built, never at module import.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .prompts import merge_system_message, plain_prompt

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("transformers", "vllm", "openai")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt: chat messages, and the image file for their image part (None for text-only prompts)."""

    messages: list[dict[str, Any]]
    image: str | None = None

    @property
    def has_image_part(self) -> bool:
        return any(isinstance(m.get("content"), list) and any(p.get("type") == "image" for p in m["content"])
                   for m in self.messages)


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings shared by the backends. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


class Generator(ABC):
    """A rewriting model: a batch of requests in, the raw completions out (same order)."""

    model_name: str
    """What the rewrites file records in its ``model`` field."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """The raw completion of each request."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources (HTTP clients, GPU memory)."""


def _check_images(requests: Sequence[GenerationRequest]) -> None:
    for i, r in enumerate(requests):
        if r.has_image_part and r.image is None:
            raise ValueError(f"request {i} has an image part but no image file")
        if r.image is not None and not r.has_image_part:
            raise ValueError(f"request {i} carries an image but its messages have no image part")


def image_data_url(path: str | Path) -> str:
    """A ``data:<mime>;base64,...`` URL of an image file (the OpenAI ``image_url`` form).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.png"
    >>> _ = p.write_bytes(b"abc")
    >>> image_data_url(p)
    'data:image/png;base64,YWJj'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def openai_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """The request's messages in the OpenAI chat format: the image part becomes an ``image_url`` data URL.

    >>> openai_messages(GenerationRequest([{"role": "user", "content": "hi"}]))
    [{'role': 'user', 'content': 'hi'}]
    """
    out = []
    for m in request.messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    if request.image is None:
                        raise ValueError("an image part needs GenerationRequest.image")
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(request.image)}})
                else:
                    parts.append(dict(p))
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


# -- transformers -------------------------------------------------------------------------------------------
def _dtype_kwarg() -> str:
    """``dtype`` on transformers >= 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _resolve_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    name = aliases.get(dtype, dtype)
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    return getattr(torch, name)


class TransformersGenerator(Generator):
    """Batched ``generate`` with a transformers model: left padding, the chat template when there is one.

    Text-only models load with ``AutoTokenizer`` + ``AutoModelForCausalLM``. With ``vision=True``
    (prompts carry images, e.g. CIRR reference images) the model loads with ``AutoProcessor`` +
    ``AutoModelForImageTextToText`` and each image goes to the processor beside its templated prompt.

    Args:
        model: a hub name or a local folder saved with ``save_pretrained``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda:N``.
        dtype: ``auto`` (bfloat16 on GPUs that support it, else float16; float32 on the CPU), ``fp32``, ``fp16``
            or ``bf16`` (``float32``, ``float16``, ``bfloat16`` also accepted).
    """

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", vision: bool = False,
                 sampling: SamplingConfig | None = None, trust_remote_code: bool = False,
                 model_name: str | None = None) -> None:
        import torch
        import transformers

        from ..retrievers.base import resolve_device

        self.model_name = model_name or model
        self.sampling = sampling or SamplingConfig()
        self.device = resolve_device(device)
        self.vision = vision
        kwargs = {_dtype_kwarg(): _resolve_dtype(dtype, self.device), "trust_remote_code": trust_remote_code}
        if vision:
            self.processor = transformers.AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
            self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(model, **kwargs)
            self._templater: Any = self.processor
        else:
            self.processor = None
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(model, **kwargs)
            self._templater = self.tokenizer
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {model} has neither a pad nor an eos token; cannot pad batches")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.has_chat_template = bool(getattr(self._templater, "chat_template", None))
        if not self.has_chat_template:
            logger.warning("%s has no chat template: prompts are plain text ending in 'Answer: '", model)
        if self.sampling.seed is not None:
            torch.manual_seed(self.sampling.seed)

    def prompt_text(self, messages: list[dict[str, Any]]) -> str:
        """The templated prompt (generation prompt appended), or :func:`plain_prompt` without a template."""
        if not self.has_chat_template:
            return plain_prompt(messages)
        if self.vision:  # processors' templates expect every content as a list of parts
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str)
                        else m for m in messages]
        try:
            return self._templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises TemplateError for templates without a system role
            if messages and messages[0].get("role") == "system":
                logger.info("chat template refused the system message (%s); folding it into the user turn", exc)
                return self._templater.apply_chat_template(merge_system_message(messages),
                                                           add_generation_prompt=True, tokenize=False)
            raise

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        import torch

        from ..retrievers.base import load_image

        if not requests:
            return []
        _check_images(requests)
        texts = [self.prompt_text(r.messages) for r in requests]
        special = not self.has_chat_template  # a chat template already writes BOS and the like
        if any(r.image is not None for r in requests):
            if not self.vision:
                raise ValueError(f"{self.model_name} was loaded as a text-only model but the prompts carry images; "
                                 "load it with vision=True (a vision-language model) or leave the images out")
            if not all(r.image is not None for r in requests):
                raise ValueError("a batch must be all image prompts or all text prompts")
            images = [load_image(r.image) for r in requests if r.image is not None]
            inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        elif self.processor is not None:
            inputs = self.processor(text=texts, padding=True, return_tensors="pt")
        else:
            inputs = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=special)
        # A processor's BatchFeature also casts pixel values to the model's dtype (bfloat16 on GPUs).
        if self.processor is not None:
            inputs = inputs.to(self.device, dtype=self.model.dtype)
        else:
            inputs = inputs.to(self.device)
        s = self.sampling
        gen_kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if s.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen_kwargs)
        return [self.decode(row) for row in out[:, inputs["input_ids"].shape[1]:].tolist()]

    def decode(self, token_ids: list[int]) -> str:
        """The completion up to its first end-of-sequence (or padding) token, other special tokens kept: an
        answer tag may be a special token of a fine-tuned tokenizer, and the reward's extraction strips chat
        special tokens itself."""
        stop = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stop.update(eos if isinstance(eos, (list, tuple)) else [eos])
        for i, token in enumerate(token_ids):
            if token in stop:
                token_ids = token_ids[:i]
                break
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def close(self) -> None:
        import torch

        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# -- vLLM ---------------------------------------------------------------------------------------------------
class VLLMGenerator(Generator):
    """Offline batched generation with vLLM's ``LLM.chat`` (images as OpenAI-style data URLs).

    Needs ``pip install vllm`` and a GPU; ``engine_kwargs`` go to ``vllm.LLM`` (``tensor_parallel_size``,
    ``max_model_len``, ``gpu_memory_utilization``...).
    """

    def __init__(self, model: str, *, sampling: SamplingConfig | None = None, model_name: str | None = None,
                 **engine_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError:
            raise RuntimeError("the vllm backend needs vLLM: pip install vllm (or use --backend transformers, "
                               "or --backend openai against a running `vllm serve`)") from None
        self.model_name = model_name or model
        self.sampling = sampling or SamplingConfig()
        s = self.sampling
        self.llm = vllm.LLM(model=model, seed=s.seed or 0, **engine_kwargs)
        self.params = vllm.SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature,
                                          top_p=s.top_p if s.temperature > 0 else 1.0, seed=s.seed)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        if not requests:
            return []
        _check_images(requests)
        outputs = self.llm.chat([openai_messages(r) for r in requests], self.params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


# -- OpenAI-compatible HTTP ---------------------------------------------------------------------------------
class OpenAIGenerator(Generator):
    """``POST {base_url}/chat/completions`` on any OpenAI-compatible server (vLLM, SGLang, TGI, OpenAI), with
    at most ``concurrency`` requests in flight, retrying connection errors, 429 and 5xx responses.

    Args:
        base_url: e.g. ``http://localhost:8000/v1`` (a URL already ending in ``/chat/completions`` is used as is).
        model: the ``model`` field of each request.
        api_key: sent as ``Authorization: Bearer``; None sends no header.
        max_retries: tries after the first, ``retry_delay`` seconds apart, doubling.
        extra_body: more fields merged into each request body (e.g. ``{"chat_template_kwargs": {...}}``).
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 3, retry_delay: float = 1.0,
                 sampling: SamplingConfig | None = None, extra_body: dict[str, Any] | None = None,
                 model_name: str | None = None) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.model_name = model_name or model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.sampling = sampling or SamplingConfig()
        self.extra_body = dict(extra_body or {})

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body of one chat-completion request."""
        s = self.sampling
        body: dict[str, Any] = {"model": self.model, "messages": openai_messages(request),
                                "max_tokens": s.max_new_tokens, "temperature": s.temperature}
        if s.temperature > 0:
            body["top_p"] = s.top_p
        if s.seed is not None:
            body["seed"] = s.seed
        return {**body, **self.extra_body}

    async def _one(self, client: Any, semaphore: asyncio.Semaphore, index: int, body: dict[str, Any]) -> str:
        import httpx

        delay = self.retry_delay
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            async with semaphore:
                try:
                    response = await client.post(self.url, json=body)
                except httpx.TransportError as exc:
                    if last:
                        raise RuntimeError(f"request {index} to {self.url} failed after {attempt + 1} tries: "
                                           f"{type(exc).__name__}: {exc}") from None
                    response = None
            if response is not None:
                if response.status_code == 200:
                    return self._content(response, index)
                retriable = response.status_code == 429 or response.status_code >= 500
                if not retriable or last:
                    raise RuntimeError(f"request {index} to {self.url}: HTTP {response.status_code}: "
                                       f"{response.text[:500]}")
            logger.info("request %d: retrying in %.1f s", index, delay)
            await asyncio.sleep(delay * (1 + 0.1 * random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    def _content(self, response: Any, index: int) -> str:
        try:
            data = response.json()
            content = data["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RuntimeError(f"request {index} to {self.url}: not a chat-completion response: "
                               f"{response.text[:500]}") from None
        return content if isinstance(content, str) else ""

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """The completions of ``requests``, at most ``concurrency`` in flight."""
        import httpx

        _check_images(requests)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        semaphore = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, headers=headers, limits=limits) as client:
            tasks = [self._one(client, semaphore, i, self.body(r)) for i, r in enumerate(requests)]
            return list(await asyncio.gather(*tasks))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        if not requests:
            return []
        coro_factory = lambda: self.agenerate(requests)  # noqa: E731
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro_factory())
        with ThreadPoolExecutor(max_workers=1) as pool:  # called from inside an event loop (e.g. a notebook)
            return pool.submit(lambda: asyncio.run(coro_factory())).result()


@dataclass
class BackendOptions:
    """What :func:`create_generator` needs besides the backend's name and the model."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"
    dtype: str = "auto"
    vision: bool = False
    trust_remote_code: bool = False
    base_url: str | None = None
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 120.0
    model_name: str | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


def create_generator(backend: str, model: str, options: BackendOptions | None = None) -> Generator:
    """Build the named backend (``transformers``, ``vllm`` or ``openai``) for ``model``."""
    o = options or BackendOptions()
    if backend == "transformers":
        return TransformersGenerator(model, device=o.device, dtype=o.dtype, vision=o.vision, sampling=o.sampling,
                                     trust_remote_code=o.trust_remote_code, model_name=o.model_name)
    if backend == "vllm":
        return VLLMGenerator(model, sampling=o.sampling, model_name=o.model_name,
                             trust_remote_code=o.trust_remote_code, **o.engine_kwargs)
    if backend == "openai":
        if not o.base_url:
            raise ValueError("the openai backend needs a base URL (--base-url http://host:port/v1)")
        return OpenAIGenerator(o.base_url, model, api_key=o.api_key, concurrency=o.concurrency, timeout=o.timeout,
                               sampling=o.sampling, model_name=o.model_name)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
