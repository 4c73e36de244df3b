"""Single-stream teacher: BLIP's image-text matching (ITM) head, from transformers.

A single-stream teacher reads an image and a caption *together* (the caption's tokens
cross-attend to the image's patch states) and says how well they match. That costs one forward
per (image, caption) pair, so it is never run on all N×N pairs: stage ``itm`` scores only each
image's top-k caption candidates from a dual-stream teacher's cached neighbours.

``BlipItmTeacher`` wraps ``BlipForImageTextRetrieval`` (e.g. ``Salesforce/blip-itm-base-coco``):

* ``encode_images`` / ``encode_texts`` return BLIP's image-text contrastive (ITC) features,
  ``normalize(vision_proj(CLS))`` and ``normalize(text_proj(CLS))``, so ``distill teach`` can
  cache it like any dual encoder;
* ``score_pairs(pixels, texts)`` returns the ITM log-odds of "match",
  ``itm_logits[:, 1] - itm_logits[:, 0]``, one per pair; ``score_candidates`` scores several
  captions per image while running the vision tower once per image.

The submodules are called exactly as ``BlipForImageTextRetrieval.forward`` calls them (ITM: text
encoder over the processor's tokens with cross-attention to every image state; ITC: text encoder
alone), but with the image attention mask made on the model's device and the vision states of
an image reused across its captions. transformers feeds the ITM pass the processor's tokens as
they are ([CLS] first), while Salesforce's BLIP code puts its [ENC] token first for that pass;
``itm_first_token="[ENC]"`` does the latter (the default follows transformers).

``config="tiny"`` builds a random-initialised miniature (32 px, one layer per tower, 16-d ITC
features) with a character-level WordPiece vocabulary defined in this module, so tests and the
offline demo need no download.
"""
from __future__ import annotations

import functools
import hashlib
import json
import string
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from PIL import Image

from pipeline.fingerprint import canonical_json
from pipeline.teachers.base import (DEFAULT_LOGIT_SCALE, TEACHERS, Teacher, state_dict_sha256,
                                    weights_sha256)

# BLIP's retrieval code tokenises captions with truncation at 35 tokens (models/blip_retrieval.py).
BLIP_MAX_LENGTH = 35
TINY_IMAGE_SIZE = 32
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Special tokens of BLIP's BERT tokenizer: [DEC] is its decoder bos token, [ENC] the encoder one.
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")
_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def tiny_vocab() -> dict[str, int]:
    """Character-level WordPiece vocabulary: BERT's specials, then every lowercase letter, digit
    and punctuation mark as a word start and as a ``##`` continuation, so any lowercased ASCII
    text tokenises without [UNK] (other characters become [UNK])."""
    tokens = list(_SPECIALS) + list(_CHARS) + [f"##{c}" for c in _CHARS]
    return {t: i for i, t in enumerate(tokens)}


def tiny_blip_config() -> dict[str, Any]:
    """Keyword arguments of the miniature ``BlipConfig`` (see the module docstring)."""
    vocab = tiny_vocab()
    return {
        "text_config": {
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
            "pad_token_id": vocab["[PAD]"], "sep_token_id": vocab["[SEP]"],
            "bos_token_id": vocab["[DEC]"], "eos_token_id": vocab["[SEP]"],
            "initializer_range": 0.1,
        },
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": TINY_IMAGE_SIZE, "patch_size": 8,
            # BLIP's default vision init (1e-10) would make every random image look the same
            "initializer_range": 0.1,
        },
        "image_text_hidden_size": 16,
        "initializer_range": 0.1,
    }


class ImageTransform:
    """PIL image -> CHW float tensor through a BLIP image processor (resize, rescale,
    normalise); its repr is the processor's settings, for the teacher's fingerprint."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        settings = {k: v for k, v in self.processor.to_dict().items()
                    if not k.startswith("_") and k != "processor_class"}
        return f"{type(self.processor).__name__}({canonical_json(settings)})"


class _Built(NamedTuple):
    net: torch.nn.Module
    image_processor: Any
    tokenizer: Any
    weights_file: str | None


def _build_tiny(seed: int) -> _Built:
    """Random-initialised miniature from a private generator seeded with ``seed``."""
    from transformers import (BertTokenizer, BlipConfig, BlipForImageTextRetrieval,
                              BlipImageProcessor)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = BlipForImageTextRetrieval(BlipConfig(**tiny_blip_config()))
    tokenizer = BertTokenizer(vocab=tiny_vocab(), bos_token="[DEC]",
                              extra_special_tokens={"enc_token": "[ENC]"})
    processor = BlipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return _Built(net, processor, tokenizer, None)


def _weights_file(model: str) -> str | None:
    """The weights file behind a local directory or an already downloaded hub id, if any (None
    for sharded weights: the fingerprint then hashes the loaded state dict instead)."""
    if Path(model).exists():
        local = [Path(model) / name for name in _WEIGHT_FILES]
        return next((str(p) for p in local if p.is_file()), None)
    from huggingface_hub import try_to_load_from_cache

    for name in _WEIGHT_FILES:
        found = try_to_load_from_cache(model, name)
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def _build_pretrained(model: str) -> _Built:
    """``BlipForImageTextRetrieval`` and ``BlipProcessor`` from a hub id or a local directory."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    processor = BlipProcessor.from_pretrained(model)
    net = BlipForImageTextRetrieval.from_pretrained(model)
    return _Built(net, processor.image_processor, processor.tokenizer, _weights_file(model))


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    """Id of ``token`` in ``tokenizer``'s vocabulary (None for None); unknown tokens fail."""
    if token is None:
        return None
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"blip_itm: itm_first_token {token!r} is not in the tokenizer's vocabulary")
    return int(found)


