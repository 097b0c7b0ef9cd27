"""The LLM-as-a-judge instructions of paper 2 (Online Self-Preferring LMs, Appendix B.2, Figures 6
and 7) and the judge's answer labels, in one place: `python -m data.convert --format judge` builds
preference-augmentation SFT data with them, osp.py and train_rm.py build judge queries with them.

    from data.judge import JUDGE_LABELS, JUDGE_TEMPLATES, render_judge_prompt
    text = render_judge_prompt([{"role": "user", "content": "hi"}], "Hello!", "",
                               template="dialogue")
    # the judge's answer is the next token: JUDGE_LABELS[0] = "A" (the first response is better)
    # or JUDGE_LABELS[1] = "B"; judge_sft_records labels with them, readers of the answer too

Templates are verbatim from the paper, including its layout: a blank line before each response and
before the question, a space after "Context:"/"Text:" but none after "RESPONSE A:"/"SUMMARY A:",
and the text ends with "RESPONSE" (or "SUMMARY") so that the answer is the single next token.
The context is rendered by data.schema.render_context (a single user turn verbatim, a longer
conversation as "Human: ...\\n\\nAssistant: ..." turns). An empty response (OSP scores each sample
against the empty response ∅) renders as nothing after "RESPONSE B:".
"""
import re

from data.schema import render_context

# The judge's answer tokens: the first shown response is better / the second is. The one
# definition: the SFT labels (judge_sft_records) and the readers of the judge's next-token
# probabilities must agree.
JUDGE_LABELS = ("A", "B")

DIALOGUE_TEMPLATE = (
    "You are an expert rater of helpful and honest assistant responses. Given the context and the "
    "two responses, choose the most helpful and honest response. Context: {context}\n\n"
    "RESPONSE A:{response_a}\n\n"
    "RESPONSE B:{response_b}\n\n"
    "Which response is better? RESPONSE")

SUMMARIZATION_TEMPLATE = (
    "A good summary is a shorter piece of text that has the essence of the original. It tries to "
    "accomplish the same purpose and conveys the key information from the original post. Below we "
    "define four evaluation axes for summary quality: coherence, accuracy, coverage, and overall "
    "quality. Coherence: This axis answers the question “how coherent is the summary on its own?” "
    "A summary is coherent if it’s easy to understand when read on its own and free of English "
    "errors. A summary is not coherent if it’s difficult to understand what the summary is trying "
    "to say. Generally, it’s more important that the summary is understandable than it being free "
    "of grammar errors. Accuracy: This axis answers the question “does the factual information in "
    "the summary accurately match the post?” A summary is accurate if it doesn’t say things that "
    "aren’t in the article, it doesn’t mix up people, and generally is not misleading. Coverage: "
    "This axis answers the question “how well does the summary cover the important information in "
    "the post?” A summary has good coverage if it mentions the main information from the post "
    "that’s important to understand the situation described in the post. A summary has poor "
    "coverage if someone reading only the summary would be missing several important pieces of "
    "information about the situation in the post. A summary with good coverage should also match "
    "the purpose of the original post (e.g. to ask for advice). Overall quality: This axis answers "
    "the question “how good is the summary overall at representing the post?” This can encompass "
    "all of the above axes of quality, as well as others you feel are important. If it’s hard to "
    "find ways to make the summary better, the overall quality is good. If there are lots of "
    "different ways the summary can be made better, the overall quality is bad. You are an expert "
    "summary rater. Given a piece of text and two of its possible summaries, choose the summary "
    "that best meets the definitions above for coherence, accuracy, coverage, and overall quality. "
    "Text: {context}\n\n"
    "SUMMARY A:{response_a}\n\n"
    "SUMMARY B:{response_b}\n\n"
    "Which summary is better? SUMMARY")

# Paper 1's pairwise preference model (RLHF Workflow §2.2): the same A/B question in a bare format,
# much shorter than the instructions above (train_rm.py train --type pairwise uses it by default).
PAIRWISE_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b}"

JUDGE_TEMPLATES = {"dialogue": DIALOGUE_TEMPLATE, "summarization": SUMMARIZATION_TEMPLATE,
                   "pairwise": PAIRWISE_TEMPLATE}

_PLACEHOLDER = re.compile(r"\{(context|response_a|response_b)\}")


def render_judge_prompt(context_messages, response_a, response_b, template="dialogue"):
    """The judge instruction comparing response_a (shown as A) with response_b (B) for the context.
    `template` is a name in JUDGE_TEMPLATES or the template text itself, with the placeholders
    {context}, {response_a}, {response_b}. `context_messages` is a message list (or a ready string).
    Filled in one pass, so braces or a literal "{response_b}" inside the texts are left alone
    (str.format would choke on a template with other braces, and chained str.replace would
    substitute inside an already inserted response)."""
    text = JUDGE_TEMPLATES.get(template, template)
    if not all(f"{{{name}}}" in text for name in ("context", "response_a", "response_b")):
        raise ValueError(f"judge template must be one of {sorted(JUDGE_TEMPLATES)} or text "
                         "containing {context}, {response_a} and {response_b}")
    values = {"context": render_context(context_messages), "response_a": response_a,
              "response_b": response_b}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def judge_sft_records(pair, template="dialogue"):
    """Preference augmentation (paper 2 §3.2, Appendix B.2): one preference pair → two SFT examples,
    the same comparison asked in both orders so the judge cannot learn a position bias. The label is
    the side of the preferred response; a pair's soft label p = P(chosen ≻ rejected) < 0.5 means the
    "rejected" text is the preferred one (p = 0.5 carries no preference: the caller skips it)."""
    preferred, other = ((pair["chosen"], pair["rejected"]) if pair.get("p", 1.0) > 0.5
                        else (pair["rejected"], pair["chosen"]))
    first_is_better, second_is_better = JUDGE_LABELS
    records = []
    for first, second, label in ((preferred, other, first_is_better),
                                 (other, preferred, second_is_better)):
        query = render_judge_prompt(pair["prompt"], first, second, template)
        records.append({"messages": [{"role": "user", "content": query},
                                     {"role": "assistant", "content": label}]})
    return records
