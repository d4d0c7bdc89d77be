"""lm-evaluation-harness scores a checkpoint through the server: its `local-completions` model runs a
small multiple-choice task (a local YAML + JSON, no hub) against a real uvicorn server, its token ids
from the server's own /tokenize (the `remote` tokenizer backend), its log-likelihoods from echo +
logprobs. Each doc's log-likelihoods and accuracy equal those computed from the model's logits."""

import json
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the dev extra's lm-eval[api]
pytest.importorskip("tenacity")  # lm-eval's API models need its [api] extra
pytest.importorskip("uvicorn")

from test_server import serving  # noqa: E402

from openk2.config import PRESETS  # noqa: E402
from openk2.model import build_model  # noqa: E402
from openk2.server import create_app  # noqa: E402
from openk2.tokenizer import Tokenizer  # noqa: E402

NAME = "k2-tiny"
DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit", "Kelvin"], "answer": 0},
    {"question": "Café au lait has", "choices": ["milk", "naïve tea"], "answer": 0},  # split characters
    {"question": "Cats say", "choices": ["meow", "moo", "quack", "woof"], "answer": 0},
]
TASK = """task: openk2_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log_softmax(logits) over the continuation's tokens, from one forward of the model."""
    ctx, cont = tok.encode(context), tok.encode(continuation)  # byte-level: encode(a + b) == encode(a) + encode(b)
    with torch.inference_mode():
        logp = model(torch.tensor([ctx + cont]))[0].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_lm_eval_scores_through_the_server_equal_the_model(tmp_path, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=tmp_path / "docs.jsonl"))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tok = Tokenizer.byte_level()
    model = build_model(PRESETS["k2-tiny"], seed=0).eval()
    with serving(create_app(model, tok, NAME)) as port:
        results = simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"http://127.0.0.1:{port}/v1/completions", "model": NAME,
                        "tokenizer_backend": "remote", "tokenized_requests": True, "num_concurrent": 1,
                        "max_retries": 1, "max_length": 256},
            tasks=["openk2_tiny_mc"],
            task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
            log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    samples = sorted(results["samples"]["openk2_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for doc, sample in zip(DOCS, samples):
        got = [resp[0][0] for resp in sample["resps"]]  # (log-likelihood, is_greedy) per choice
        want = [direct_loglikelihood(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-3), doc
        assert sample["acc"] == float(max(range(len(want)), key=want.__getitem__) == doc["answer"])
    accuracy = sum(s["acc"] for s in samples) / len(samples)
    assert results["results"]["openk2_tiny_mc"]["acc,none"] == pytest.approx(accuracy)
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
