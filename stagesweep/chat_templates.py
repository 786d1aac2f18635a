"""Chat templates of the model families stagesweep trains and sweeps, written by the project.

Each template reproduces the turn structure of its family's published template (the special
tokens, role names, where the end-of-turn marker goes, what the generation prompt is), because
the benign-demonstration effect is measured on demos packed as real turns of the checkpoint's
own template. Recipes for a base model without a template pick one of these by name.

Assistant content and its end-of-turn token sit in `{% generation %}` blocks, so TRL's
`assistant_only_loss` (via `return_assistant_tokens_mask`) trains on exactly what the model
must learn to write, including the token that stops it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFamily:
    """Special tokens and template of one family; what a tokenizer needs to chat like it."""

    name: str
    template: str
    end_of_turn: str
    """Token that closes an assistant turn; the tokenizer's eos and the first stop id."""
    pad: str
    special_tokens: tuple[str, ...]
    """Every added special token, in id order (they get the lowest ids after training)."""
    extra_stop: tuple[str, ...] = ()
    """Further tokens generation stops on (document end, tool call)."""
    bos: str | None = None
    """Prepended by the tokenizer (and by the template, which renders `bos_token`)."""
    plain_tokens: tuple[str, ...] = ()
    """Added as non-special tokens so they survive `decode(skip_special_tokens=True)`."""
    reasoning_family: str = "plain"
    """How `stagesweep.evaluate.reasoning.split_reasoning` reads this family's answers."""


# OLMo 3 Instruct (Think shares the ChatML turns): `<|im_start|>role\n...<|im_end|>\n`. Like the
# released template, a conversation without a system message gets the default one, so a sweep
# without `system_prompt` sees what the released checkpoint sees.
OLMO3_DEFAULT_SYSTEM = (
    "You are a helpful function-calling AI assistant. "
    "You do not currently have access to any functions. <functions></functions>"
)
OLMO3_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + OLMO3_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Llama 3.1 Instruct: bos, then a system header that is always emitted with the knowledge cutoff
# and `Today Date: <date_string>` (the released default `26 Jul 2024` when the renderer passes
# none), a caller's system prompt after those lines; then
# `<|start_header_id|>role<|end_header_id|>\n\n` + trimmed content + eot per turn.
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if date_string is not defined -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] | trim -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '' -%}"
    "{%- endif -%}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{ 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{ 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{ system_message + '<|eot_id|>' }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ message['content'] | trim + '<|eot_id|>' }}{%- endgeneration -%}"
    "{%- else -%}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)

# Gemma 3 has no system role: a system message is folded into the first user turn, followed
# by a blank line, and the assistant is called `model`. Roles must alternate, as in Gemma's own.
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if role == 'model' -%}"
    "{%- generation -%}{{ message['content'] | trim + '<end_of_turn>' }}{%- endgeneration -%}"
    "{%- else -%}"
    "{{ (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>' }}"
    "{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Gemma 4: `<|turn>role\n...<turn|>\n` turns with a real system role, the assistant called
# `model`. `enable_thinking` puts `<|think|>` at the start of the system turn; the model then
# writes its thought as `<|channel>thought\n...<channel|>` before the answer. Earlier model turns
# carry only their answers (thoughts are not replayed), as in the released template.
GEMMA4_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] | trim -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if enable_thinking or system_message -%}"
    "{{ '<|turn>system\\n' + ('<|think|>' if enable_thinking else '') + system_message }}"
    "{{ '<turn|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\\n' }}"
    "{%- if role == 'model' -%}"
    "{%- generation -%}{{ message['content'] | trim + '<turn|>' }}{%- endgeneration -%}"
    "{%- else -%}"
    "{{ message['content'] | trim + '<turn|>' }}"
    "{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)

