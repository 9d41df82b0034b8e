"""EleutherAI's lm-evaluation-harness on exported models, ResBM ones included.

    python -m resbm_ds.harness make-task RUN --out TASKS_DIR [--examples 500]
    python -m resbm_ds.harness --model hf --model_args pretrained=HF_DIR --tasks resbm_lastword \
        --include_path TASKS_DIR --device cpu --batch_size 8 --output_path OUT

Everything but `make-task` is lm-eval's own command line (`lm_eval ...`), run after `import
resbm_ds.hf` has registered the `resbm` model type with transformers: a ResBM export loads through
lm-eval's standard `hf` model, without `trust_remote_code`. (Plain `lm_eval` also works on exports
of uncompressed models, which are plain Llama / Qwen2 / Mistral directories.)

`make-task` writes a local task that needs no hub: `resbm_lastword`, LAMBADA-style last-word
prediction over sentences of the run's validation text (or `--text FILE`). Each example is up to
`--context-words` words of the document before a sentence's last word, and the word itself; lm-eval
reports `acc` (the word is the greedy continuation) and `perplexity` of the word.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from .cli import ArgumentParser, ConfigError, cli, existing_file, int_at_least, output_dir
from .config import Config
from .data.batches import TextSource, iter_documents
from .export import run_config
from .generate import default_text, is_transformers_dir

TASK = "resbm_lastword"
# A sentence end: a word of letters followed by . ! or ?, then whitespace.
SENTENCE_END = re.compile(r"(?<=[A-Za-z])[.!?](?=\s)")


def lastword_examples(source: TextSource, examples: int, context_words: int = 48,
                      min_context_words: int = 12) -> list[dict]:
    """Up to `examples` (context, target) pairs, documents in order, the first sentence ends of each
    document first, so a few documents do not fill the task alone."""
    per_doc = []
    for doc in iter_documents(source):
        pairs = []
        for end in SENTENCE_END.finditer(doc):
            words = doc[: end.start()].split()
            if len(words) <= min_context_words or not words[-1].isalpha():
                continue
            pairs.append({"context": " ".join(words[-context_words - 1:-1]), "target": words[-1]})
        if pairs:
            per_doc.append(pairs)
    out, rank = [], 0
    while len(out) < examples and any(rank < len(p) for p in per_doc):
        out += [p[rank] for p in per_doc if rank < len(p)][: examples - len(out)]
        rank += 1
    return out


def make_task(out_dir, source: TextSource, examples: int, context_words: int) -> Path:
    """Write TASK.jsonl and TASK.yaml (lm-eval's task format, absolute data path) to `out_dir`."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = lastword_examples(source, examples, context_words)
    if not rows:
        raise ConfigError("--text", source.describe(), f"holds no sentence with {context_words} words of context")
    data = out / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        # A loglikelihood task scores the target string as given: the space goes in front of the word.
        "doc_to_target": "{{' ' + target}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
        "metadata": {"version": 1.0, "source": source.describe(), "examples": len(rows)},
    }
    (out / f"{TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    print(f"[harness] {TASK}: {len(rows)} examples from {source.describe()} -> {out}")
    return out


def trained_config(path) -> Config | None:
    """The resbm-ds Config of a run or an export (None for a transformers directory, which keeps the
    model, not the run), read without loading any weights."""
    return None if is_transformers_dir(path) else run_config(path)


def make_task_main(argv) -> int:
    ap = ArgumentParser(prog="python -m resbm_ds.harness make-task",
                                 description="write a local lm-eval task from a run's validation text")
    ap.add_argument("model", nargs="?", help="run, export or transformers directory (its validation text)")
    ap.add_argument("--text", type=existing_file, default=None, help="a text file instead of the run's validation text")
    ap.add_argument("--out", type=output_dir, required=True, help="directory for the task (pass it to --include_path)")
    ap.add_argument("--examples", type=int_at_least(1), default=500)
    ap.add_argument("--context-words", type=int_at_least(1), default=48)
    args = ap.parse_args(argv)
    if args.text:
        source = TextSource.local(args.text)
    elif args.model:
        source = default_text(trained_config(args.model))
    else:
        ap.error("give a run directory or --text FILE")
    make_task(args.out, source, args.examples, args.context_words)
    return 0


@cli
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-task"]:
        return make_task_main(argv[1:])
    from lm_eval.__main__ import cli_evaluate   # optional dependency: pip install 'resbm-ds[eval]'

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
