"""Schema of the `data` and `template` config sections.

Kept free of heavy imports: the root schema (and so the CLI) imports this module. Every key here
either changes what a prepared dataset contains (and is therefore part of its cache key) or says
where to find/put things; `CACHE_IRRELEVANT` lists the latter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from vicuna_exp.choices import DataFormat, NonAlternating, Overflow, SystemPolicy


@dataclass
class DataConfig:
    """Where the conversations come from, how they are cleaned, split and batched.

    Keys a `conf/data/` option sets are `MISSING` here: the option's YAML holds their values.
    """

    name: str = MISSING
    path: str | None = MISSING  # a ShareGPT JSON/JSONL file; when null, package_file names the data
    package_file: str | None = MISSING  # "module:relative/path" inside an installed package
    format: DataFormat = MISSING  # auto | json | jsonl
    max_records: int | None = None  # read only the first N records (quick experiments, benchmarks)
    eval_fraction: float = MISSING  # share of conversations (by seeded hash of the id) held out for eval
    seed: int = 0  # seed of the eval-split hash
    packing: bool = MISSING  # padding-free packing of several examples per row
    overflow: Overflow = MISSING  # a single (user, assistant) pair longer than the context: split | truncate | drop
    group_by_length: bool = False  # unpacked mode: batch examples of similar length together
    # Cleaning; each step is a switch and each drop is counted by reason in stats.json.
    user_roles: list[str] = field(default_factory=lambda: ["human", "user"])
    assistant_roles: list[str] = field(
        default_factory=lambda: ["gpt", "chatgpt", "bard", "bing", "assistant", "model"]
    )
    system_roles: list[str] = field(default_factory=lambda: ["system"])
    system_policy: SystemPolicy = SystemPolicy.template  # template (a leading system message fills the template's slot) | drop
    strip_whitespace: bool = True  # strip leading/trailing whitespace of every message
    html_to_markdown: bool = MISSING  # scraped ChatGPT HTML back to markdown (markdownify)
    drop_empty_messages: bool = True  # empty or whitespace-only messages are removed
    trim_edges: bool = True  # drop leading non-user turns and a trailing user turn (else: drop the record)
    non_alternating: NonAlternating = NonAlternating.merge  # consecutive turns of one role: merge (joined by a blank line) | drop
    dedup: bool = MISSING  # exact duplicate conversations (after cleaning) are dropped
    blocked_words: list[str] = field(default_factory=list)  # case-insensitive; a match drops the record
    languages: list[str] | None = None  # e.g. [en]: keep records detected as these (offline, langdetect)
    min_pairs: int = 1  # records with fewer (user, assistant) pairs after cleaning are dropped
    # Where the work happens.
    num_proc: int | None = None  # worker processes for cleaning (HTML-heavy dumps); null: in-process.
    # Tokenization always runs batched on all cores (the tokenizer's own thread pool).
    cache_dir: str | None = None  # null: $VICUNA_EXP_CACHE, else ~/.cache/vicuna-exp


@dataclass
class TemplateConfig:
    """A conversation template as format strings (every key from the `conf/template/` option).

    Placeholders: `{system}`, `{role}`, `{content}`, and `{bos}` / `{eos}` for the tokenizer's
    special tokens (structural: real special tokens, never text), and `{cut}`, which writes nothing
    and has the text on each side tokenized apart (Llama-3's header and message). Other special tokens a format
    writes literally (Llama-3's `<|start_header_id|>`, ChatML's `<|im_start|>`) are listed in
    `special_tokens`: in the template's text they are those tokens, in a message they stay text.
    The assistant's supervised part is what follows the generation prompt: the reply's content and
    the rest of `assistant_format` (for Vicuna: ` {reply}</s>`). A `{bos}` at the very start of a conversation is left to the
    tokenizer, which adds BOS itself, exactly as at inference.
    """

    name: str = MISSING
    system: str = MISSING  # default system prompt; "" for none
    roles: dict[str, str] = MISSING
    system_format: str = MISSING  # rendered once when the system prompt is not empty
    user_format: str = MISSING  # may contain {system}: the system part goes into the first user turn
    assistant_format: str = MISSING
    generation_prompt: str | None = MISSING  # null: assistant_format up to {content}, trailing spaces removed
    # null: the tokenizer's own (`template.with_special_tokens`), so one template serves every vocabulary
    bos_token: str | None = MISSING
    eos_token: str | None = MISSING
    # special tokens the format strings write literally; the tokenizer must have each (added after
    # Vicuna and Llama-2 chat, which need none: at [] it stays out of the hashes)
    special_tokens: list[str] = MISSING


# DataConfig keys that do not change what a preparation contains: left out of its cache key.
CACHE_IRRELEVANT = ("name", "path", "package_file", "group_by_length", "num_proc", "cache_dir")
# (the raw data enters the key by content, not by path)