class BlipItmTeacher(Teacher):
    """BLIP image-text matching model as a frozen teacher: ITC features plus ITM pair scores."""

    def __init__(self, model: str | None = None, config: str | None = None, seed: int = 0,
                 max_length: int = BLIP_MAX_LENGTH, itm_first_token: str | None = None,
                 logit_scale: float = DEFAULT_LOGIT_SCALE, device: str = "cpu",
                 amp: bool = True) -> None:
        if (model is None) == (config is None):
            raise ValueError("blip_itm: give exactly one of `model` (hub id or local directory, "
                             "e.g. Salesforce/blip-itm-base-coco) or `config: tiny` (random init)")
        if config is not None and config != "tiny":
            raise ValueError(f"blip_itm: unknown config {config!r}; known: ['tiny']")
        built = _build_tiny(seed) if config is not None else _build_pretrained(model)
        super().__init__(
            name="blip_itm", modalities=frozenset({"image", "text"}),
            embed_dim=built.net.config.image_text_hidden_size,
            # BLIP's contrastive temperature is not part of BlipForImageTextRetrieval
            logit_scale=logit_scale, transform=ImageTransform(built.image_processor), amp=amp,
        )
        self.net = built.net.to(device)
        self.tokenizer = built.tokenizer
        self.max_length = int(max_length)
        self.itm_first_token = itm_first_token
        self._itm_first_id = _token_id(self.tokenizer, itm_first_token)
        self._model, self._config, self._seed = model, config, seed
        self._weights_file = built.weights_file
        self.freeze()

    # ------------------------------------------------------------------ towers
    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_token_type_ids=False, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def _image_states(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.vision_model(pixel_values=pixels.to(self.device)).last_hidden_state

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.vision_proj(self._image_states(pixels)[:, 0, :])

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        hidden = self.net.text_encoder(**self._tokens(texts)).last_hidden_state
        return self.net.text_proj(hidden[:, 0, :])

    def _itm_log_odds(self, image_states: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """ITM head on captions cross-attending to ``image_states`` (one row per caption)."""
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        tokens = self._tokens(texts)
        if self._itm_first_id is not None:  # BLIP's own ITM input: [ENC] in place of [CLS]
            tokens["input_ids"][:, 0] = self._itm_first_id
        hidden = self.net.text_encoder(**tokens, encoder_hidden_states=image_states,
                                       encoder_attention_mask=image_mask).last_hidden_state
        logits = self.net.itm_head(hidden[:, 0, :]).float()
        return (logits[:, 1] - logits[:, 0]).cpu()

    # ---------------------------------------------------------------- scoring
    def score_pairs(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """[N,3,H,W] preprocessed pixels and N captions -> [N] float32 ITM log-odds that image i
        matches caption i. One counted forward call (none for an empty batch)."""
        if len(texts) != pixels.shape[0]:
            raise ValueError(f"score_pairs: {pixels.shape[0]} images but {len(texts)} captions")
        if not texts:
            return torch.empty(0)
        self._count_forward()
        with self._encoding():
            return self._itm_log_odds(self._image_states(pixels), list(texts))

    def score_candidates(self, pixels: torch.Tensor, texts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Image b against each caption of ``texts[b]``: the flat [sum of lengths] float32 ITM
        log-odds, image-major. The vision tower runs once per image; one counted forward call."""
        if len(texts) != pixels.shape[0]:
            raise ValueError(f"score_candidates: {pixels.shape[0]} images but {len(texts)} caption lists")
        flat = [t for group in texts for t in group]
        if not flat:
            return torch.empty(0)
        owner = torch.tensor([b for b, group in enumerate(texts) for _ in group], device=self.device)
        self._count_forward()
        with self._encoding():
            states = self._image_states(pixels)
            return self._itm_log_odds(states.index_select(0, owner), flat)

    # ------------------------------------------------------------ fingerprint
    def preprocess_repr(self) -> str:
        return (f"{self.transform!r}; {type(self.tokenizer).__name__}(max_length={self.max_length}, "
                f"itm_first_token={self.itm_first_token})")

    def _compute_weights_digest(self) -> str | None:
        if self._weights_file:
            return weights_sha256(self._weights_file)
        return state_dict_sha256(self.net)  # random init, or weights from an unknown place

    def _fingerprint_fields(self) -> dict[str, Any]:
        return {
            "model": self._model or f"config:{self._config}",
            "pretrained": self._model,
            "config": tiny_blip_config() if self._config else None,
            "seed": self._seed if self._config else None,  # ignored once weights are loaded
            "revision": getattr(self.net.config, "_commit_hash", None),
            "tokenizer_sha256": self._tokenizer_digest,
        }

    @functools.cached_property
    def _tokenizer_digest(self) -> str:
        """sha256 of the tokenizer's definition (vocabulary, normaliser, special tokens), without
        the padding/truncation state that tokenizing itself sets."""
        backend = self.tokenizer.backend_tokenizer
        definition = json.loads(backend.to_str())
        for transient in ("padding", "truncation"):
            definition.pop(transient, None)
        return hashlib.sha256(canonical_json(definition).encode()).hexdigest()


@TEACHERS.register("blip_itm")
def make_blip_itm(**kw: Any) -> BlipItmTeacher:
    """Single-stream BLIP ITM teacher. kwargs: model (hub id such as
    "Salesforce/blip-itm-base-coco" or a local directory) or config ("tiny": random init), seed
    (random init only), max_length (caption tokens, default 35 as in BLIP's retrieval),
    itm_first_token (None: the processor's tokens, as transformers does; "[ENC]": as Salesforce's
    BLIP code does), logit_scale, device, amp."""
    return BlipItmTeacher(**kw)
