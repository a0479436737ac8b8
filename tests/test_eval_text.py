"""`d2v eval text-cls`: GLUE's real TSV layouts, then fine-tuning a pre-trained tiny text encoder
through the CLI, alone and under torchrun."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from d2v_train.distributed import World
from d2v_train.eval import glue, metrics
from d2v_train.eval.text_cls import longest_first, train_batches
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.text import TextSource
from pipelines.storage import Location
from schemas.evaluation import EvalResult
from tests.helpers import REPO, run_d2v

ENV = {"OMP_NUM_THREADS": "1"}
CPU = torch.device("cpu")


def _folder(tmp_path, name: str, **files: str | bytes):
    folder = tmp_path / name
    folder.mkdir()
    for split, content in files.items():
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        (folder / f"{split}.tsv").write_bytes(data)
    return str(folder)


# --------------------------------------------------------------------------- GLUE files


def test_cola_is_headerless_with_the_sentence_last(tmp_path):
    url = _folder(tmp_path, "CoLA", train="gj04\t1\t\tOur friends won't buy this analysis.\n"
                                         "gj04\t0\t*\tThey drank the pub.\n",
                  dev="cj99\t0\t*\tThe more he reads, the wetter.\r\n")
    data = glue.load_glue(url, "train", "dev")
    assert data.task.name == "CoLA" and data.task.headline == "mcc" and not data.pairs
    assert data.labels == ("0", "1")
    assert [e.text_a for e in data.train] == ["Our friends won't buy this analysis.", "They drank the pub."]
    assert data.train_y.tolist() == [1, 0] and data.eval_y.tolist() == [0]


def test_headed_layouts_pick_their_columns_and_label_order(tmp_path):
    sst = glue.load_glue(_folder(tmp_path, "SST-2", train="sentence\tlabel\nit 's a charming journey . \t1\n"
                                                            "dull \t0\n", dev="sentence\tlabel\nfine \t1\n"),
                         "train", "dev")
    assert [e.text_a for e in sst.train] == ["it 's a charming journey . ", "dull "] and sst.train_y.tolist() == [1, 0]

    mrpc_header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"  # MRPC's files start with a BOM
    mrpc = glue.load_glue(_folder(tmp_path, "mrpc", train=mrpc_header + "1\t702876\t702977\tA said.\tA told.\n"
                                                           "0\t2108705\t2108831\tB.\tC.\n",
                                  dev=mrpc_header + "1\t1\t2\tX\tY\n"), "train", "dev")
    assert mrpc.task.headline == "f1" and mrpc.pairs
    assert [(e.text_a, e.text_b, e.label) for e in mrpc.train] == [("A said.", "A told.", "1"), ("B.", "C.", "0")]

    # MNLI: train has label1 only, dev_matched label1..label5; a stray quote stays inside its field
    parses = "\t".join(["(a)"] * 4)
    train_head = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t" \
                 "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
    dev_head = train_head.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")
    train_rows = (f"0\t1\t1e\tgov\t{parses}\t\"Hi, he said.\tHe spoke.\tneutral\tneutral\n"
                  f"1\t2\t2c\tgov\t{parses}\tYes.\tNo.\tcontradiction\tcontradiction\n")
    dev_rows = f"0\t3\t3e\tfic\t{parses}\tA.\tA.\t" + "entailment\t" * 5 + "entailment\n"
    mnli = glue.load_glue(_folder(tmp_path, "MNLI", train=train_head + train_rows, dev_matched=dev_head + dev_rows),
                          "train", "dev_matched")
    assert mnli.labels == ("contradiction", "entailment", "neutral")
    assert mnli.train[0].text_a == '"Hi, he said.' and mnli.train_y.tolist() == [2, 0] and mnli.eval_y.tolist() == [1]

    rte_head = "index\tsentence1\tsentence2\tlabel\n"
    rte = glue.load_glue(_folder(tmp_path, "RTE", train=rte_head + "0\tP.\tH.\tnot_entailment\n1\tP.\tP.\tentailment\n",
                                 dev=rte_head + "0\tQ.\tQ.\tentailment\n"), "train", "dev")
    assert rte.labels == ("entailment", "not_entailment") and rte.train_y.tolist() == [1, 0]

    qnli_head = "index\tquestion\tsentence\tlabel\n"
    qnli = glue.load_glue(_folder(tmp_path, "data", train=qnli_head + "0\tWho?\tMe.\tentailment\n",
                                  dev=qnli_head + "0\tWhy?\tNo.\tnot_entailment\n"), "train", "dev", glue_task="qnli")
    assert qnli.task.name == "QNLI" and (qnli.train[0].text_a, qnli.train[0].text_b) == ("Who?", "Me.")


def test_generic_tsv_orders_labels_from_train_and_rejects_unseen_ones(tmp_path):
    url = _folder(tmp_path, "reviews", train="id\tsentence\tlabel\n1\tgood\t10\n2\tbad\t9\n3\tok\t10\n",
                  dev="id\tsentence\tlabel\n1\tmeh\t9\n", test="id\tsentence\tlabel\n1\tnew\t11\n")
    data = glue.load_glue(url, "train", "dev")
    assert data.labels == ("9", "10") and data.train_y.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"test\.tsv: labels \['11'\] are not among"):
        glue.load_glue(url, "train", "test")
    with pytest.raises(ValueError, match=r"labels \['2'\] are not among"):
        glue.load_glue(_folder(tmp_path, "SST-2", train="sentence\tlabel\na\t0\nb\t2\n", dev="sentence\tlabel\na\t0\n"),
                       "train", "dev")
    with pytest.raises(ValueError, match="lacks the generic columns"):
        glue.load_glue(_folder(tmp_path, "other", train="text\ty\na\t0\n", dev="text\ty\na\t0\n"), "train", "dev")
    with pytest.raises(ValueError, match=r"no validation\.tsv \(splits there: dev, test, train\)"):
        glue.load_glue(url, "train", "validation")


def test_bad_rows_name_their_file_and_line(tmp_path):
    url = _folder(tmp_path, "SST-2", train="sentence\tlabel\na\t1\nb\t0\nc\t1\textra\n", dev=b"sentence\tlabel\n"
                  b"fine\t1\n\ncaf\xe9\t0\n")
    with pytest.raises(ValueError, match=r"SST-2/train\.tsv line 4: 3 tab-separated columns, expected 2"):
        glue.load_glue(url, "train", "dev")
    with pytest.raises(ValueError, match=r"SST-2/dev\.tsv line 4: not UTF-8"):
        glue.read_split(url, "dev", "sst2")
    cola = _folder(tmp_path, "CoLA", train="gj04\t1\t\tFine.\nindex\tsentence\n", dev="gj04\t1\t\tFine.\n")
    with pytest.raises(ValueError, match=r"CoLA/train\.tsv line 2: 2 tab-separated columns, expected 4"):
        glue.load_glue(cola, "train", "dev")


def test_the_topic_task_scores_words_the_train_split_never_shows_and_the_corpus_teaches_them(tmp_path):
    from pipelines.synthetic import _TOPIC_WORDS

    spec = synthetic.make_glue_task(str(tmp_path), "SST-2", train=60, dev=30, seed=2, rule="topic")
    data = glue.load_glue(spec.source, "train", "dev", None)
    topic_words = {w for words in _TOPIC_WORDS.values() for w in words}
    train_words = {w for e in data.train for w in e.text_a.split()} & topic_words
    dev_words = {w for e in data.eval for w in e.text_a.split()} & topic_words
    assert train_words and dev_words and not train_words & dev_words
    for example, label in zip(data.train + data.eval, list(data.train_y) + list(data.eval_y)):
        topic = "machines" if data.labels[label] == "1" else "nature"
        assert set(example.text_a.split()) & topic_words <= set(_TOPIC_WORDS[topic])
    corpus = synthetic.make_text_corpus(str(tmp_path / "corpus"), files=1, docs_per_file=6, seed=0, topics=True)
    text = open(corpus.files[0], encoding="utf-8").read()
    assert dev_words & set(text.replace(".", " ").split())  # the unlabelled corpus has the dev words
    with pytest.raises(ValueError, match="SST-2"):
        synthetic.make_glue_task(str(tmp_path), "MRPC", rule="topic")


def test_task_names_and_sts_b_refused():
    assert glue.task_for("s3://bucket/glue/SST-2/") == "sst2"
    assert glue.task_for("/data/whatever", "sst-2") == "sst2" and glue.task_for("/x/MNLI") == "mnli"
    assert glue.task_for("/data/reviews") == glue.GENERIC
    with pytest.raises(ValueError, match="STS-B is a regression task"):
        glue.task_for("/glue/STS-B")
    with pytest.raises(ValueError, match="STS-B is a regression task"):
        glue.task_for("/data/x", "stsb")
    with pytest.raises(ValueError, match="--glue-task SQuAD: unknown"):
        glue.task_for("/data/x", "SQuAD")


def test_scores_from_summed_confusion_counts_match_the_metrics():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    confusion = np.zeros((2, 2), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    assert glue.scores(confusion) == {"accuracy": metrics.accuracy(predictions, labels),
                                      "f1": metrics.binary_f1(predictions, labels),
                                      "mcc": metrics.matthews_corrcoef(predictions, labels)}
    assert glue.scores(np.diag([3, 1, 1])) == {"accuracy": 1.0}


def test_pairs_lose_tokens_from_the_longer_text_and_ranks_split_one_batch_stream():
    assert longest_first(3, 4, 10) == (3, 4)
    assert longest_first(2, 20, 10) == (2, 8) and longest_first(20, 2, 10) == (8, 2)
    assert longest_first(9, 9, 10) == (5, 5) and longest_first(9, 9, 9) == (5, 4)

    def take(world, count):
        stream = train_batches(10, 4, seed=3, world=world)
        return [next(stream).tolist() for _ in range(count)]

    alone = take(World(0, 1, CPU), 6)
    assert sorted(sum(alone[:3], [])) == list(range(10))  # an epoch: every sample once, in 4 + 4 + 2
    assert take(World(0, 2, CPU), 3) == alone[0::2] and take(World(1, 2, CPU), 3) == alone[1::2]


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A text dataset with its tokenizer, a 2-update pre-training run on it, and two GLUE tasks."""
    root = tmp_path_factory.mktemp("text_cls")
    corpus = synthetic.make_text_corpus(str(root / "corpus"), files=2, docs_per_file=8, seed=1)
    source = TextSource.create(tuple(Location(f) for f in corpus.files), vocab_size=600, block_size=128)
    build_dataset(source, Location(str(root / "data")), BuildOptions(ShardSize.parse("20"), mask_variants=2),
                  workers=0, echo=lambda *_: None)
    result = subprocess.run([sys.executable, "d2v_train/main.py", "model=text_tiny", f"data.url={root / 'data'}",
                             "data.batch_size=4", f"run_dir={root / 'run'}", "train.max_steps=2",
                             "checkpoint.every_steps=1"],
                            cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    sst = synthetic.make_glue_task(str(root / "glue"), "SST-2", train=200, dev=41, seed=0)
    mrpc = synthetic.make_glue_task(str(root / "glue"), "MRPC", train=40, dev=21, seed=0)
    return root, sst, mrpc


def _result(completed: subprocess.CompletedProcess) -> EvalResult:
    (line,) = completed.stdout.strip().splitlines()
    return EvalResult.model_validate_json(line)


def _split(args: list[str], data: str) -> list[str]:
    return [*args, "--data", data, "--train-split", "train", "--eval-split", "dev", "--json"]


def test_fine_tuning_a_checkpoint_beats_the_majority_baseline(pretrained, tmp_path):
    root, sst, _ = pretrained
    result = _result(run_d2v(*_split(["eval", "text-cls", "--checkpoint", str(root / "run" / "checkpoints")],
                                     sst.source), "--steps", "100", "--lr", "1e-3", "--out",
                             str(tmp_path / "r.json"), env=ENV))
    assert result.task == "text-cls" and result.label == "step 2" and result.checkpoint.step == 2
    assert result.data.eval_samples == sst.expected["splits"]["dev"] == 41
    assert result.data.train_samples == 200 and result.steps == 100 and len(result.curve) == 100
    assert result.hyperparameters["glue_task"] == "SST-2"
    assert result.hyperparameters["tokenizer"] == str(root / "data" / "tokenizer")
    train, dev = sst.expected["labels"]["train"], sst.expected["labels"]["dev"]
    majority = max(sorted(train), key=train.get)  # ties: the first label
    assert result.baseline["accuracy"] == pytest.approx(dev[majority] / 41)
    assert set(result.metrics) == {"accuracy", "f1", "mcc"}
    assert result.metrics["accuracy"] >= result.baseline["accuracy"] + 0.25, result.metrics
    assert EvalResult.model_validate_json((tmp_path / "r.json").read_text()) == result


def test_random_init_needs_a_tokenizer_and_torchrun_scores_each_example_once(pretrained):
    root, _, mrpc = pretrained
    random = ["--checkpoint", "random", "--model", "text_tiny"]
    refused = run_d2v(*_split(["eval", "text-cls", *random], mrpc.source), env=ENV, check=False)
    assert refused.returncode == 2 and "--tokenizer" in refused.stderr and "Traceback" not in refused.stderr

    # same seed, same encoder and head on every rank: without fine-tuning only the sharding can differ
    args = _split([*random, "--tokenizer", str(root / "data" / "tokenizer"), "--steps", "0", "--seed", "1",
                   "--train-limit", "21"], mrpc.source)
    alone = _result(run_d2v("eval", "text-cls", *args, env=ENV))
    torchrun = subprocess.run([sys.executable, "-m", "d2v_train.launch", "--standalone", "--nproc_per_node", "2",
                               "d2v_train/eval/main.py", "text-cls", *args],
                              cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    both = _result(torchrun)
    assert (alone.world_size, both.world_size) == (1, 2)
    assert alone.label == both.label == "random" and alone.checkpoint.step is None
    assert alone.data.eval_samples == both.data.eval_samples == mrpc.expected["splits"]["dev"] == 21
    assert both.metrics == alone.metrics and both.baseline == alone.baseline
    assert both.hyperparameters["headline"] == "f1" and both.steps == 0 and both.curve == []
    # the labelled budget is drawn before the ranks split the examples: the same 21, balanced
    assert both.data.labelled == alone.data.labelled and alone.data.labelled.samples == 21
    assert alone.data.labelled.classes == 2 and alone.data.train_samples == 21


def test_a_data2vec2_checkpoint_is_fine_tuned_like_v1(pretrained, tmp_path):
    """data2vec 2.0 text pre-trains on the same shards (the original tokens, 48% dropped) and
    leaves an encoder that text-cls fine-tunes as any other."""
    root, sst, _ = pretrained
    run = tmp_path / "run"
    trained = subprocess.run([sys.executable, "d2v_train/main.py", "model=text_v2_tiny", f"data.url={root / 'data'}",
                              "data.batch_size=4", f"run_dir={run}", "train.max_steps=2", "checkpoint.every_steps=2"],
                             cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-4000:]
    result = _result(run_d2v(*_split(["eval", "text-cls", "--checkpoint", str(run / "checkpoints")], sst.source),
                             "--steps", "100", "--lr", "1e-3", env=ENV))
    assert result.checkpoint.step == 2 and result.label == "step 2"
    assert result.metrics["accuracy"] >= result.baseline["accuracy"] + 0.25, result.metrics
