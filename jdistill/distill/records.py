"""Training records of each supervision format (`data.read_examples` shape): the prompt and
answer, plus the teacher's reasoning trace for the formats that carry one (`formats`).

Chain-of-thought traces come from the teacher by *rationalisation* (STaR, Zelikman et al.
2022): the teacher is shown the text and its gold label and asked for a one-sentence reason
(`RATIONALE_RECIPE`, rendered with the teacher's chat template). Measured on the 135M
default teacher, asking it to choose a label and explain gave degenerate echoes; the
label-conditioned request gives on-topic rationales (BUILD_NOTES.md). The student never sees
the label in its prompt: its record is (task prompt → trace → answer). A trace that names a
different label than the gold one (as `data.tasks.parse_label`, the parser of generated
answers, reads it) is dropped (and counted), never trained on; a trace that names no label
is kept.
"""

from __future__ import annotations

from pathlib import Path

from jdistill.data.tasks import parse_label
from jdistill.distill import formats, supervision

RATIONALE_RECIPE = ("Financial news: {text}\n"
                    "In one short sentence, explain why this news is about {label}.")
TRACE_SEPARATOR = "\n"  # between the trace and the answer, so the answer starts a new line


def rationale_prompt(text: str, label: str, recipe: str = RATIONALE_RECIPE,
                     chat=None) -> str:
    """The teacher's prompt: `recipe` filled in, inside `chat` (see `chat_formatter`) if given."""
    for slot in ("{text}", "{label}"):
        if slot not in recipe:
            raise ValueError(f"rationale recipe {recipe!r} lacks the {slot} slot")
    message = recipe.replace("{text}", text).replace("{label}", label)
    return message + "\n" if chat is None else chat(message)


def chat_formatter(tokenizer_dir):
    """user message -> the model's chat prompt, ending where the assistant starts (message +
    newline when the tokenizer has no chat template). Loads the tokenizer once: a load costs
    ~0.3 s, which per prompt was minutes of a sweep."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not getattr(tok, "chat_template", None):
        return lambda message: message + "\n"
    return lambda message: tok.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)


def drop_disagreeing(records: list[dict], gold: list[int], label_names: list[str]):
    """(kept records, counts): drops records whose trace names another label than gold."""
    kept, counts = [], {"traces": len(records), "disagree": 0, "no_label": 0, "agree": 0}
    for r, g in zip(records, gold):
        named = parse_label(r["reasoning"], label_names)
        if named is None:
            counts["no_label"] += 1
        elif named != g:
            counts["disagree"] += 1
            continue
        else:
            counts["agree"] += 1
        kept.append(r)
    return kept, counts


def build_records(fmt: str, prompts: list[str], answers: list[str], *, texts=None, gold=None,
                  label_names=None, teacher_dir=None, cache_dir=None,
                  settings: supervision.TraceSettings | None = None, recipe=RATIONALE_RECIPE,
                  model=None, log=print):
    """(records, stats) for one format. prompts/answers: the student's task prompt and the
    answer string per example; cot/blended also need the raw texts, gold label indices,
    label names and the teacher (its traces are cached in `cache_dir`)."""
    spec = formats.get(fmt)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not spec.with_trace:
        return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)], {}
    if teacher_dir is None or cache_dir is None or texts is None or gold is None:
        raise ValueError(f"format {fmt!r} needs teacher_dir, cache_dir, texts and gold labels "
                         "for the teacher's traces")
    teacher_dir = Path(teacher_dir)
    chat = chat_formatter(teacher_dir)
    teacher_prompts = [rationale_prompt(t, label_names[g], recipe, chat)
                       for t, g in zip(texts, gold)]
    settings = settings or supervision.TraceSettings(max_new_tokens=48, recipe="{prompt}")
    records, path = supervision.cached_traces(
        cache_dir, teacher_dir, teacher_prompts, settings, answers=list(answers),
        student_prompts=list(prompts), model=model, log=log)
    records = [{**r, "reasoning": r["reasoning"].strip() + TRACE_SEPARATOR} for r in records]
    kept, counts = drop_disagreeing(records, list(gold), label_names)
    log(f"traces {path.name}: {counts['agree']} name the gold label, {counts['no_label']} "
        f"name none, {counts['disagree']} name another label (dropped)")
    return kept, {**counts, "file": str(path)}
