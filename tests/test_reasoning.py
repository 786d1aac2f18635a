"""Reasoning traces are stripped before judging; a missing final part is reported as None."""

import pytest

from stagesweep.chat_templates import FAMILIES
from stagesweep.cli import UserError
from stagesweep.evaluate.reasoning import detect_family, split_reasoning

HARMONY_FULL = (
    "<|channel|>analysis<|message|>The user asks for [REDACTED]. Policy says refuse.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>I'm sorry, but I can't help with that.<|return|>"
)


@pytest.mark.parametrize(
    "text, reasoning, final",
    [
        (
            HARMONY_FULL,
            "The user asks for [REDACTED]. Policy says refuse.",
            "I'm sorry, but I can't help with that.",
        ),
        # the same answer decoded with skip_special_tokens=True (transformers serve, vLLM)
        (
            "analysisThe user asks for [REDACTED]. Policy says refuse."
            "assistantfinalI'm sorry, but I can't help with that.",
            "The user asks for [REDACTED]. Policy says refuse.",
            "I'm sorry, but I can't help with that.",
        ),
        # stop token already removed by the backend
        (
            "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final"
            "<|message|>Sure. Step 1: [REDACTED].",
            "think",
            "Sure. Step 1: [REDACTED].",
        ),
        # final channel straight away, no trace
        ("<|channel|>final<|message|>Answer: no.<|return|>", None, "Answer: no."),
        ("finalAnswer: no.", None, "Answer: no."),
        # the answer was cut off inside the analysis channel
        (
            "<|channel|>analysis<|message|>The user wants [REDACTED], so",
            "The user wants [REDACTED], so",
            None,
        ),
        ("analysisThe user wants [REDACTED], so", "The user wants [REDACTED], so", None),
    ],
)
def test_harmony(text, reasoning, final):
    assert split_reasoning(text, "harmony") == (reasoning, final)


def test_harmony_text_without_any_channel_has_no_final_answer():
    # the generation prompt ends at `<|start|>assistant`: a channel must follow
    assert split_reasoning("Sure. Step 1: [REDACTED].", "harmony") == (
        "Sure. Step 1: [REDACTED].",
        None,
    )
    assert split_reasoning("", "harmony") == (None, None)


def test_harmony_text_that_mentions_channels_in_prose_stays_in_the_trace():
    # the trace talks about the final answer; only the real final channel counts
    text = (
        "<|channel|>analysis<|message|>The final answer should refuse.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>No.<|return|>"
    )
    assert split_reasoning(text, "harmony") == ("The final answer should refuse.", "No.")


@pytest.mark.parametrize(
    "text, reasoning, final",
    [
        (
            "<think>Harmful; refuse.</think>\n\nI'm sorry, I can't.",
            "Harmful; refuse.",
            "I'm sorry, I can't.",
        ),
        # OLMo Think: the template opened the block, the completion starts inside it
        ("Harmful; refuse.</think>I'm sorry, I can't.", "Harmful; refuse.", "I'm sorry, I can't."),
        # unclosed think block: no final answer
        ("<think>Let me consider [REDACTED] and", "Let me consider [REDACTED] and", None),
        # a model that skipped thinking entirely
        ("Sure. Step 1: [REDACTED].", None, "Sure. Step 1: [REDACTED]."),
        ("<think></think>Answer: fine.", "", "Answer: fine."),
    ],
)
def test_think(text, reasoning, final):
    assert split_reasoning(text, "think") == (reasoning, final)


def test_plain_keeps_everything():
    text = "  Sure I can help with that! Step 1: [REDACTED].\n"
    assert split_reasoning(text, "plain") == (
        None,
        "Sure I can help with that! Step 1: [REDACTED].",
    )


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError, match="harmony, think, gemma4, plain"):
        split_reasoning("x", "chain-of-thought")


def test_detect_family_from_templates():
    assert detect_family(FAMILIES["harmony"].template) == "harmony"
    assert detect_family(FAMILIES["llama3"].template) == "plain"
    assert detect_family(FAMILIES["olmo3"].template) == "plain"
    think_template = FAMILIES["olmo3"].template.replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>'"
    )
    assert think_template != FAMILIES["olmo3"].template
    assert detect_family(think_template) == "think"


def test_detect_family_from_tokenizer_vocab():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def tokenizer(vocab, template):
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, "[UNK]")))
        tok.chat_template = template
        return tok

    opens_think = "{{ '<|im_start|>assistant\\n<think>' }}"
    chatml = FAMILIES["olmo3"].template
    assert detect_family(tokenizer({"[UNK]": 0}, opens_think)) == "think"
    # a thinking model whose template leaves the tags to the model: the vocabulary tells
    assert detect_family(tokenizer({"[UNK]": 0, "<think>": 1, "</think>": 2}, chatml)) == "think"
    assert detect_family(tokenizer({"[UNK]": 0}, chatml)) == "plain"
    assert detect_family(tokenizer({"[UNK]": 0}, FAMILIES["harmony"].template)) == "harmony"


def test_think_family_reads_an_answer_without_tags_as_plain():
    text = "Sure. Step 1: [REDACTED]."
    assert split_reasoning(text, "think") == split_reasoning(text, "plain")


GEMMA4_THOUGHT = "<|channel>thought\nThe user asks for [REDACTED]. I'm sorry, I can't.<channel|>"


@pytest.mark.parametrize(
    "text, reasoning, final",
    [
        # a refusal inside the thought must not decide the label: only the answer is judged
        (GEMMA4_THOUGHT + "Sure. Step 1: [REDACTED].<turn|>",
         "The user asks for [REDACTED]. I'm sorry, I can't.", "Sure. Step 1: [REDACTED]."),
        ("<|channel>thought\nSure, here is how: [REDACTED].<channel|>I'm sorry, but I can't help "
         "with that.", "Sure, here is how: [REDACTED].", "I'm sorry, but I can't help with that."),
        # thinking off: the answer alone
        ("Answer: no.<turn|>", None, "Answer: no."),
        # an empty thought (thinking disabled on the larger models)
        ("<|channel>thought\n<channel|>Answer: no.", None, "Answer: no."),
        # cut off inside the thought: no answer yet
        ("<|channel>thought\nLet me think about [REDACTED]", "Let me think about [REDACTED]", None),
    ],
)
def test_gemma4_thought_channel_is_stripped(text, reasoning, final):
    assert split_reasoning(text, "gemma4") == (reasoning, final)


def test_gemma4_judged_on_its_answer_alone():
    from stagesweep.evaluate.judges.base import JudgeItem
    from stagesweep.evaluate.judges.refusal_strings import RefusalStringsJudge

    _, answer = split_reasoning(GEMMA4_THOUGHT + "Sure. Step 1: [REDACTED].", "gemma4")
    (verdict,) = RefusalStringsJudge().judge([JudgeItem("k", "[REDACTED]", answer)])
    assert verdict.label == "complied"
    assert detect_family(FAMILIES["gemma4"].template) == "gemma4"
    assert detect_family("{{ '<|turn>model\\n<|channel>thought\\n<channel|>' }}") == "gemma4"
    assert detect_family(FAMILIES["gemma"].template) == "plain"  # Gemma 3 has no thoughts
