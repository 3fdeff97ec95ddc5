"""Retrievers: one interface, implementations for open_clip, transformers CLIP-family models, text
embedders and composed retrieval, and a factory keyed by spec strings."""

from .base import ImageInput, Retriever, TextInfo, l2_normalize, load_image
from .composed import ComposedRetriever, fuse
from .factory import RetrieverConfig, create_retriever, parse_spec
from .hf_clip import HFCLIPRetriever
from .loading import packaged_minilm_path
from .openclip import OpenCLIPRetriever
from .text_embedder import TextEmbedder

__all__ = [
    "ComposedRetriever", "HFCLIPRetriever", "ImageInput", "OpenCLIPRetriever", "Retriever", "RetrieverConfig",
    "TextEmbedder", "TextInfo", "create_retriever", "fuse", "l2_normalize", "load_image", "packaged_minilm_path",
    "parse_spec",
]
