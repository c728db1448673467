"""The ``embeddings`` kind: a bi-encoder whose pooled output is the sentence embedding (``embeddings/stsb``).

The model is the bare encoder (``AutoModel``). A sentence's embedding is its last hidden states
pooled the way the checkpoint's sentence-transformers files say (``modules.json`` -> the Pooling
module's ``1_Pooling/config.json``, and whether a Normalize module follows); mean pooling when the
folder has none. The choice is kept in the model's config (``config.stackcomp_pooling``), so every
stage artifact pools the same way, and an export writes the sentence-transformers files back.

Pooling, the pairwise cosine similarity, the losses (CoSENT, CosineSimilarityLoss) and the metric
are sentence-transformers' own code run on our embeddings, so the score is the one its
``EmbeddingSimilarityEvaluator`` reports: Spearman (and Pearson) of the cosine similarity of each
pair against the gold score, with scipy.

Data: STS-B pairs, gold scores on one scale, 0 to 1 (the GLUE files' 0-5 divided by 5; the hub's
``sentence-transformers/stsb`` is 0-1 already). Pair batches hold sentence A as ``input_ids``,
``attention_mask`` [, ``token_type_ids``] and sentence B as the same keys ending in ``_b``, plus
``labels``; calibration, latency and unlabeled batches hold single sentences (model inputs only).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stackcomp.data.loaders import _check_batch_size, shuffled_loader
from stackcomp.errors import DataError, ModelError
from stackcomp.tasks.base import Task, register_task_kind, require_hub_cache

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader

log = logging.getLogger("stackcomp.tasks")

#: the model config attribute holding the pooling: {"mode": "mean", "normalize": true[, "max_seq_length": 256]}
POOLING_ATTR = "stackcomp_pooling"
DEFAULT_POOLING: dict[str, Any] = {"mode": "mean", "normalize": False}
#: suffix of sentence B's keys in a pair batch
PAIR_SUFFIX = "_b"
#: training losses on gold pair scores: sentence-transformers' CoSENTLoss and CosineSimilarityLoss
LOSSES = ("cosent", "cosine")


# ----------------------------------------------------------------------------- pooling


def read_pooling(path: str | Path) -> dict[str, Any]:
    """The pooling a model folder's sentence-transformers files describe (``modules.json``: a
    Transformer, a Pooling module, optionally Normalize), or mean pooling when it has none.

    A pipeline with other modules (Dense, a projection...) is refused: the embeddings kind
    reproduces pooling and normalization only, and silently dropping a layer changes the embedding.
    """
    folder = Path(path)
    listing = folder / "modules.json"
    if not listing.is_file():
        return dict(DEFAULT_POOLING)
    try:
        modules = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{listing}: cannot read the sentence-transformers module list: {e}") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise ModelError(f"{listing}: expected a list of modules with a 'type' each")
    pooling_entry, normalize = None, False
    for entry in modules:
        kind = str(entry["type"]).rsplit(".", 1)[-1]
        if kind == "Transformer" and pooling_entry is None:
            continue
        if kind == "Pooling" and pooling_entry is None:
            pooling_entry = entry
        elif kind == "Normalize" and pooling_entry is not None:
            normalize = True
        else:
            raise ModelError(f"{listing}: module {entry['type']} is not supported by the embeddings kind, which "
                             "reproduces a Transformer, its Pooling and an optional Normalize only")
    if pooling_entry is None:
        raise ModelError(f"{listing}: no Pooling module, so there is no sentence embedding to reproduce")
    from sentence_transformers.sentence_transformer.modules import Pooling

    pooling_dir = folder / str(pooling_entry.get("path", ""))
    try:
        pooling = Pooling.load(str(pooling_dir))
    except Exception as e:  # noqa: BLE001 - a missing or malformed config raises several kinds
        raise ModelError(f"{pooling_dir}: cannot read the pooling config: {type(e).__name__}: {e}") from None
    mode = pooling.pooling_mode
    result: dict[str, Any] = {"mode": mode if isinstance(mode, str) else list(mode), "normalize": normalize}
    settings = folder / "sentence_bert_config.json"
    if settings.is_file():
        try:
            max_seq_length = json.loads(settings.read_text(encoding="utf-8")).get("max_seq_length")
        except (OSError, ValueError, AttributeError):
            max_seq_length = None
        if isinstance(max_seq_length, int) and max_seq_length > 0:
            result["max_seq_length"] = max_seq_length
    return result


def pooling_of(model: nn.Module) -> dict[str, Any]:
    """The pooling ``model`` carries in its config (mean, unnormalized for a model that has none)."""
    model = getattr(model, "module", model)
    pooling = getattr(getattr(model, "config", None), POOLING_ATTR, None)
    if pooling is None:
        return dict(DEFAULT_POOLING)
    if not isinstance(pooling, Mapping) or "mode" not in pooling:
        raise ModelError(f"config.{POOLING_ATTR} of {type(model).__name__} is {pooling!r}; expected "
                         "{'mode': 'mean', 'normalize': true}")
    return {**DEFAULT_POOLING, **pooling}


def _hub_pipeline_files(repo_id: str) -> Path | None:
    """The local folder holding a hub model's sentence-transformers files (fetched, or from the
    cache offline), or None with a warning when they cannot be had: mean pooling is then assumed."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["modules.json", "sentence_bert_config.json",
                                                               "*_Pooling/config.json"]))
    except Exception as e:  # noqa: BLE001 - offline and not cached, no such repo, network: all mean "unknown"
        log.warning("%s: sentence-transformers files not available (%s: %s); assuming mean pooling", repo_id,
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None


@functools.lru_cache(maxsize=16)
def _pooler(width: int, mode: str | tuple[str, ...]):
    """sentence-transformers' Pooling module (no parameters, so one per width and mode serves all)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    try:
        return Pooling(width, pooling_mode=mode)
    except ValueError as e:
        raise ModelError(f"config.{POOLING_ATTR}: {e}") from None


def split_pair(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(sentence A's inputs, sentence B's inputs or None) of a batch; labels left out."""
    a = {k: v for k, v in batch.items() if not k.endswith(PAIR_SUFFIX) and k != "labels"}
    b = {k[:-len(PAIR_SUFFIX)]: v for k, v in batch.items() if k.endswith(PAIR_SUFFIX)}
    return a, (b or None)


def _encoder(model: nn.Module) -> nn.Module:
    """What to call for token states: the model itself when it is a bare encoder (DDP wrapper
    kept), else the encoder inside a model with a head (a student built as a classifier)."""
    inner = getattr(model, "module", model)
    base = getattr(inner, "base_model", inner)
    return model if base is inner else base


def encode(model: nn.Module, inputs: Mapping[str, Any], *, output_hidden_states: bool = False,
           output_attentions: bool = False) -> tuple[torch.Tensor, Any]:
    """(pooled sentence embeddings (N, D), the encoder's output) for one batch of single sentences."""
    from stackcomp.distill.kd import forward_inputs

    encoder = _encoder(model)
    out = encoder(**forward_inputs(encoder, inputs, drop=("labels",)), output_hidden_states=output_hidden_states,
                  output_attentions=output_attentions)
    tokens = out["last_hidden_state"] if isinstance(out, Mapping) else getattr(out, "last_hidden_state", None)
    if tokens is None:
        tokens = out[0]
    pooling = pooling_of(model)
    mode = pooling["mode"] if isinstance(pooling["mode"], str) else tuple(pooling["mode"])
    mask = inputs.get("attention_mask")
    features = {"token_embeddings": tokens}
    if mask is not None:
        features["attention_mask"] = mask
    embeddings = _pooler(tokens.shape[-1], mode)(features)["sentence_embedding"]
    if pooling["normalize"]:
        embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=-1)  # sentence-transformers' Normalize
    return embeddings, out