# GPT-OSS harmony: a system header naming the channels, the caller's system prompt as a
# developer message, assistant answers in the `final` channel. The generation prompt stops at
# `<|start|>assistant`, so the model itself opens `<|channel|>analysis` and later `final`.
# A trained-on last assistant turn ends in `<|return|>` (what the model must learn to emit);
# earlier ones end in `<|end|>`, and only the last turn keeps its `thinking`, like the original.
# `Current date:` comes from `strftime_now`, as in the released template; the sweep passes one
# render date per sweep so prompts do not change from one day to the next.
HARMONY_TEMPLATE = (
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
    "Knowledge cutoff: 2024-06\\nCurrent date: ' + strftime_now('%Y-%m-%d') -}}"
    "{{- '\\n\\nReasoning: ' -}}"
    "{{- reasoning_effort | default('medium') -}}"
    "{{- '\\n\\n# Valid channels: analysis, commentary, final. "
    "Channel must be included for every message.<|end|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ('system', 'developer') -%}"
    "{{ '<|start|>developer<|message|># Instructions\\n\\n' + message['content'] + '<|end|>' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set last = loop.last and not add_generation_prompt -%}"
    "{{ '<|start|>assistant' }}"
    "{%- generation -%}"
    "{%- if last and message.get('thinking') -%}"
    "{{ '<|channel|>analysis<|message|>' + message['thinking'] + '<|end|><|start|>assistant' }}"
    "{%- endif -%}"
    "{{ '<|channel|>final<|message|>' + message['content'] }}"
    "{{ '<|return|>' if last else '<|end|>' }}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start|>assistant' }}{%- endif -%}"
)

FAMILIES: dict[str, ChatFamily] = {
    f.name: f
    for f in (
        ChatFamily(
            name="olmo3",
            template=OLMO3_TEMPLATE,
            end_of_turn="<|im_end|>",
            pad="<|pad|>",
            special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"),
            extra_stop=("<|endoftext|>",),
            plain_tokens=("<think>", "</think>"),
        ),
        ChatFamily(
            name="llama3",
            template=LLAMA3_TEMPLATE,
            end_of_turn="<|eot_id|>",
            # Llama 3 ships no pad; this is the reserved token Meta names for right padding.
            pad="<|finetune_right_pad_id|>",
            special_tokens=(
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|finetune_right_pad_id|>",
            ),
            extra_stop=("<|end_of_text|>",),
            bos="<|begin_of_text|>",
        ),
        ChatFamily(
            name="gemma",
            template=GEMMA_TEMPLATE,
            end_of_turn="<end_of_turn>",
            pad="<pad>",
            special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
            extra_stop=("<eos>",),
            bos="<bos>",
        ),
        ChatFamily(
            name="gemma4",
            template=GEMMA4_TEMPLATE,
            end_of_turn="<turn|>",
            pad="<pad>",
            special_tokens=(
                "<pad>",
                "<eos>",
                "<bos>",
                "<|turn>",
                "<turn|>",
                "<|think|>",
                "<|channel>",
                "<channel|>",
            ),
            extra_stop=("<eos>",),
            bos="<bos>",
            reasoning_family="gemma4",
        ),
        ChatFamily(
            name="harmony",
            template=HARMONY_TEMPLATE,
            end_of_turn="<|return|>",
            # As in GPT-OSS: pad is the document-end token, which the chat never emits.
            pad="<|endoftext|>",
            special_tokens=(
                "<|startoftext|>",
                "<|endoftext|>",
                "<|start|>",
                "<|message|>",
                "<|channel|>",
                "<|constrain|>",
                "<|end|>",
                "<|return|>",
                "<|call|>",
            ),
            extra_stop=("<|call|>",),
            reasoning_family="harmony",
        ),
    )
}


def get_family(name: str) -> ChatFamily:
    """Look a family up by name; a one-line error lists the known ones."""
    from stagesweep.cli import UserError

    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(
            f"unknown chat template {name!r}; choose one of {', '.join(FAMILIES)}"
        ) from None
