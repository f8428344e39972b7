"""Prompt formats: how a (question, answer) pair becomes token ids and which of them the loss sees.

G-effects are measured on the inputs a model was trained with, so the format must be the one its
checkpoint saw (``--prompt-format``):

- ``chat`` (default): the tokenizer's chat template with the question as the user turn and the
  generation prompt, tokenized on its own; then the answer's tokens and end-of-sequence. Without a
  chat template: ``Question: …\\nAnswer: ``.
- ``tofu-llama2`` and ``tofu-phi``: TOFU's own fine-tuning formats (its ``model_config.yaml``:
  ``[INST] q [/INST]`` + answer for Llama-2, ``Question: q\\nAnswer: `` + answer for Phi-1.5); as in
  TOFU's ``convert_raw_data_to_model_format``, the whole text is tokenized at once with special
  tokens, end-of-sequence follows, and the first n tokens are masked, n being the token count of
  the question part tokenized alone.
- ``open-unlearning``: open-unlearning's ``preprocess_chat_instance`` with ``apply_chat_template``:
  system prompt, user turn and assistant turn through the chat template (``date_string`` passed to
  it), the prompt being the template of the first two with the generation prompt;
  end-of-sequence appended unless the template ends with it.
- ``raw``: plain continuation, as the detox study trains GPT-2: the question is the text's prefix,
  the loss is on the tokens after it (joint tokenization, prefix counted alone).

Each format returns (token ids, number of leading prompt tokens); labels are the ids with the
prompt tokens masked.
"""
from __future__ import annotations

from dataclasses import dataclass

from geffect.errors import ConfigError

FORMATS = ("chat", "tofu-llama2", "tofu-phi", "open-unlearning", "raw")
TOFU_TAGS = {"tofu-llama2": ("[INST] ", " [/INST]", ""), "tofu-phi": ("Question: ", "\n", "Answer: ")}


@dataclass(frozen=True)
class PromptFormat:
    name: str = "chat"
    system_prompt: str = "You are a helpful assistant."   # open-unlearning's configs for instruct models
    date_string: str = "10 Apr 2025"                       # idem (Llama-3 templates print a date)

    def __post_init__(self):
        if self.name not in FORMATS:
            raise ConfigError(f"--prompt-format {self.name!r}: choose one of {', '.join(FORMATS)}")

    def prompt_text(self, tok, question: str) -> str:
        """The prompt as text (what generation starts from)."""
        if self.name in TOFU_TAGS:
            start, end, answer_tag = TOFU_TAGS[self.name]
            return start + question + end + answer_tag
        if self.name == "raw":
            return question
        if self.name == "open-unlearning":
            return _template(tok, self._chat(question), generation=True, tokenize=False, date=self.date_string)
        if getattr(tok, "chat_template", None):
            return _template(tok, [{"role": "user", "content": question}], generation=True, tokenize=False)
        return f"Question: {question}\nAnswer: "

    def prompt_ids(self, tok, question: str) -> list[int]:
        """The prompt's token ids as the format tokenizes them (the rows generation starts from)."""
        if self.name == "chat":
            return tok(self.prompt_text(tok, question), add_special_tokens=False)["input_ids"]
        if self.name == "open-unlearning":
            return _template(tok, self._chat(question), generation=True, tokenize=True, date=self.date_string)
        return tok(self.prompt_text(tok, question), add_special_tokens=True)["input_ids"]

    def encode(self, tok, question: str, answer: str) -> tuple[list[int], int]:
        """(token ids of prompt + answer + end-of-sequence, number of prompt tokens). A plain-text
        record (empty question) is its text alone, every token counted: only the tokenizer's own
        leading special tokens (BOS) are prompt, whatever the format."""
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if not question:
            ids = tok(answer, add_special_tokens=True)["input_ids"]
            lead = len(tok("", add_special_tokens=True)["input_ids"])
            return ids + eos, lead
        if self.name == "chat":
            prompt = self.prompt_ids(tok, question)
            return prompt + tok(answer, add_special_tokens=False)["input_ids"] + eos, len(prompt)
        if self.name == "open-unlearning":
            chat = self._chat(question) + [{"role": "assistant", "content": answer}]
            ids = _template(tok, chat, generation=False, tokenize=True, date=self.date_string)
            if not ids or ids[-1] != tok.eos_token_id:
                ids = ids + eos
            return ids, len(self.prompt_ids(tok, question))
        ids = tok(self.prompt_text(tok, question) + answer, add_special_tokens=True)["input_ids"]
        return ids + eos, len(self.prompt_ids(tok, question))

    def _chat(self, question: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": question}]


def _template(tok, chat: list[dict], generation: bool, tokenize: bool, date: str | None = None):
    if not getattr(tok, "chat_template", None):
        raise ConfigError("--prompt-format needs the tokenizer's chat template, and this tokenizer has none; use "
                          "--prompt-format tofu-phi, tofu-llama2 or raw")
    kwargs = {"date_string": date} if date else {}
    try:
        out = tok.apply_chat_template(chat, add_generation_prompt=generation, tokenize=tokenize, **kwargs)
    except Exception as err:  # noqa: BLE001 - templates are user code (jinja) and raise anything
        raise ConfigError(f"the tokenizer's chat template cannot render this prompt ({type(err).__name__}: "
                          f"{err}); choose another --prompt-format") from None
    if tokenize and hasattr(out, "keys"):        # a BatchEncoding (transformers 5)
        out = out["input_ids"]
    return list(out) if tokenize else out


def prompt_format(name: str | PromptFormat = "chat") -> PromptFormat:
    return name if isinstance(name, PromptFormat) else PromptFormat(name)
