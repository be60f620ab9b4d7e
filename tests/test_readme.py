"""The README's and the documentation's examples run as written, on a tiny peft model and
adapters saved by peft: every ``python`` block of README.md and docs/**/*.md."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import TOKENS, peft_model, word_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = {
    str(path.relative_to(ROOT)): path.read_text()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
}
PYTHON_BLOCKS = [
    (page, block)
    for page, text in PAGES.items()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)
]
CLI_LINES = [
    line
    for text in PAGES.values()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    for line in block.splitlines()
    if line.startswith("python -m fieldkit.training")
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Adapters where the README's examples look for them, written by save_pretrained."""
    monkeypatch.chdir(tmp_path)
    for name, seed in [("sft-init", 3), ("step-100", 4), ("step-200", 5)]:
        peft_model("linear", seed=seed).save_pretrained(tmp_path / "adapters" / name)
    return tmp_path


def _namespace(tmp_path):
    model = peft_model("linear", seed=2).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    dataset = [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t} for t in TOKENS]
    return {
        "torch": torch,
        "transformers": transformers,
        "model": model,
        "policy": model,
        "optimizer": optimizer,
        "batch": TOKENS,
        "loader": [TOKENS, TOKENS.flip(0)],
        "beta": 0.05,
        "pg_loss": lambda logits, batch: F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.reshape(-1)
        ),
        "kl": lambda p, q: F.kl_div(
            q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="batchmean"
        ),
        "args": args,
        "train_dataset": dataset,
        **_trl_namespace(tmp_path),
    }


def _trl_namespace(tmp_path):
    """What the README's TRL example names: a GRPO config and data, when TRL is installed."""
    try:
        import trl
        from datasets import Dataset
    except ImportError:
        return {}
    grpo_args = trl.GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        use_cpu=True,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=3,
        beta=0.1,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    dpo_args = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    pairs = {"prompt": ["w1 w2", "w3"], "chosen": [" w4", " w5 w6"], "rejected": [" w7", " w8"]}
    return {
        "grpo_args": grpo_args,
        "dpo_args": dpo_args,
        "pairs": Dataset.from_dict(pairs),
        "prompts": Dataset.from_dict({"prompt": ["w1 w2", "w3 w4"]}),
        "tokenizer": word_tokenizer(),
        "reward": lambda completions, **kwargs: [float(len(c)) for c in completions],
    }


def test_the_readme_and_the_docs_have_examples():
    pages = {page for page, _ in PYTHON_BLOCKS}
    assert "README.md" in pages and len(pages) >= 8 and len(PYTHON_BLOCKS) >= 10
    assert len(CLI_LINES) == 3


@pytest.mark.parametrize(
    ("page", "block"),
    PYTHON_BLOCKS,
    ids=[f"{p}:{b.splitlines()[0][:40]}" for p, b in PYTHON_BLOCKS],
)
def test_python_example_runs(page, block, workdir):
    exec(compile(block, page, "exec"), _namespace(workdir))


@pytest.mark.parametrize("line", CLI_LINES)
def test_cli_example_runs(line, workdir):
    env = {
        **os.environ,
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