def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a[i], b[i]) as ``EmbeddingSimilarityEvaluator`` computes it (``util.pairwise_cos_sim``)."""
    from sentence_transformers.util import pairwise_cos_sim

    return pairwise_cos_sim(a.float(), b.float())


def similarity_metrics(predictions: Any, labels: Any) -> dict[str, float]:
    """``spearman`` and ``pearson`` of cosine similarities against gold scores, as sentence-transformers'
    ``EmbeddingSimilarityEvaluator`` has them: ``scipy.stats.spearmanr(gold, cos)`` and ``pearsonr``."""
    from scipy.stats import pearsonr, spearmanr

    scores = torch.as_tensor(predictions).detach().float().cpu().numpy().reshape(-1)
    gold = torch.as_tensor(labels).detach().cpu().numpy().reshape(-1)
    if scores.shape != gold.shape:
        raise DataError(f"{scores.size} similarity scores for {gold.size} gold scores")
    if scores.size < 2:
        raise DataError(f"a correlation needs at least 2 pairs, got {scores.size}")
    return {"spearman": float(spearmanr(gold, scores)[0]), "pearson": float(pearsonr(gold, scores)[0])}


# ----------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class _Dataset:
    """Where one pair dataset lives: the GLUE files, a JSON-lines alternative, and the hub."""

    name: str
    glue: str  # stackcomp.data.glue task whose TSVs hold the pairs
    gold_max: float  # top of the GLUE files' score scale (divided by it to get 0-1)
    hub: str  # datasets id, scores already 0-1
    hub_splits: tuple[tuple[str, str], ...]


_DATASETS = {"stsb": _Dataset("stsb", "glue/stsb", 5.0, "sentence-transformers/stsb",
                              (("train", "train"), ("dev", "validation")))}
_SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "eval": "dev"}


class EmbeddingsTask(Task):
    """Sentence embeddings from a bi-encoder, scored by how their cosine similarity ranks pairs."""

    kind = "embeddings"
    auto_class = "AutoModel"
    metrics = ("spearman", "pearson")
    main_metric = "spearman"

    def __init__(self, dataset: str, loss: str = "cosent"):
        if dataset not in _DATASETS:
            raise DataError(f"unknown embeddings dataset {dataset!r}; known: {', '.join(_known())}")
        if loss not in LOSSES:
            raise DataError(f"embeddings/{dataset}: unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        self.dataset = _DATASETS[dataset]
        self.loss = loss
        # the loss is part of the name, so stages trained with another loss get other keys
        self.name = f"embeddings/{dataset}" + ("" if loss == "cosent" else f":{loss}")
        self._loss_fn: Any = None

    @property
    def short_name(self) -> str:
        return self.dataset.name

    def describe_metric(self) -> str:
        return f"{self.main_metric} of cosine similarity vs gold on {self.name} dev"

    # ------------------------------------------------------------------ model

    def load_model(self, path: str, **kwargs: Any) -> nn.Module:
        """The bare encoder, its config carrying the pooling (its own if it has one, else the
        folder's sentence-transformers files, else mean pooling)."""
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, **kwargs)
        if getattr(model.config, POOLING_ATTR, None) is None:
            folder = Path(path) if Path(path).is_dir() else _hub_pipeline_files(path)
            setattr(model.config, POOLING_ATTR, read_pooling(folder) if folder is not None else dict(DEFAULT_POOLING))
        pooling_of(model)  # a malformed carried pooling fails here, not in the first batch
        return model

    def model_from_config(self, config: Any, reference: nn.Module) -> nn.Module:
        """A fresh bare encoder that pools as ``reference`` does (a config-built student)."""
        from transformers import AutoModel

        setattr(config, POOLING_ATTR, pooling_of(reference))
        return AutoModel.from_config(config)

    def encode(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Pooled sentence embeddings (N, D) of a batch of single sentences."""
        return encode(model, inputs)[0]

    def pair_loss(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss on pair embeddings and gold scores (0-1): sentence-transformers'
        CoSENTLoss (scale 20) or CosineSimilarityLoss (MSE of the cosine), as ``self.loss`` says."""
        if self._loss_fn is None:
            from sentence_transformers.sentence_transformer.losses import (
                CoSENTLoss,
                CosineSimilarityLoss,
            )

            # no SentenceTransformer behind them: we hand over the embeddings ourselves
            self._loss_fn = CoSENTLoss(None) if self.loss == "cosent" else CosineSimilarityLoss(None)
        return self._loss_fn.compute_loss_from_embeddings([a, b], labels.float())

    # ------------------------------------------------------------------ data

    def build_data(self, tokenizer: Any, options: Any) -> EmbeddingData:
        return EmbeddingData(self, tokenizer, options)

    def resolve_split(self, split: str) -> str:
        key = _SPLIT_ALIASES.get(str(split).strip().lower(), str(split).strip().lower())
        if key not in dict(self.dataset.hub_splits):
            raise DataError(f"{self.name} has no split {split!r}; its splits are "
                            f"{', '.join(dict(self.dataset.hub_splits))}")
        return key

    def _candidates(self, split: str, data_dir: str | Path) -> tuple[Path, Path]:
        """The GLUE TSV and the JSON-lines file that may hold ``split`` under ``data_dir``."""
        from stackcomp.data.glue import local_path

        return (local_path(self.dataset.glue, split, data_dir),
                Path(data_dir).expanduser() / self.dataset.name / f"{split}.jsonl")

    def data_files(self, splits: list[str], data_dir: str | Path | None) -> dict[str, Path] | None:
        from stackcomp.data.glue import default_data_dir

        data_dir = data_dir if data_dir is not None else default_data_dir()
        if data_dir is None:
            return None
        files = {}
        for split in splits:
            split = self.resolve_split(split)
            tsv, jsonl = self._candidates(split, data_dir)
            files[split] = jsonl if jsonl.is_file() and not tsv.is_file() else tsv
        return files

    def hub_source(self) -> tuple[str, str | None]:
        return (self.dataset.hub, None)

    def check_data(self, splits: list[str], data_dir: str | Path | None) -> None:
        from stackcomp.data.glue import default_data_dir

        root = data_dir if data_dir is not None else default_data_dir()
        if root is None:
            require_hub_cache(self.name, self.dataset.hub, self._layouts())
            return
        for split in splits:
            split = self.resolve_split(split)
            tsv, jsonl = self._candidates(split, root)
            if not tsv.is_file() and not jsonl.is_file():
                raise DataError(f"{self.name} {split}: no file at {tsv} nor {jsonl}; the data dir {root} should hold "
                                f"{self._layouts()}")

    def _layouts(self) -> str:
        from stackcomp.data.glue import get_task as glue_spec

        glue_dir = glue_spec(self.dataset.glue).glue_dir
        return (f"glue/{glue_dir}/<split>.tsv (GLUE layout, scores 0-{self.dataset.gold_max:g}) or "
                f"{self.dataset.name}/<split>.jsonl (sentence1, sentence2, score 0-1 per line)")

    def load_pairs(self, split: str, data_dir: str | Path | None = None) -> tuple[list[str], list[str], list[float]]:
        """(sentences A, sentences B, gold scores 0-1) of ``split``: local files when a data dir is
        set (argument, else $STACKCOMP_DATA_DIR), else the hub."""
        from stackcomp.data.glue import default_data_dir, load_split

        split = self.resolve_split(split)
        root = data_dir if data_dir is not None else default_data_dir()
        if root is None:
            return self._load_hub(split)
        self.check_data([split], root)
        tsv, jsonl = self._candidates(split, root)
        if not tsv.is_file():
            return _read_jsonl(jsonl)
        ds = load_split(self.dataset.glue, split, root)
        gold = [float(s) / self.dataset.gold_max for s in ds["label"]]
        for i, g in zip(ds["idx"], gold):
            if not 0.0 <= g <= 1.0 or math.isnan(g):
                raise DataError(f"{tsv}: data row {i + 1} has score {g * self.dataset.gold_max:g}, outside "
                                f"0-{self.dataset.gold_max:g}")
        return list(ds["sentence1"]), list(ds["sentence2"]), gold

    def _load_hub(self, split: str) -> tuple[list[str], list[str], list[float]]:
        import datasets

        hub_split = dict(self.dataset.hub_splits)[split]
        try:
            ds = datasets.load_dataset(self.dataset.hub, split=hub_split)
        except Exception as e:  # noqa: BLE001 - offline, not cached, network: the same for the user
            why = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise DataError(f"{self.name} {split}: could not load {self.dataset.hub} (split {hub_split!r}) from the "
                            f"hub: {type(e).__name__}: {why}. To use local files, set STACKCOMP_DATA_DIR (or "
                            f"data.data_dir) to a folder holding {self._layouts()}") from None
        missing = {"sentence1", "sentence2", "score"} - set(ds.column_names)
        if missing:
            raise DataError(f"{self.dataset.hub} {hub_split}: no column(s) {sorted(missing)}; it has {ds.column_names}")
        return list(ds["sentence1"]), list(ds["sentence2"]), [float(s) for s in ds["score"]]

    # ------------------------------------------------------------------ training and distillation

    def training_callbacks(self, model: nn.Module) -> list[Any]:
        return [PairLossCallback(self)]

    def kd_outputs(self, model: nn.Module, batch: Mapping[str, Any], *, output_hidden_states: bool = False,
                   output_attentions: bool = False) -> dict[str, Any]:
        """``embeddings``: the pooled embeddings of sentence A then, in a pair batch, sentence B
        ((N or 2N, D)); no logits; ``loss``: the pair loss when the batch has gold scores; hidden
        states and attention maps of sentence A's pass (its ``attention_mask`` masks them)."""
        a, b = split_pair(batch)
        emb_a, out = encode(model, a, output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        embeddings, loss = emb_a, None
        if b is not None:
            emb_b = encode(model, b)[0]
            embeddings = torch.cat([emb_a, emb_b])
            if batch.get("labels") is not None:
                loss = self.pair_loss(emb_a, emb_b, batch["labels"])
        get = (lambda k: out.get(k)) if isinstance(out, Mapping) else (lambda k: getattr(out, k, None))
        return {"logits": None, "embeddings": embeddings, "loss": loss, "hidden_states": get("hidden_states"),
                "attentions": get("attentions")}

    # ------------------------------------------------------------------ export

    def write_export_files(self, model: nn.Module, folder: str | Path) -> list[str]:
        """Make an export folder (already holding config.json, weights and tokenizer) one that
        ``sentence_transformers.SentenceTransformer(folder)`` loads: ``modules.json``,
        ``sentence_bert_config.json``, ``1_Pooling/config.json`` [, ``2_Normalize``]. Returns the
        files written (relative), none for a model with compressed layers, which only
        ``stackcomp.load`` can rebuild."""
        from stackcomp.nn.base import CompressedLayer

        compressed = [n for n, m in model.named_modules() if isinstance(m, CompressedLayer)]
        if compressed:
            log.info("export: not a sentence-transformers folder: %d compressed layer(s) (e.g. %s) load with "
                     "stackcomp.load only", len(compressed), compressed[0])
            return []
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling

        folder = Path(folder)
        pooling = pooling_of(model)
        mode = pooling["mode"] if isinstance(pooling["mode"], str) else tuple(pooling["mode"])
        pipeline: list[tuple[str, type, Any]] = [("", Transformer, None)]
        pipeline.append(("1_Pooling", Pooling, Pooling(int(model.config.hidden_size), pooling_mode=mode)))
        if pooling["normalize"]:
            pipeline.append(("2_Normalize", Normalize, Normalize()))
        written = []
        for sub, _, module in pipeline[1:]:
            (folder / sub).mkdir(exist_ok=True)
            module.save(str(folder / sub))
            written += sorted(p.relative_to(folder).as_posix() for p in (folder / sub).iterdir())
        modules = [{"idx": i, "name": str(i), "path": sub, "type": f"{cls.__module__}.{cls.__name__}"}
                   for i, (sub, cls, _) in enumerate(pipeline)]
        (folder / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
        settings = {"do_lower_case": False}
        if pooling.get("max_seq_length"):
            settings["max_seq_length"] = int(pooling["max_seq_length"])
        (folder / "sentence_bert_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
        return ["modules.json", "sentence_bert_config.json", *written]

    def __repr__(self) -> str:
        return f"EmbeddingsTask({self.name})"


class PairLossCallback:
    """The training loss of a bi-encoder on gold pair scores (the loop's ``compute_loss``)."""

    def __init__(self, task: EmbeddingsTask):
        self.task = task

    def compute_loss(self, state: Any, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        a, b = split_pair(batch)
        if b is None or batch.get("labels") is None:
            raise DataError(f"{self.task.name}: the {self.task.loss} loss trains on sentence pairs with gold scores; "
                            "this batch has no sentence B or no labels")
        return self.task.pair_loss(encode(model, a)[0], encode(model, b)[0], batch["labels"])


def _read_jsonl(path: Path) -> tuple[list[str], list[str], list[float]]:
    """A JSON-lines pair file: one object per line with sentence1, sentence2 and score (0-1)."""
    firsts, seconds, gold = [], [], []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    s1, s2, score = row["sentence1"], row["sentence2"], float(row["score"])
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{line_no}: expected a JSON object with sentence1, sentence2 and a numeric "
                                    f"score ({type(e).__name__}: {e})") from None
                if not isinstance(s1, str) or not isinstance(s2, str):
                    raise DataError(f"{path}:{line_no}: sentence1 and sentence2 must be strings")
                if not 0.0 <= score <= 1.0:
                    raise DataError(f"{path}:{line_no}: score {score:g} is outside 0-1 (a 0-5 STS score? divide by 5)")
                firsts.append(s1)
                seconds.append(s2)
                gold.append(score)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not gold:
        raise DataError(f"{path}: no pairs")
    return firsts, seconds, gold


# ----------------------------------------------------------------------------- the data


class EmbeddingData:
    """Pair batches for training and evaluation, single-sentence batches for calibration,
    latency and distillation on unlabeled sentences, and the similarity metrics."""

    def __init__(self, task: EmbeddingsTask, tokenizer: Any, options: Any = None):
        from transformers import DataCollatorWithPadding

        from stackcomp.data.loaders import DataOptions

        self.task = task
        self.tokenizer = tokenizer
        self.options = options if isinstance(options, DataOptions) else DataOptions.model_validate(options or {})
        if getattr(tokenizer, "pad_token", None) is None:
            raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no pad "
                            "token, which batching needs")
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000 and self.options.max_length > limit:
            raise DataError(f"data.max_length {self.options.max_length} exceeds the tokenizer's model_max_length "
                            f"{limit}")
        self.eval_split = task.resolve_split(self.options.eval_split or "dev")
        self.main_metric = task.main_metric
        self._collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        self._pairs: dict[str, tuple[list[str], list[str], list[float]]] = {}
        self._features: dict[str, tuple[list[dict[str, Any]], np.ndarray]] = {}
        self._unlabeled_rows: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ text

    def pairs(self, split: str) -> tuple[list[str], list[str], list[float]]:
        """(sentences A, sentences B, gold 0-1) of ``split`` after the seeded sample cap, file order kept."""
        from stackcomp.data.loaders import _subset

        split = self.task.resolve_split(split)
        if split not in self._pairs:
            a, b, gold = self.task.load_pairs(split, self.options.data_dir)
            cap = self.options.max_train_samples if split == "train" else self.options.max_eval_samples
            keep = _subset(len(gold), cap, self.options.seed)
            if keep is not None:
                a, b, gold = [a[i] for i in keep], [b[i] for i in keep], [gold[i] for i in keep]
            self._pairs[split] = a, b, gold
        return self._pairs[split]

    def sentences(self, split: str = "train") -> list[str]:
        """Every sentence of ``split``, both columns, deduplicated, in first-seen order (A, B of
        each pair): the unlabeled text of embedding distillation."""
        a, b, _ = self.pairs(split)
        return list(dict.fromkeys(s for pair in zip(a, b) for s in pair))

    def _tokenize(self, texts: list[str]) -> list[dict[str, list[int]]]:
        from stackcomp.data.unlabeled import tokenize_sentences

        return tokenize_sentences(self.tokenizer, texts, self.options.max_length)

    def _pair_features(self, split: str) -> tuple[list[dict[str, Any]], np.ndarray]:
        split = self.task.resolve_split(split)
        if split not in self._features:
            a, b, gold = self.pairs(split)
            rows = []
            for fa, fb, g in zip(self._tokenize(a), self._tokenize(b), gold):
                rows.append({**fa, **{k + PAIR_SUFFIX: v for k, v in fb.items()}, "labels": g})
            lengths = np.array([max(len(r["input_ids"]), len(r["input_ids" + PAIR_SUFFIX])) for r in rows],
                               dtype=np.int64)
            self._features[split] = rows, lengths
        return self._features[split]

    def _pad(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Dynamic padding to the longest sequence of ``rows`` (as GLUE batches are padded)."""
        return dict(self._collator(rows))

    def collate_pairs(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad sentence A and sentence B each to its own longest sequence; gold scores as float."""
        a = self._pad([{k: v for k, v in r.items() if not k.endswith(PAIR_SUFFIX) and k != "labels"} for r in rows])
        b = self._pad([{k[:-len(PAIR_SUFFIX)]: v for k, v in r.items() if k.endswith(PAIR_SUFFIX)} for r in rows])
        return {**a, **{k + PAIR_SUFFIX: v for k, v in b.items()},
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.float32)}

    def _sentence_batches(self, texts: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
        rows = self._tokenize(texts)
        return [self._pad(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]

    # ------------------------------------------------------------------ loaders

    def train_loader(self, batch_size: int, seed: int | None = None, group_by_length: bool | None = None, *,
                     num_workers: int = 0, drop_last: bool = False, augment: Any = None) -> DataLoader:
        """Shuffled pair batches (seeded; length-grouped unless told otherwise) with gold scores."""
        if augment is not None:
            raise DataError(f"{self.task.name}: data augmentation perturbs labelled classification examples; "
                            "it does not apply to sentence pairs with similarity scores (remove `augment`)")
        rows, lengths = self._pair_features("train")
        group = self.options.group_by_length if group_by_length is None else group_by_length
        return shuffled_loader(rows, lengths, batch_size, seed=self.options.seed if seed is None else seed,
                               group_by_length=group, collate_fn=self.collate_pairs, num_workers=num_workers,
                               drop_last=drop_last)

    def unlabeled_sentences(self) -> list[str]:
        """The train sentences (both columns), then those of the ``data.unlabeled`` files,
        deduplicated: the text embedding distillation learns from."""
        from stackcomp.data.unlabeled import corpus

        return corpus(self.sentences("train"), self.options.unlabeled, self.options.data_dir, self.options.seed)

    def unlabeled_loader(self, batch_size: int, seed: int | None = None, group_by_length: bool | None = None, *,
                         num_workers: int = 0) -> DataLoader:
        """Shuffled (seeded; length-grouped unless told otherwise) batches of ``batch_size`` single
        sentences of :meth:`unlabeled_sentences`; no labels (what ``train.batches: unlabeled`` trains on)."""
        from stackcomp.data.unlabeled import lengths_of

        _check_batch_size(batch_size)
        if self._unlabeled_rows is None:
            self._unlabeled_rows = self._tokenize(self.unlabeled_sentences())
        rows = self._unlabeled_rows
        group = self.options.group_by_length if group_by_length is None else group_by_length
        return shuffled_loader(rows, lengths_of(rows), batch_size, seed=self.options.seed if seed is None else seed,
                               group_by_length=group, collate_fn=self._pad, num_workers=num_workers)

    def eval_loader(self, batch_size: int, *, split: str | None = None, sort_by_length: bool = True,
                    num_workers: int = 0) -> DataLoader:
        """Pair batches with gold scores in a fixed order: longest first (least padding), or file order."""
        from torch.utils.data import DataLoader

        _check_batch_size(batch_size)
        rows, lengths = self._pair_features(split or self.eval_split)
        if sort_by_length:
            rows = [rows[i] for i in np.argsort(-lengths, kind="stable")]
        return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=self.collate_pairs,
                          num_workers=num_workers)

    def calibration_batches(self, n: int, batch_size: int, *, seed: int | None = None) -> list[dict[str, torch.Tensor]]:
        """``n`` train sentences (not batches; all if fewer) picked at random (seeded), single-sentence
        batches longest first."""
        from stackcomp.data.loaders import _subset

        if n < 1:
            raise DataError(f"calibration needs at least one sentence, got n={n}")
        _check_batch_size(batch_size)
        texts = self.sentences("train")
        pick = _subset(len(texts), n, self.options.seed if seed is None else seed)
        chosen = texts if pick is None else [texts[i] for i in pick]
        rows = self._tokenize(chosen)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
        rows = [rows[i] for i in order]
        return [self._pad(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]

    def latency_batches(self, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n_batches`` batches of ``batch_size`` eval sentences (A, B of each pair, deduplicated,
        file order): what encoding latency is timed on."""
        _check_batch_size(batch_size)
        texts = self.sentences(self.eval_split)[:batch_size * n_batches]
        return self._sentence_batches(texts, batch_size)

    # ------------------------------------------------------------------ metrics

    def predict(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Encode sentences A and B separately; predictions are their cosine similarities (N,)."""
        a, b = split_pair(batch)
        if b is None:
            raise DataError(f"{self.task.name}: evaluation needs sentence pairs (keys ending in {PAIR_SUFFIX!r})")
        out = {"predictions": cosine_scores(encode(model, a)[0], encode(model, b)[0])}
        if batch.get("labels") is not None:
            out["labels"] = batch["labels"]
        return out

    def compute_metrics(self, predictions: Any, labels: Any) -> dict[str, float]:
        return similarity_metrics(predictions, labels)

    def __repr__(self) -> str:
        return f"EmbeddingData({self.task.name}, eval={self.eval_split}, max_length={self.options.max_length})"


# ----------------------------------------------------------------------------- registration


def _known() -> list[str]:
    return [f"embeddings/{name}" for name in _DATASETS]


def embeddings_task(dataset: str) -> EmbeddingsTask:
    """``stsb`` (trained with CoSENT) or ``stsb:cosine`` (CosineSimilarityLoss)."""
    name, _, loss = dataset.strip().lower().partition(":")
    name = name.replace("-", "").replace("_", "")
    if name not in _DATASETS:
        raise DataError(f"unknown task 'embeddings/{dataset}'; known embeddings tasks: {', '.join(_known())} "
                        f"(add ':cosine' to train with CosineSimilarityLoss instead of CoSENT)")
    return EmbeddingsTask(name, loss or "cosent")


embeddings_task.known = _known  # type: ignore[attr-defined]
register_task_kind("embeddings", embeddings_task)
